"""TTP and self-speculative decoding: batched SSD equals plain greedy decoding of the same pruned base.

Tiny random-weight models built in code; twigs grown from them. Stub twig heads force the
never / always / sometimes-accept regimes.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn

from operators.accounting import transformer_layer_flops
from operators.decoding.autoregressive import Autoregressive
from operators.decoding.sampling import Sampler
from operators.decoding.speculative import SelfSpeculative, rejection_sample
from operators.engine import Engine, EngineConfig, Request, format_prompt
from operators.language_model import text_model
from operators.prefill import InLLMPruning, LayerPlan, prefill
from operators.pruning.ttp import TwigGuided
from operators.twig import grow_twig
from tests.conftest import random_image, random_video


def batch_inputs(model, processor, seeds, family="llava"):
    """(engine, the prompt batch of prompts of different lengths, left padded, as the engine builds it)."""
    engine = Engine(model, processor, EngineConfig(max_new_tokens=8))
    questions = ["describe", "what is in the image", "count the things in it please", "colour ?"]
    requests = []
    for i, seed in enumerate(seeds):
        if family == "video_llava" and i % 2:
            requests.append(Request(format_prompt(processor, questions[i % 4], "video"), video=random_video(seed)))
        else:
            requests.append(Request(format_prompt(processor, questions[i % 4]), images=[random_image(seed)]))
    return engine, engine.prompt_batch(requests)


def ttp_plan(model, twig, keep=None, finalwipe=None) -> tuple[LayerPlan, InLLMPruning | None]:
    """The layer plan of TTP at the twig's K keeping ``keep`` [B] visual tokens (None: no pruning),
    FinalWipe from ``finalwipe`` (None: none), with the twig run at K."""
    plan = LayerPlan(len(text_model(model).layers), twig.K if keep is not None else None, finalwipe, twig.K)
    pruning = None if keep is None else InLLMPruning(TwigGuided(EngineConfig("ttp", budget=1)).scores, keep)
    return plan, pruning


def reference(model, twig, inputs, keep=None, finalwipe=None, max_new=8, eos=None, sampler=None):
    """Plain autoregressive decoding of the base under the same plan (what SSD must reproduce)."""
    engine, batch = inputs
    config = EngineConfig(max_new_tokens=max_new)
    decoder = Autoregressive(config, eos if eos is not None else engine.eos_token_ids, engine.pad_token_id)
    plan, pruning = ttp_plan(model, twig, keep, finalwipe)
    return decoder.generate(model, batch, plan, twig, pruning, sampler)


def speculative(
    model,
    twig,
    inputs,
    keep=None,
    finalwipe=None,
    max_new=8,
    eos=None,
    max_draft=5,
    threshold=0.6,
    sampler=None,
    alternatives=(),
):
    engine, batch = inputs
    config = EngineConfig(
        max_new_tokens=max_new, max_draft=max_draft, draft_threshold=threshold, draft_alternatives=alternatives
    )
    decoder = SelfSpeculative(config, eos if eos is not None else engine.eos_token_ids, engine.pad_token_id)
    plan, pruning = ttp_plan(model, twig, keep, finalwipe)
    return decoder.generate(model, batch, plan, twig, pruning, sampler)


def generate_both(model, twig, inputs, keep, finalwipe, max_new, eos, max_draft=5, threshold=0.6, alternatives=()):
    ar = reference(model, twig, inputs, keep, finalwipe, max_new, eos)
    ssd = speculative(model, twig, inputs, keep, finalwipe, max_new, eos, max_draft, threshold, None, alternatives)
    return ar, ssd, ssd.stats


def assert_same(ar, ssd):
    assert ssd.lengths.tolist() == ar.lengths.tolist()
    for row in range(ar.tokens.shape[0]):
        n = int(ar.lengths[row])
        assert ssd.tokens[row, :n].tolist() == ar.tokens[row, :n].tolist(), f"row {row}"


def assert_ssd_equals_greedy_with_and_without_ttp(model, twig, inputs):
    """Unpruned with drafts of 3 at θ = 0, and TTP at 3 visual tokens per segment with δ = 5, θ = 0.6."""
    segments = torch.tensor(inputs[1].segments)
    for keep, (max_draft, threshold, max_new) in [(None, (3, 0.0, 13)), (3 * segments, (5, 0.6, 17))]:
        ar, ssd, stats = generate_both(model, twig, inputs, keep, None, max_new, None, max_draft, threshold)
        assert_same(ar, ssd)
        assert bool((stats.accepted <= stats.drafted).all())


BUDGETS = [(None, None), (3, None), (3, -1), (12, -1)]  # (visual tokens kept per segment, FinalWipe layer)
DRAFTS = [(1, 0.0, 9), (3, 0.6, 13), (5, 0.0, 17)]  # (max draft, threshold, max new tokens)
BATCHES = [1, 4, 8]


def check_ssd_equals_greedy(tiny, family, batch, grid):
    model, processor = tiny(family)
    n_layers = len(text_model(model).layers)
    twig = grow_twig(model, K=1, T=2)
    inputs = batch_inputs(model, processor, range(100 * batch, 100 * batch + batch), family)
    segments = torch.tensor(inputs[1].segments)
    for (budget, finalwipe), (max_draft, threshold, max_new) in grid:
        keep = None if budget is None else budget * segments
        finalwipe = None if finalwipe is None else n_layers + finalwipe
        ar, ssd, stats = generate_both(model, twig, inputs, keep, finalwipe, max_new, None, max_draft, threshold)
        assert_same(ar, ssd)
        assert bool((stats.accepted <= stats.drafted).all())


@pytest.mark.parametrize("family", ["llava", "video_llava"])
@pytest.mark.parametrize("batch", BATCHES)
def test_ssd_equals_greedy_over_budgets_and_draft_lengths(tiny, family, batch):
    """Each batch size takes a third of the budget x draft grid, so the three together cover all of
    it (every budget with every draft setting) at a third of the cost; the slow test runs it whole."""
    offset = BATCHES.index(batch)
    grid = [(b, DRAFTS[(i + offset) % len(DRAFTS)]) for i, b in enumerate(BUDGETS)]
    check_ssd_equals_greedy(tiny, family, batch, grid)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llava", "video_llava"])
@pytest.mark.parametrize("batch", BATCHES)
def test_ssd_equals_greedy_over_the_whole_grid(tiny, family, batch):
    check_ssd_equals_greedy(tiny, family, batch, [(b, d) for b in BUDGETS for d in DRAFTS])


def test_ssd_without_folding_the_prefill_still_equals_greedy(tiny, monkeypatch):
    """The unfolded path (the base's prefill gives the first token, then drafting) over the whole
    budget grid at batch 4: kept for FastV deeper than the twig's K, and as the baseline."""
    monkeypatch.setattr(SelfSpeculative, "fold_prefill", False)
    check_ssd_equals_greedy(tiny, "llava", 4, [(b, DRAFTS[i % len(DRAFTS)]) for i, b in enumerate(BUDGETS)])


def counting_deep_passes(model, run, *args, **kwargs):
    """(``run(*args, **kwargs)``, how many times the base's last layer ran: once per prefill or verification)."""
    calls = []
    handle = text_model(model).layers[-1].register_forward_hook(lambda *hook_args: calls.append(1))
    try:
        result = run(*args, **kwargs)
    finally:
        handle.remove()
    return result, len(calls)


@pytest.mark.parametrize("keep, finalwipe", [(None, None), (4, -1)])
def test_folding_the_prefill_into_the_first_verification_saves_one_deep_pass_per_request(
    tiny, monkeypatch, keep, finalwipe
):
    """Each request alone: the folded SSD runs the base's deep layers once less than the unfolded one
    (the twig drafts from its prompt logits; the first verification is also the prefill's deep part),
    every deep pass is a verification round, and the output is greedy's, with TTP + FinalWipe too."""
    model, processor = tiny("llava")
    n_layers = len(text_model(model).layers)
    twig = grow_twig(model, K=1, T=n_layers - 1)  # always accepts: rounds are deterministic
    wipe = None if finalwipe is None else n_layers + finalwipe
    for seed in (10, 11, 12):
        inputs = batch_inputs(model, processor, [seed])
        budget = None if keep is None else keep * torch.tensor(inputs[1].segments)
        ar = reference(model, twig, inputs, budget, wipe, max_new=14)
        passes, rounds = {}, {}
        for fold in (False, True):
            monkeypatch.setattr(SelfSpeculative, "fold_prefill", fold)
            ssd, passes[fold] = counting_deep_passes(
                model, speculative, model, twig, inputs, budget, wipe, max_new=14, threshold=0.0
            )
            assert_same(ar, ssd)
            rounds[fold] = int(ssd.stats.rounds.max())
        assert passes[True] == rounds[True] and passes[False] == rounds[False] + 1
        if keep is None:  # the twig is the base: both take 3 rounds (1 + 6 + 6 + 1 tokens, and 6 + 6 + 2)
            assert rounds == {False: 3, True: 3} and passes == {False: 4, True: 3}, (seed, passes)


def test_unpruned_reference_equals_the_engine(tiny):
    """The SSD reference (ttp_generate without pruning) is the engine's plain greedy output."""
    model, processor = tiny("llava")
    twig = grow_twig(model, K=2, T=1)
    inputs = batch_inputs(model, processor, range(4))
    ar = reference(model, twig, inputs, max_new=12)
    engine = Engine(model, processor, EngineConfig(max_new_tokens=12))
    requests = [
        Request(format_prompt(processor, q), images=[random_image(s)])
        for s, q in zip(
            range(4), ["describe", "what is in the image", "count the things in it please", "colour ?"], strict=True
        )
    ]
    expected = [r.token_ids for r in engine.generate(requests)]
    assert [ar.tokens[i, : ar.lengths[i]].tolist() for i in range(4)] == expected


def test_always_accept_when_the_twig_is_the_rest_of_the_base(tiny):
    """A twig made of all remaining base layers with the base's head drafts exactly what the base says."""
    model, processor = tiny("llava")
    n_layers = len(text_model(model).layers)
    twig = grow_twig(model, K=1, T=n_layers - 1)
    inputs = batch_inputs(model, processor, range(10, 14))
    ar, ssd, stats = generate_both(model, twig, inputs, None, None, 20, None, max_draft=4, threshold=0.0)
    assert_same(ar, ssd)
    assert int(stats.drafted.sum()) > 0 and torch.equal(stats.accepted, stats.drafted)
    # Rounds: every round accepts 4 drafts + 1 bonus until the end (20 tokens = first + 19 more).
    assert stats.rounds.tolist() == [4] * 4


ALTERNATIVES = [(3, 1), (2, 2, 2), (1,)]  # extra candidates verified beside d_1, d_2, ...


@pytest.mark.parametrize("fold", [True, False])
@pytest.mark.parametrize("batch", [1, 4])
def test_ssd_with_alternatives_equals_greedy(tiny, monkeypatch, fold, batch):
    """Draft trees (alternatives beside the chain's first drafts) keep SSD's output the base's own, with
    and without TTP and FinalWipe, folded prefill or not, and rows accepting different paths."""
    monkeypatch.setattr(SelfSpeculative, "fold_prefill", fold)
    model, processor = tiny("llava")
    n_layers = len(text_model(model).layers)
    twig = grow_twig(model, K=1, T=2)
    inputs = batch_inputs(model, processor, range(200 + batch, 200 + 2 * batch))
    segments = torch.tensor(inputs[1].segments)
    grid = [(None, None, (3, 0.0, 13)), (3, None, (5, 0.6, 17)), (12, -1, (3, 0.0, 15))]
    for i, (budget, finalwipe, (max_draft, threshold, max_new)) in enumerate(grid):
        keep = None if budget is None else budget * segments
        finalwipe = None if finalwipe is None else n_layers + finalwipe
        alternatives = ALTERNATIVES[i % len(ALTERNATIVES)]
        ar, tree, stats = generate_both(
            model, twig, inputs, keep, finalwipe, max_new, None, max_draft, threshold, alternatives
        )
        assert_same(ar, tree)
        assert bool((stats.accepted <= stats.drafted + stats.rounds).all())


class SecondChoiceHead(nn.Module):
    """Stub twig head: the wrapped head's logits with ``token`` made the first choice, so the real first
    choice comes second (an alternative)."""

    def __init__(self, head: nn.Module, token: int):
        super().__init__()
        self.head, self.token = head, token

    def forward(self, hidden):
        logits = self.head(hidden)
        logits[..., self.token] = logits.max(dim=-1).values + 10.0
        return logits


def test_an_alternative_is_accepted_where_the_first_draft_is_rejected(tiny):
    """A twig that is the rest of the base, except that its first choice is always a token the base never
    says: the chain accepts nothing, and with one alternative each round accepts it (2 tokens a round)."""
    model, processor = tiny("llava")
    n_layers = len(text_model(model).layers)
    twig = grow_twig(model, K=1, T=n_layers - 1)
    inputs = batch_inputs(model, processor, range(50, 53))
    ar = reference(model, twig, inputs, max_new=10)
    unused = next(t for t in range(model.config.text_config.vocab_size) if t not in ar.tokens.flatten().tolist())
    twig.head = SecondChoiceHead(twig.head, unused)
    _, chain, stats = generate_both(model, twig, inputs, None, None, 10, None, max_draft=1, threshold=0.0)
    assert_same(ar, chain)
    assert int(stats.accepted.sum()) == 0
    _, tree, stats = generate_both(model, twig, inputs, None, None, 10, None, 1, 0.0, alternatives=(1,))
    assert_same(ar, tree)
    finished_early = ar.lengths < 10  # a row that hit EOS may end mid-round
    assert bool(((stats.accepted == stats.rounds) | finished_early).all()) and int(stats.accepted.sum()) > 0
    assert bool(((stats.rounds == 5) | finished_early).all())


def test_alternatives_are_validated():
    with pytest.raises(ValueError, match="decode.draft_alternatives"):
        EngineConfig(max_draft=2, draft_alternatives=(1, 1, 1))
    with pytest.raises(ValueError, match="decode.draft_alternatives"):
        EngineConfig(draft_alternatives=(-1,))
    with pytest.raises(ValueError, match="decode.draft_alternatives"):
        EngineConfig(draft_alternatives=[1])
    assert EngineConfig(draft_alternatives=(3, 0, 1)).draft_alternatives == (3, 0, 1)


class FixedHead(nn.Module):
    """Stub twig head: always the same token, with full confidence."""

    def __init__(self, token: int, vocab: int):
        super().__init__()
        self.token, self.vocab = token, vocab

    def forward(self, hidden):
        logits = torch.full((*hidden.shape[:-1], self.vocab), -30.0)
        logits[..., self.token] = 30.0
        return logits


def test_never_accept_still_equals_greedy(tiny):
    model, processor = tiny("llava")
    twig = grow_twig(model, K=1, T=1)
    inputs = batch_inputs(model, processor, range(20, 23))
    ar = reference(model, twig, inputs, max_new=10)
    unused = next(t for t in range(model.config.text_config.vocab_size) if t not in ar.tokens.flatten().tolist())
    twig.head = FixedHead(unused, model.config.text_config.vocab_size)
    ar, ssd, stats = generate_both(model, twig, inputs, None, None, 10, None, max_draft=3, threshold=0.0)
    assert_same(ar, ssd)
    assert int(stats.drafted.sum()) > 0 and int(stats.accepted.sum()) == 0


def test_sometimes_accept_rows_take_their_own_prefix_lengths(tiny):
    """Rows of one batch accept different numbers of drafts and still match greedy exactly."""
    model, processor = tiny("llava")
    n_layers = len(text_model(model).layers)
    twig = grow_twig(model, K=1, T=n_layers - 1)
    inputs = batch_inputs(model, processor, range(30, 38))
    keep = 4 * torch.tensor(inputs[1].segments)  # the base is pruned, the twig sees everything: they disagree sometimes
    ar, ssd, stats = generate_both(model, twig, inputs, keep, n_layers - 1, 24, None, max_draft=5, threshold=0.0)
    assert_same(ar, ssd)
    rate = stats.accepted.float() / stats.drafted.clamp(min=1).float()
    assert 0 < int(stats.accepted.sum()) < int(stats.drafted.sum())
    assert len(set(rate.tolist())) > 1  # different rows, different acceptance


def test_eos_inside_a_draft_and_max_new_tokens_mid_draft(tiny):
    model, processor = tiny("llava")
    n_layers = len(text_model(model).layers)
    twig = grow_twig(model, K=1, T=n_layers - 1)  # always accepts: EOS arrives inside a draft
    inputs = batch_inputs(model, processor, range(40, 44))
    free = reference(model, twig, inputs, max_new=16)
    eos = int(free.tokens[1, 6])  # pretend the 7th token of row 1 is EOS
    ar, ssd, stats = generate_both(model, twig, inputs, None, None, 16, [eos], max_draft=5, threshold=0.0)
    assert_same(ar, ssd)
    assert int(ar.lengths[1]) <= 7 and int(ssd.tokens[1, ar.lengths[1] - 1]) == eos
    for max_new in (1, 2, 7, 11):  # not multiples of the round size: the limit lands mid-draft
        ar, ssd, _ = generate_both(model, twig, inputs, None, None, max_new, None, max_draft=5, threshold=0.0)
        assert_same(ar, ssd)
        assert int(ssd.lengths.max()) <= max_new


def test_ttp_keeps_text_plus_r_visual_tokens_and_wipes_them_later(tiny):
    model, processor = tiny("llava")
    lm = text_model(model)
    n_layers = len(lm.layers)
    twig = grow_twig(model, K=1, T=1)
    _, batch = batch_inputs(model, processor, range(50, 53))
    keep = 5 * torch.tensor(batch.segments)
    plan, pruning = ttp_plan(model, twig, keep, n_layers - 1)
    state = prefill(model, batch, plan, 4, twig, pruning)
    text = (batch.valid & ~batch.prunable).sum(dim=1)
    total = batch.valid.sum(dim=1)
    assert state.tokens_per_layer[:, 0].tolist() == total.tolist()  # layers 1..K: everything
    assert state.tokens_per_layer[:, 1].tolist() == (text + keep).tolist()  # K+1..K_f: text + R
    assert state.tokens_per_layer[:, -1].tolist() == text.tolist()  # after FinalWipe: text only
    assert state.visual_kept.tolist() == keep.tolist()
    assert state.twig_tokens.tolist() == total.tolist()  # the twig saw every token


@pytest.mark.parametrize("family", ["llava", "llava_next", "video_llava"])
def test_engine_ssd_equals_greedy_with_each_pruning(tiny, family):
    """Through the engine: decode_strategy=ssd gives greedy's text for none, vispruner, fastv and ttp,
    and prunes as greedy does (FastV inside SSD's base pass)."""
    model, processor = tiny(family)
    n_layers = len(text_model(model).layers)
    twig = grow_twig(model, K=1, T=n_layers - 1)
    requests = [Request(format_prompt(processor, "describe"), images=[random_image(s)]) for s in (60, 61, 62)]
    if family == "video_llava":
        requests.append(Request(format_prompt(processor, "what happens", "video"), video=random_video(63)))
    for method, budget in [("none", None), ("vispruner", 6), ("fastv", 6), ("ttp", 6)]:
        config = dict(budget=budget, max_new_tokens=14)
        greedy = Engine(model, processor, EngineConfig(method, **config), twig=twig).generate(requests)
        ssd_engine = Engine(model, processor, EngineConfig(method, **config, decode_strategy="ssd"), twig=twig)
        ssd = ssd_engine.generate(requests)
        assert [r.token_ids for r in ssd] == [r.token_ids for r in greedy], method
        assert [r.visual_tokens_kept for r in ssd] == [r.visual_tokens_kept for r in greedy], method
        assert all(r.drafted is not None and 0 <= r.accepted <= r.drafted for r in ssd)
        assert all(r.drafted is None for r in greedy)
        if method != "none":
            assert all(r.visual_tokens_kept < r.visual_tokens_total for r in ssd), method
        if method == "ttp":  # R at layer K; R-bar = (M K + R (K_f - K)) / L, as TwigVLM defines it
            wipe = ssd_engine.layer_plan.wipe_layer
            for r in greedy:
                assert r.visual_tokens_kept < r.visual_tokens_total
                expected = (r.visual_tokens_total * twig.K + r.visual_tokens_kept * (wipe - twig.K)) / n_layers
                assert r.visual_tokens_layer_mean == pytest.approx(expected)


def test_engine_refuses_ssd_without_a_twig(tiny):
    model, processor = tiny("llava")
    with pytest.raises(ValueError, match="need a trained twig"):
        Engine(model, processor, EngineConfig(decode_strategy="ssd"))


def test_rejection_sample_reproduces_the_target_distribution():
    """Tokens that come out of the accept/reject rule are distributed as p, whatever q drafted."""
    generator = torch.Generator().manual_seed(0)
    rows = 200_000
    p = torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05], [0.1, 0.1, 0.1, 0.1, 0.6]])  # after input 0, after draft 1
    q = torch.tensor([[0.05, 0.05, 0.3, 0.3, 0.3]])  # a poor draft distribution
    drafts = torch.multinomial(q.expand(rows, -1), 1, replacement=True, generator=generator)  # [N, 1]
    sampler = Sampler(temperature=1.0, generators=generator)
    accepted, bonus = rejection_sample(
        drafts, torch.ones(rows, dtype=torch.long), q.expand(rows, 1, -1), p.expand(rows, 2, -1), sampler
    )
    first = torch.where(accepted == 1, drafts[:, 0], bonus)  # the first token emitted
    frequencies = torch.bincount(first, minlength=5).float() / rows
    torch.testing.assert_close(frequencies, p[0], atol=0.004, rtol=0)
    expected_acceptance = torch.minimum(p[0], q[0]).sum()  # sum_x min(p, q)
    assert abs(accepted.float().mean() - expected_acceptance) < 0.004
    after_accept = torch.bincount(bonus[accepted == 1], minlength=5).float() / int((accepted == 1).sum())
    torch.testing.assert_close(after_accept, p[1], atol=0.01, rtol=0)


