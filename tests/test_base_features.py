"""Twigs that read the base's final state at the previous token (EAGLE's feature input): zero-initialised,
saved and loaded, fed the right state by SSD, and SSD with them still equals greedy decoding."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from evaluation.bench_twig_lm import compare, engine_inputs, prompt_batch
from operators.decoding.speculative import SelfSpeculative
from operators.language_model import text_model
from operators.prefill import LayerPlan
from operators.settings import EngineConfig
from operators.twig import add_base_features, grow_twig, load_twig, save_twig
from tests.test_speculative import assert_ssd_equals_greedy_with_and_without_ttp, batch_inputs
from tests.tiny_models import tiny_llama
from training.train_twig import previous_features

PROMPTS = ["what shape is the red circle ?", "describe the picture .", "where is the blue square ?", "is there a cat ?"]


def feature_twig(model, K=2, T=1, scale=0.5, seed=0):
    """A twig with a random (non-zero) base-feature projection and slightly noisy layers."""
    twig = add_base_features(grow_twig(model, K=K, T=T))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        twig.feature_in.weight.normal_(0.0, scale / twig.feature_in.in_features**0.5, generator=generator)
        for p in twig.layers.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return twig


def test_a_new_feature_input_is_zero_and_changes_nothing_until_trained():
    model, _ = tiny_llama(seed=11, num_hidden_layers=4)
    twig = grow_twig(model, K=2, T=1)
    hidden = torch.randn(2, 5, model.config.hidden_size)
    positions = torch.arange(5)[None].expand(2, -1)
    rotary = text_model(model).rotary_emb
    before = twig(hidden, positions, None, rotary)
    add_base_features(twig)
    assert twig.base_features and bool((twig.feature_in.weight == 0).all())
    features = torch.randn_like(hidden)
    assert_close(twig(hidden, positions, None, rotary, features=features), before)
    with torch.no_grad():
        twig.feature_in.weight.fill_(0.01)
    assert not torch.allclose(twig(hidden, positions, None, rotary, features=features), before)


def test_save_and_load_keep_the_feature_input(tmp_path):
    model, _ = tiny_llama(seed=12, num_hidden_layers=4)
    twig = feature_twig(model)
    save_twig(twig, tmp_path / "twig", model)
    loaded = load_twig(tmp_path / "twig", model)
    assert loaded.base_features
    assert_close(loaded.feature_in.weight, twig.feature_in.weight)
    plain = grow_twig(model, K=2, T=1)
    save_twig(plain, tmp_path / "plain", model)
    assert not load_twig(tmp_path / "plain", model).base_features


def test_previous_features_shift_by_one_and_drop_whole_positions():
    final = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3) + 1
    shifted = previous_features(final)
    assert bool((shifted[:, 0] == 0).all())
    assert_close(shifted[:, 1:], final[:, :-1])
    dropped = previous_features(final, drop=0.5, generator=torch.Generator().manual_seed(0))
    zero = (dropped == 0).all(dim=-1)  # a position is dropped whole or kept whole
    kept = ~zero
    assert_close(dropped[kept], shifted[kept])
    assert bool(zero[:, 1:].any()) and bool(kept[:, 1:].any())
    assert bool((previous_features(final, drop=1.0) == 0).all())


@pytest.mark.parametrize("fold", [True, False])
def test_ssd_gives_the_twig_the_base_state_before_each_rounds_first_input(monkeypatch, fold):
    """Every feature the twig receives equals Hugging Face's final-norm state (the model's
    ``last_hidden_state``) at the position before the round's first input, on the output sequence."""
    monkeypatch.setattr(SelfSpeculative, "fold_prefill", fold)
    model, tokenizer = tiny_llama(seed=13, num_hidden_layers=6)
    twig = feature_twig(model)
    seen: list[torch.Tensor] = []
    twig.feature_in.register_forward_hook(lambda module, args, out: seen.append(args[0].reshape(-1, args[0].shape[-1])))
    ids, mask = prompt_batch(tokenizer, PROMPTS[:1])
    config = EngineConfig(max_new_tokens=12, decode_strategy="ssd", max_draft=3, draft_threshold=0.0)
    decoder = SelfSpeculative(config, [tokenizer.eos_token_id], tokenizer.pad_token_id)
    layers = len(text_model(model).layers)
    gen = decoder.generate(model, engine_inputs(model, ids, mask), LayerPlan(layers, twig_layer=twig.K), twig)
    n = int(gen.lengths[0])
    sequence = torch.cat([ids[0], gen.tokens[0, :n]])[None]
    with torch.no_grad():
        states = text_model(model)(input_ids=sequence).last_hidden_state[0]  # [S + n, D]
    rounds = int(gen.stats.rounds[0])
    # Each round after the first (the first, folded, drafts from the prompt with no input of its own;
    # unfolded, its input is the base's first token) starts from the base's own last token.
    assert len(seen) == (rounds - 1 if fold else rounds) and len(seen) >= 2
    prompt = ids.shape[1]
    where = []
    for feature in seen:
        distance = (states - feature[0]).abs().amax(dim=-1)
        index = int(distance.argmin())
        assert_close(feature[0], states[index], atol=1e-4, rtol=1e-4)
        where.append(index)
    # The positions rise through the reply, from the last prompt token on.
    assert where == sorted(where) and len(set(where)) == len(where) and where[0] >= prompt - 1


@pytest.mark.parametrize("batch", [1, 4])
def test_ssd_with_base_features_equals_greedy_with_ttp(tiny, batch):
    model, processor = tiny("llava")
    twig = feature_twig(model, K=1, T=2)
    assert_ssd_equals_greedy_with_and_without_ttp(model, twig, batch_inputs(model, processor, range(40, 40 + batch)))


def test_ssd_with_base_features_equals_greedy_on_a_causal_lm_with_compaction_and_sampling():
    model, tokenizer = tiny_llama(seed=14, num_hidden_layers=6)
    twig = feature_twig(model, scale=1.0)
    rows = compare(model, twig, tokenizer, PROMPTS, [1, 4], max_new_tokens=16, label="features")
    assert all(r["identical"] == 1.0 and r["generated"] > len(PROMPTS) for r in rows)
    sampled = compare(model, twig, tokenizer, PROMPTS, [4], max_new_tokens=8, label="sampled", temperature=0.8)
    assert sampled[0]["identical"] is None and 0.0 <= sampled[0]["acceptance"] <= 1.0
