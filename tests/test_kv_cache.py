"""The position-indexed KV cache: writes, masks, rollback."""

import pytest
import torch

from operators.kv_cache import CacheGroup, KVCache


def group(capacity=8, batch=2):
    return CacheGroup(
        range(0, 2), batch, kv_heads=1, head_dim=2, capacity=capacity, dtype=torch.float32, device=torch.device("cpu")
    )


def test_write_returns_prefix_and_advance_commits():
    g = group()
    cache = KVCache([g])
    k = torch.ones(2, 1, 3, 2)
    keys, values = cache.update(k, 2 * k, 0)
    assert keys.shape == (2, 1, 3, 2) and torch.equal(values, 2 * k)
    g.advance(torch.ones(2, 3, dtype=torch.bool))
    keys, _ = cache.update(3 * torch.ones(2, 1, 1, 2), torch.zeros(2, 1, 1, 2), 1)
    assert keys.shape == (2, 1, 4, 2) and keys[0, 0, 3, 0] == 3


def test_mask_is_none_without_padding_for_prefill_and_single_queries():
    g = group()
    assert g.attention_mask(torch.ones(2, 3, dtype=torch.bool)) is None
    g.advance(torch.ones(2, 3, dtype=torch.bool))
    assert g.attention_mask(torch.ones(2, 1, dtype=torch.bool)) is None
    assert g.attention_mask(torch.ones(2, 2, dtype=torch.bool)) is not None  # a block after a prefix needs one


def test_mask_hides_padding_and_is_causal():
    g = group()
    block_valid = torch.tensor([[False, True, True], [True, True, True]])
    mask = g.attention_mask(block_valid)[:, 0]  # [B, q, kv]
    assert mask[1].tolist() == [[True, False, False], [True, True, False], [True, True, True]]
    assert mask[0].tolist() == [[True, False, False], [False, True, False], [False, True, True]]
    g.advance(block_valid)
    step = g.attention_mask(torch.ones(2, 1, dtype=torch.bool))[:, 0]
    assert step[0].tolist() == [[False, True, True, True]]


def test_rollback_is_a_counter_reset_and_overflow_raises():
    g = group(capacity=4)
    g.advance(torch.ones(2, 3, dtype=torch.bool))
    g.length = 1  # reject two tokens
    g.write(0, torch.zeros(2, 1, 3, 2), torch.zeros(2, 1, 3, 2))
    with pytest.raises(RuntimeError, match="overflow"):
        g.write(0, torch.zeros(2, 1, 4, 2), torch.zeros(2, 1, 4, 2))