def test_sampling_with_an_exact_twig_accepts_every_draft(tiny):
    """When the twig is the rest of the base, q == p at every position, so min(1, p/q) = 1: any
    misalignment between draft and target positions would show up as rejections."""
    model, processor = tiny("llava")
    n_layers = len(text_model(model).layers)
    twig = grow_twig(model, K=1, T=n_layers - 1)
    inputs = batch_inputs(model, processor, range(70, 74))
    sampler = Sampler(temperature=0.8, generators=torch.Generator().manual_seed(3))
    generation = speculative(model, twig, inputs, max_new=16, max_draft=4, threshold=0.0, sampler=sampler)
    stats = generation.stats
    assert int(stats.drafted.sum()) > 0
    assert torch.equal(stats.accepted, stats.drafted)
    assert generation.lengths.tolist() == [16] * 4 or bool((generation.lengths <= 16).all())


def chi_square_two_sample(a: torch.Tensor, b: torch.Tensor) -> tuple[float, int]:
    """Chi-square statistic and degrees of freedom of a 2 x k contingency table of counts."""
    keep = (a + b) > 0
    table = torch.stack([a[keep], b[keep]]).double()
    expected = table.sum(1, keepdim=True) * table.sum(0, keepdim=True) / table.sum()
    return float(((table - expected) ** 2 / expected).sum()), int(keep.sum()) - 1


