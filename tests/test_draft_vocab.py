"""A twig's reduced draft vocabulary (FR-Spec / EAGLE-3): the head scores N frequent tokens, the base
still verifies over its whole vocabulary, so greedy SSD is still greedy and sampled SSD still samples
the base's distribution (q is zero outside the N tokens; min(1, p/q) and the residual stay exact)."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

from operators.decoding import speculative as spec
from operators.decoding.sampling import Sampler
from operators.decoding.speculative import rejection_sample
from operators.language_model import text_model
from operators.twig import extend_vocab, grow_twig, load_twig, restrict_vocab, save_twig
from tests.test_speculative import assert_same, batch_inputs, chi_square_two_sample, reference, speculative
from tests.test_twig import small_demo_model  # noqa: F401  (a fixture)
from training.draft_vocab import choose_draft_vocab, count_tokens, coverage, coverage_curve


def vocab_size(model) -> int:
    return model.lm_head.out_features


def p_value(statistic: float, dof: int) -> float:
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0), torch.tensor(statistic / 2.0)))


# --- the twig's restricted head ---------------------------------------------------------------------


def test_restricted_head_is_the_full_heads_rows_and_maps_back_to_full_ids(tiny):
    model, _ = tiny("llava")
    twig = grow_twig(model, K=1, T=1)
    hidden = torch.randn(3, 64)
    full = twig.head(hidden)
    ids = torch.tensor([7, 3, 40, 11])
    restrict_vocab(twig, ids)
    torch.testing.assert_close(twig.head(hidden), full[:, ids])
    assert twig.full_ids(torch.tensor([0, 2])).tolist() == [7, 40]
    assert twig.draft_index(torch.tensor([40, 5, 7])).tolist() == [2, -1, 0]
    probs = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    q = twig.full_probs(probs)
    assert q.shape == (1, vocab_size(model)) and q[0, ids].tolist() == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert float(q.sum()) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="distinct"):
        restrict_vocab(grow_twig(model, K=1, T=1), torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="lacks"):
        restrict_vocab(twig, torch.tensor([7, 8]))  # 8 was sliced away


def test_a_restricted_twig_saves_and_loads_and_an_old_one_still_loads(tiny, tmp_path):
    model, _ = tiny("llava")
    twig = restrict_vocab(grow_twig(model, K=1, T=1), torch.tensor([9, 2, 30]))
    with torch.no_grad():
        twig.head.weight.add_(1.0)  # "trained"
    save_twig(twig, tmp_path / "small", model)
    loaded = load_twig(tmp_path / "small", model)
    assert loaded.draft_vocab.tolist() == [9, 2, 30] and loaded.head.out_features == 3
    torch.testing.assert_close(loaded.head.weight, twig.head.weight)
    assert loaded.vocab_size == vocab_size(model)
    save_twig(grow_twig(model, K=1, T=1), tmp_path / "full", model)  # a twig without a draft vocabulary
    old = load_twig(tmp_path / "full", model)
    assert old.draft_vocab is None and old.head.out_features == vocab_size(model)
    assert "draft_vocab" not in old.state_dict()


def test_a_widened_head_keeps_its_trained_rows_and_adds_the_base_heads(tiny, tmp_path):
    model, _ = tiny("llava")
    untrained = restrict_vocab(grow_twig(model, K=1, T=1), torch.tensor([9, 2, 30]))
    extend_vocab(untrained, model.lm_head, torch.tensor([5, 41]))  # rows as the base's: the new ones too
    torch.testing.assert_close(untrained.head.weight, model.lm_head.weight[[9, 2, 30, 5, 41]])
    twig = restrict_vocab(grow_twig(model, K=1, T=1), torch.tensor([9, 2, 30]))
    with torch.no_grad():
        twig.head.weight.add_(1.0)  # "trained": these rows now differ from the base head's
    trained = twig.head.weight.detach().clone()
    extend_vocab(twig, model.lm_head, torch.tensor([5, 41]))
    assert twig.draft_vocab.tolist() == [9, 2, 30, 5, 41] and twig.head.out_features == 5
    torch.testing.assert_close(twig.head.weight[:3], trained)
    assert not torch.allclose(twig.head.weight[3:], model.lm_head.weight[[5, 41]])  # taken through the drift
    assert twig.full_ids(torch.tensor([3, 4, 0])).tolist() == [5, 41, 9]
    assert twig.draft_index(torch.tensor([41, 7])).tolist() == [4, -1]
    save_twig(twig, tmp_path / "wide", model)
    loaded = load_twig(tmp_path / "wide", model)
    assert loaded.draft_vocab.tolist() == [9, 2, 30, 5, 41]
    torch.testing.assert_close(loaded.head.weight, twig.head.weight)
    with pytest.raises(ValueError, match="already in the draft"):
        extend_vocab(twig, model.lm_head, torch.tensor([2, 6]))
    with pytest.raises(ValueError, match="distinct"):
        extend_vocab(twig, model.lm_head, torch.tensor([6, 6]))
    with pytest.raises(ValueError, match="full vocabulary"):
        extend_vocab(grow_twig(model, K=1, T=1), model.lm_head, torch.tensor([6]))


def test_widened_rows_follow_the_drift_of_the_trained_head_from_the_base_head(tiny):
    """A trained head's rows are the base's through some map (here a random one, over more rows than the
    hidden size, so the map is determined): the added rows go through the same map, so they score the
    twig's states as the trained rows do instead of outscoring them with the base's scale."""
    model, _ = tiny("llava")
    base = model.lm_head.weight.detach()
    kept, added = torch.arange(0, 200, 2), torch.tensor([1, 7, 101, 255])
    drift = torch.randn(base.shape[1], base.shape[1], generator=torch.Generator().manual_seed(0)) / 4
    twig = restrict_vocab(grow_twig(model, K=1, T=1), kept)
    with torch.no_grad():
        twig.head.weight.copy_(base[kept] @ drift)
    extend_vocab(twig, model.lm_head, added)
    torch.testing.assert_close(twig.head.weight[len(kept) :], base[added] @ drift, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(twig.head.weight[: len(kept)], base[kept] @ drift)


def test_frequency_table_picks_the_most_frequent_ids_and_keeps_eos():
    counts = count_tokens([torch.tensor([5, 5, 5, 2, 2, 9]), torch.tensor([[2, 7], [5, 1]])], 12)
    assert counts[5] == 4 and counts[2] == 3 and counts[11] == 0
    assert choose_draft_vocab(counts, 2).tolist() == [5, 2]  # most frequent first
    assert choose_draft_vocab(counts, 3).tolist() == [5, 2, 1]  # ties: the lower id
    assert choose_draft_vocab(counts, 3, always=[11]).tolist() == [5, 2, 11]  # EOS kept whatever its count
    assert coverage(counts, torch.tensor([5, 2])) == pytest.approx(7 / 10)
    assert coverage_curve(counts, [1, 2, 100]) == {
        1: pytest.approx(0.4, abs=1e-5),
        2: pytest.approx(0.7, abs=1e-5),
        100: 1.0,
    }


# --- greedy: still the base's output ----------------------------------------------------------------


def test_greedy_ssd_with_a_draft_vocabulary_equals_greedy_even_off_the_vocabulary(tiny):
    """An exact twig (the rest of the base) restricted to a vocabulary that lacks some of the tokens
    the base emits: drafts at those positions are wrong (rejected), the output is still greedy's."""
    model, processor = tiny("llava")
    n_layers = len(text_model(model).layers)
    twig = grow_twig(model, K=1, T=n_layers - 1)
    inputs = batch_inputs(model, processor, range(90, 94))
    ar = reference(model, twig, inputs, max_new=20)
    emitted = ar.tokens[ar.tokens != inputs[0].pad_token_id].unique()
    missing = emitted[::3]  # a third of what the base says cannot be drafted
    keep = torch.ones(vocab_size(model), dtype=torch.bool)
    keep[missing] = False
    restrict_vocab(twig, keep.nonzero().flatten())
    assert len(twig.draft_vocab) < vocab_size(model)
    ssd = speculative(model, twig, inputs, max_new=20, max_draft=4, threshold=0.0)
    assert_same(ar, ssd)
    stats = ssd.stats
    assert 0 < int(stats.accepted.sum()) < int(stats.drafted.sum())  # on-vocabulary drafts pass, others fail
    drafted_ids = twig.draft_vocab
    assert not bool(torch.isin(missing, drafted_ids).any())


