"""Batched rounds without waste: rows that finish leave the working batch (greedy and SSD) and the
results come back in the original row order, identical to decoding without compaction; the cache's
host-side density flag; the base head's formulation.

A tiny random text-only Llama built in code, left-padded prompts of different lengths.
"""

from __future__ import annotations

import pytest
import torch

from operators.batch import text_batch
from operators.decoding.autoregressive import Autoregressive
from operators.decoding.sampling import Sampler
from operators.decoding.speculative import SelfSpeculative
from operators.engine import EngineConfig
from operators.kv_cache import CacheGroup
from operators.language_model import base_logits, text_model
from operators.prefill import LayerPlan
from operators.twig import grow_twig

PAD = 0


@pytest.fixture(scope="module")
def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(config).eval()
    prompts = [[5, 9, 13, 2, 7], [3, 4], [11, 12, 13, 14, 15, 16], [8], [20, 21, 22], [30, 31, 32, 33]]
    width = max(map(len, prompts))
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return model, ids, mask


def run(model, ids, mask, decoder_class, eos, max_new, drop_finished=True, twig=None, sampler=None, **extra):
    decoder = decoder_class(EngineConfig(max_new_tokens=max_new, **extra), eos, PAD)
    decoder.drop_finished = drop_finished
    plan = LayerPlan(len(text_model(model).layers), twig_layer=None if twig is None else twig.K)
    return decoder.generate(model, text_batch(text_model(model).embed_tokens, ids, mask), plan, twig, None, sampler)


def rows_of(generation) -> list[list[int]]:
    return [generation.tokens[i, : generation.lengths[i]].tolist() for i in range(generation.tokens.shape[0])]


def finishing_eos(model, ids, mask) -> int:
    """A token that ends rows at different steps (or not at all) in a free greedy run."""
    free = rows_of(run(model, ids, mask, Autoregressive, [-1], 12))

    def spread(token):  # some row never meets it; the others meet it first at as many different steps as can be
        return any(token not in row for row in free), len({row.index(token) for row in free if token in row})

    return max(sorted({t for row in free for t in row}), key=spread)


@pytest.fixture
def spy(monkeypatch):
    """Counts the rows each compaction keeps."""
    kept = []
    original = CacheGroup.select_rows

    def select_rows(self, index):
        kept.append(len(index))
        return original(self, index)

    monkeypatch.setattr(CacheGroup, "select_rows", select_rows)
    return kept


@pytest.mark.parametrize("decoder", ["greedy", "ssd"])
def test_compaction_gives_the_same_rows_in_the_same_order(llama, spy, decoder):
    model, ids, mask = llama
    eos = [finishing_eos(model, ids, mask)]
    twig = grow_twig(model, K=1, T=2) if decoder == "ssd" else None
    decoder_class = SelfSpeculative if decoder == "ssd" else Autoregressive
    extra = dict(max_draft=3, draft_threshold=0.0) if decoder == "ssd" else {}
    for max_new in (3, 10):  # rows end at EOS at different steps, the others at max_new_tokens
        spy.clear()
        dense = run(model, ids, mask, decoder_class, eos, max_new, False, twig, **extra)
        assert not spy
        compacted = run(model, ids, mask, decoder_class, eos, max_new, True, twig, **extra)
        assert rows_of(compacted) == rows_of(dense)
        assert torch.equal(compacted.tokens, dense.tokens) and torch.equal(compacted.lengths, dense.lengths)
        if decoder == "ssd":
            for name in ("drafted", "accepted", "rounds"):
                assert torch.equal(getattr(compacted.stats, name), getattr(dense.stats, name)), name
    assert spy and min(spy) < len(ids)  # rows did leave the batch
    assert len(set(compacted.lengths.tolist())) > 1  # rows finished at different times


def test_compacted_ssd_equals_greedy_and_each_row_alone(llama, spy):
    """Each row of a compacted batch equals that row decoded alone: rows returned in another order fail."""
    model, ids, mask = llama
    eos = [finishing_eos(model, ids, mask)]
    twig = grow_twig(model, K=1, T=3)  # the rest of the base: drafts accepted, rows finish mid-draft
    greedy = rows_of(run(model, ids, mask, Autoregressive, eos, 9))
    ssd = run(model, ids, mask, SelfSpeculative, eos, 9, True, twig, max_draft=4, draft_threshold=0.0)
    assert spy and rows_of(ssd) == greedy
    assert len({tuple(r) for r in greedy}) == len(greedy)  # distinct rows: a permutation would show
    for i in range(len(ids)):
        alone = run(model, ids[i : i + 1], mask[i : i + 1], Autoregressive, eos, 9)
        assert rows_of(alone)[0] == greedy[i], i


def test_compaction_keeps_each_rows_generator(llama):
    """Sampling with per-row generators: a row's draws follow it through compaction."""
    model, ids, mask = llama
    eos = [finishing_eos(model, ids, mask)]

    def sampler():
        return Sampler(1.0, generators=[torch.Generator().manual_seed(i) for i in range(len(ids))])

    a = run(model, ids, mask, Autoregressive, eos, 10, True, sampler=sampler())
    b = run(model, ids, mask, Autoregressive, eos, 10, False, sampler=sampler())
    assert rows_of(a) == rows_of(b)


def test_density_flag_skips_the_mask_and_tracks_holes():
    g = CacheGroup(range(1), 2, 1, 2, 8, torch.float32, torch.device("cpu"))
    g.advance(torch.ones(2, 3, dtype=torch.bool))
    assert g.dense and g.attention_mask(torch.ones(2, 1, dtype=torch.bool), block_dense=True) is None
    band = g.attention_mask(torch.ones(2, 2, dtype=torch.bool), block_dense=True)
    assert band.shape == (1, 1, 2, 5) and band[0, 0].tolist() == [[True] * 4 + [False], [True] * 5]
    g.advance(torch.ones(2, 2, dtype=torch.bool), block_dense=True)
    g.keep(torch.tensor([[True, False], [True, True]]), 3, end=5)  # row 0 rejects its last slot: a hole
    assert not g.dense and g.attention_mask(torch.ones(2, 1, dtype=torch.bool))[0, 0, 0].tolist() == [True] * 4 + [
        False,
        True,
    ]
    g.select_rows(torch.tensor([1]))  # the row with the hole leaves
    assert g.dense and g.valid.shape == (1, 8) and g.keys[0].shape[0] == 1


def test_base_logits_matches_the_head():
    head = torch.nn.Linear(16, 40, bias=False)
    model = torch.nn.Module()
    model.lm_head = head
    hidden = torch.randn(3, 2, 16)
    torch.testing.assert_close(base_logits(model, hidden), head(hidden).float())
    assert base_logits(model, hidden[:, 0]).shape == (3, 40)