@pytest.mark.slow
def test_speculative_sampling_matches_base_sampling_end_to_end(tiny):
    """Second tokens sampled through SSD (random twig, partial acceptance) and by the base alone
    come from the same distribution: a two-sample chi-square test, bound at about 5 sigma."""
    model, processor = tiny("llava")
    twig = grow_twig(model, K=1, T=1)
    engine, batch = batch_inputs(model, processor, [5])
    rows = 2000
    expand = {
        name: getattr(batch, name).expand(rows, *getattr(batch, name).shape[1:]).contiguous()
        for name in ("embeds", "positions", "valid", "visual", "prunable")
    }
    many = (
        engine,
        replace(
            batch,
            **expand,
            media_spans=batch.media_spans * rows,
            segments=batch.segments * rows,
            visual_total=batch.visual_total * rows,
        ),
    )
    ar = reference(
        model, twig, many, max_new=3, eos=[-1], sampler=Sampler(0.7, generators=torch.Generator().manual_seed(1))
    )
    ssd = speculative(
        model,
        twig,
        many,
        max_new=3,
        eos=[-1],
        max_draft=1,
        threshold=0.0,
        sampler=Sampler(0.7, generators=torch.Generator().manual_seed(2)),
    )
    stats = ssd.stats
    assert 0 < int(stats.accepted.sum()) < int(stats.drafted.sum())  # both branches of the rule ran
    vocab = model.config.text_config.vocab_size
    for k in (1, 2):  # token 1: the draft or its replacement; token 2: the bonus
        statistic, dof = chi_square_two_sample(
            torch.bincount(ar.tokens[:, k], minlength=vocab), torch.bincount(ssd.tokens[:, k], minlength=vocab)
        )
        assert statistic < dof + 5 * (2 * dof) ** 0.5, (k, statistic, dof)