# --- sampling: still the base's distribution ---------------------------------------------------------


def test_rejection_sample_is_exact_when_q_is_zero_outside_the_draft_vocabulary(monkeypatch):
    """p has mass on tokens q can never draft: they must come from the residual max(0, p - q). A
    broken residual (resampling from p, a common bug) over-produces the drafted tokens: caught."""
    generator = torch.Generator().manual_seed(0)
    rows = 100_000
    p = torch.tensor([[0.3, 0.1, 0.25, 0.05, 0.3], [0.2, 0.2, 0.2, 0.2, 0.2]])
    q = torch.tensor([[0.0, 0.5, 0.5, 0.0, 0.0]])  # draft vocabulary {1, 2}
    drafts = torch.multinomial(q.expand(rows, -1), 1, replacement=True, generator=generator)

    def first_tokens() -> torch.Tensor:
        sampler = Sampler(temperature=1.0, generators=generator)
        accepted, bonus = rejection_sample(
            drafts, torch.ones(rows, dtype=torch.long), q.expand(rows, 1, -1), p.expand(rows, 2, -1), sampler
        )
        return torch.bincount(torch.where(accepted == 1, drafts[:, 0], bonus), minlength=5).float() / rows

    torch.testing.assert_close(first_tokens(), p[0], atol=0.005, rtol=0)
    monkeypatch.setattr(spec, "residual", lambda p, q: p)
    broken = first_tokens()
    assert float((broken - p[0]).abs().max()) > 0.05  # token 1 and 2 come out far too often


