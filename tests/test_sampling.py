"""Sampling as users reach it: decode.temperature / top_k / top_p / seed in the job config, through
Config.to_engine_config() and the engine. Speculative sampling (decode.strategy=ssd) must give the
distribution of sampling the base alone."""

from __future__ import annotations

import pytest
import torch

from operators.decoding.sampling import Sampler, row_seed
from operators.engine import Engine, Request, format_prompt
from operators.twig import grow_twig
from pipeline.config import load_config
from tests.conftest import random_image
from tests.tiny_models import tiny_llava


@pytest.fixture(scope="module")
def never_stopping_llava():
    """A tiny LLaVA whose EOS never comes, so every row samples every position."""
    model, processor = tiny_llava(seed=0)
    model.generation_config.eos_token_id = -1
    return model, processor, grow_twig(model, K=1, T=1)


def engine_from_job_config(model, processor, twig, *overrides: str) -> Engine:
    config = load_config(None, ["decode.twig=unused-here", "decode.max_new_tokens=3", *overrides])
    return Engine(model, processor, config.to_engine_config(), twig=twig)


def requests(processor, rows: int, image_seed: int = 5) -> list[Request]:
    image = random_image(image_seed)
    prompt = format_prompt(processor, "describe")
    return [Request(prompt, images=[image], media_key="one", sample_key=f"item-{i}") for i in range(rows)]


def chi_square_two_sample(a: torch.Tensor, b: torch.Tensor) -> tuple[float, int]:
    """Chi-square statistic and degrees of freedom of a 2 x k contingency table of counts."""
    keep = (a + b) > 0
    table = torch.stack([a[keep], b[keep]]).double()
    expected = table.sum(1, keepdim=True) * table.sum(0, keepdim=True) / table.sum()
    return float(((table - expected) ** 2 / expected).sum()), int(keep.sum()) - 1


def test_sampled_ssd_and_sampled_greedy_give_the_same_distribution(never_stopping_llava):
    """700 items sampled with decode.strategy=greedy and with ssd (a random twig: drafts are accepted
    sometimes, rejected sometimes): tokens 2 and 3 (the draft or its replacement, then the bonus) have
    the same distribution by a two-sample chi-square test, at a p-value floor of 1e-4."""
    model, processor, twig = never_stopping_llava
    rows = 700
    settings = ["decode.temperature=1.0", "decode.top_k=5", "decode.seed=11"]
    greedy = engine_from_job_config(model, processor, twig, "decode.strategy=greedy", *settings)
    ssd = engine_from_job_config(
        model, processor, twig, "decode.strategy=ssd", "decode.max_draft=1", "decode.draft_threshold=0", *settings
    )
    assert ssd.config.sampling and ssd.config.decode_strategy == "ssd"
    plain = greedy.generate(requests(processor, rows))
    speculative = ssd.generate(requests(processor, rows))
    drafted = sum(r.drafted for r in speculative)
    accepted = sum(r.accepted for r in speculative)
    assert 0 < accepted < drafted  # both branches of the accept/reject rule ran
    vocab = model.config.text_config.vocab_size
    for position in (1, 2):
        a = torch.bincount(torch.tensor([r.token_ids[position] for r in plain]), minlength=vocab)
        b = torch.bincount(torch.tensor([r.token_ids[position] for r in speculative]), minlength=vocab)
        statistic, dof = chi_square_two_sample(a, b)
        p_value = float(torch.special.gammaincc(torch.tensor(dof / 2.0), torch.tensor(statistic / 2.0)))
        assert p_value > 1e-4, (position, statistic, dof)
        assert dof >= 4  # really a distribution, not a point mass


def test_a_rows_sample_depends_on_its_key_and_seed_not_its_batch(never_stopping_llava):
    model, processor, twig = never_stopping_llava
    for strategy in ("greedy", "ssd"):
        engine = engine_from_job_config(
            model, processor, twig, f"decode.strategy={strategy}", "decode.temperature=1.0", "decode.seed=3"
        )
        batch = [r.token_ids for r in engine.generate(requests(processor, 6))]
        alone = [engine.generate([request])[0].token_ids for request in requests(processor, 6)[::-1]][::-1]
        assert batch == alone, strategy
        assert len({tuple(t) for t in batch}) > 1  # different items sample differently
    reseeded = engine_from_job_config(model, processor, twig, "decode.temperature=1.0", "decode.seed=4")
    again = engine_from_job_config(model, processor, twig, "decode.temperature=1.0", "decode.seed=3")
    first = [r.token_ids for r in again.generate(requests(processor, 6))]
    assert [r.token_ids for r in reseeded.generate(requests(processor, 6))] != first


def test_temperature_zero_is_greedy_whatever_the_sampling_keys(never_stopping_llava):
    model, processor, twig = never_stopping_llava
    plain = engine_from_job_config(model, processor, twig)
    keyed = engine_from_job_config(model, processor, twig, "decode.top_k=2", "decode.top_p=0.5", "decode.seed=9")
    assert [r.token_ids for r in keyed.generate(requests(processor, 3))] == [
        r.token_ids for r in plain.generate(requests(processor, 3))
    ]
    fingerprints = {
        load_config(None, overrides).fingerprint()
        for overrides in ([], ["decode.top_k=2", "decode.seed=9"], ["decode.temperature=0"])
    }
    assert len(fingerprints) == 1  # at temperature 0 the sampling keys change no output, nor the fingerprint
    assert load_config(None, ["decode.temperature=0.7"]).fingerprint() not in fingerprints


def test_top_k_and_top_p_shape_the_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    torch.testing.assert_close(Sampler(1.0).probs(logits), logits.exp())
    torch.testing.assert_close(Sampler(1.0, top_k=2).probs(logits), torch.tensor([[5 / 7, 2 / 7, 0.0, 0.0, 0.0]]))
    # top_p 0.6: 0.5 alone is short of 0.6, 0.5 + 0.2 reaches it: the first two stay
    torch.testing.assert_close(Sampler(1.0, top_p=0.6).probs(logits), torch.tensor([[5 / 7, 2 / 7, 0.0, 0.0, 0.0]]))
    torch.testing.assert_close(Sampler(1.0, top_p=0.1).probs(logits), torch.tensor([[1.0, 0.0, 0.0, 0.0, 0.0]]))
    sharp = Sampler(0.5).probs(logits)
    assert sharp[0, 0] > 0.5 and torch.isclose(sharp.sum(), torch.tensor(1.0))
    assert row_seed(0, "a") == row_seed(0, "a") != row_seed(1, "a") != row_seed(0, "b")