def test_twig_layers_count_in_prefill_flops_and_kv_bytes(tiny):
    """The twig's T layers run over the whole prompt in TTP and SSD: their FLOPs and cache are counted."""
    model, processor = tiny("llava")
    twig = grow_twig(model, K=1, T=2)
    requests = [
        Request(format_prompt(processor, q), images=[random_image(s)]) for s, q in ((80, "describe"), (81, "a ?"))
    ]
    config = dict(budget=6, max_new_tokens=3)
    greedy = Engine(model, processor, EngineConfig("vispruner", **config)).generate(requests)
    ssd_engine = Engine(model, processor, EngineConfig("vispruner", **config, decode_strategy="ssd"), twig=twig)
    ssd = ssd_engine.generate(requests)
    text_config = model.config.text_config
    for request, g, s in zip(requests, greedy, ssd, strict=True):
        prompt = int(ssd_engine.prompt_batch([request]).valid.sum())  # tokens the twig's layers saw
        per_layer = transformer_layer_flops(prompt, text_config.hidden_size, text_config.intermediate_size)
        assert s.prefill_flops - g.prefill_flops == pytest.approx(2 * per_layer, rel=1e-9)
        assert s.kv_cache_bytes - g.kv_cache_bytes == 2 * prompt * (2 * 2 * 16 * 4)  # K and V, 2 kv heads x 16, fp32