@pytest.fixture(scope="module")
def many_rows(tiny):
    """One prompt repeated 1200 times: a sample of the base's next-token distributions."""
    model, processor = tiny("llava")
    engine, batch = batch_inputs(model, processor, [5])
    rows = 1200
    expand = {
        name: getattr(batch, name).expand(rows, *getattr(batch, name).shape[1:]).contiguous()
        for name in ("embeds", "positions", "valid", "visual", "prunable")
    }
    many = replace(
        batch,
        **expand,
        media_spans=batch.media_spans * rows,
        segments=batch.segments * rows,
        visual_total=batch.visual_total * rows,
    )
    return model, (engine, many)


def sampled_pair(model, inputs, twig, seed: int):
    """(base sampling, SSD sampling) of 3 tokens per row at temperature 1, top-k 8."""
    ar = reference(
        model,
        twig,
        inputs,
        max_new=3,
        eos=[-1],
        sampler=Sampler(1.0, 8, generators=torch.Generator().manual_seed(seed)),
    )
    ssd = speculative(
        model,
        twig,
        inputs,
        max_new=3,
        eos=[-1],
        max_draft=2,
        threshold=0.0,
        sampler=Sampler(1.0, 8, generators=torch.Generator().manual_seed(seed + 1)),
    )
    return ar, ssd


def even_ids_twig(model):
    """A random twig restricted to the even token ids: a strict subset of the vocabulary."""
    twig = grow_twig(model, K=1, T=1)
    return restrict_vocab(twig, torch.arange(0, vocab_size(model), 2))


def test_sampled_ssd_with_a_draft_vocabulary_samples_the_base_distribution(many_rows):
    """Tokens 2 and 3 of 1200 rows sampled by the base alone and through SSD with a twig that can
    draft only even ids: the same distribution (two-sample chi-square, p-value floor 1e-4), while
    the base does emit odd ids (they reach the output only through the residual or the bonus)."""
    model, inputs = many_rows
    ar, ssd = sampled_pair(model, inputs, even_ids_twig(model), seed=21)
    stats = ssd.stats
    assert 0 < int(stats.accepted.sum()) < int(stats.drafted.sum())
    vocab = vocab_size(model)
    for position in (1, 2):
        a = torch.bincount(ar.tokens[:, position], minlength=vocab)
        b = torch.bincount(ssd.tokens[:, position], minlength=vocab)
        assert int(a[1::2].sum()) > 50  # the base's samples include ids the twig cannot draft
        statistic, dof = chi_square_two_sample(a, b)
        assert dof >= 4 and p_value(statistic, dof) > 1e-4, (position, statistic, dof)


def test_the_end_to_end_chi_square_catches_a_broken_residual(many_rows, monkeypatch):
    """The same run with the residual replaced by p: odd ids (never drafted) are under-produced and
    the test statistic explodes, so the exactness test above has the power to see that bug."""
    model, inputs = many_rows
    monkeypatch.setattr(spec, "residual", lambda p, q: p)
    ar, ssd = sampled_pair(model, inputs, even_ids_twig(model), seed=21)
    vocab = vocab_size(model)
    statistic, dof = chi_square_two_sample(
        torch.bincount(ar.tokens[:, 1], minlength=vocab), torch.bincount(ssd.tokens[:, 1], minlength=vocab)
    )
    assert p_value(statistic, dof) < 1e-6, (statistic, dof)


# --- the training command ------------------------------------------------------------------------------


def test_training_job_with_a_draft_vocabulary_writes_a_restricted_twig(tmp_path, small_demo_model):  # noqa: F811
    """--draft-vocab N: the N tokens the base outputs most often on the training replies (EOS kept),
    the head trained restricted, saved and loaded back; the report has the coverage curve."""
    from operators.loading import load_vlm
    from training.twig_cli import train

    out = tmp_path / "twig"
    report = train(
        [
            "--model", str(small_demo_model), "--out", str(out), "--K", "1", "--T", "1", "--draft-vocab", "12",
            "--seed", "5", "--images", "8", "--videos", "2", "--steps", "3", "--batch-size", "4", "--warmup", "1",
            "--distill", "1.0", "--eval-images", "2", "--eval-videos", "1", "--eval-generated", "1",
            "--max-new-tokens", "3",
        ]
    )  # fmt: skip
    vocab = report["draft_vocab"]
    assert vocab["size"] == 12 and 0 < vocab["coverage"] <= 1 and vocab["counted_conversations"] == 20
    assert all(math.isfinite(v) for v in report["train"]["losses"])
    assert 0 <= report["held_out"]["all"]["twig_base_agreement"] <= 1
    model, processor = load_vlm(small_demo_model)
    twig = load_twig(out, model)
    assert twig.head.out_features == 12 and len(set(twig.draft_vocab.tolist())) == 12
    assert processor.tokenizer.eos_token_id in twig.draft_vocab.tolist()
    assert json.loads((out / "twig.json").read_text())["draft_vocab"] == 12
