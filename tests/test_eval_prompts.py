"""training.eval_prompts on a small wheel-shaped zip built here: canaries, skipped evals, the English
filter, the per-eval cap and determinism; and, when `make smollm2` has downloaded the real wheel,
that none of its requests is in the held-out file."""

from __future__ import annotations

import json
import zipfile

import pytest

from evaluation.bench_twig_lm import DEFAULT_PROMPTS
from training.eval_prompts import EVALS_WHEEL, WHEEL_DIR, evals_prompts
from training.instructions import read_prompts


def _samples(user_turns: list[str]) -> str:
    lines = []
    for text in user_turns:
        record = {"input": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}]}
        lines.append(json.dumps({**record, "ideal": "x"}))
    return "\n".join(lines) + "\n"


@pytest.fixture
def wheel(tmp_path):
    path = tmp_path / EVALS_WHEEL
    with zipfile.ZipFile(path, "w") as z:
        recipes = [f"Suggest a quick dinner with {food} for two people." for food in ("rice", "beans", "eggs", "kale")]
        z.writestr("evals/registry/data/recipes/samples.jsonl", _samples(recipes))
        z.writestr("evals/registry/data/recipes/more.jsonl", _samples(["How long should I boil an egg?"]))
        z.writestr("evals/registry/data/travel/a.jsonl", _samples(["What should I pack for a week in Oslo?"]))
        # One file of an eval with a canary rules out all of it.
        z.writestr("evals/registry/data/secret/a.jsonl", _samples(["Tell me about the moon landing please."]))
        z.writestr("evals/registry/data/secret/b.jsonl", "canary GUID 1234\n" + _samples(["Is it cold on Mars?"]))
        z.writestr("evals/registry/data/vigenere_hard/a.jsonl", _samples(["Decode this message with key AB."]))
        z.writestr(
            "evals/registry/data/mixed/a.jsonl",
            _samples(["日本の首都はどこですか", "ok", "x" * 500, "What is the capital of Peru, briefly?"]),
        )
        z.writestr("evals/registry/data/recipes/notes.txt", "not a sample file")
    return path


def test_requests_come_from_allowed_evals_filtered_and_capped(wheel):
    prompts = evals_prompts(wheel, per_eval=3, seed=0)
    texts = [p["text"] for p in prompts]
    assert all(p["source"] == "openai-evals" for p in prompts)
    assert len(texts) == len(set(texts))
    recipes = [t for t in texts if "dinner" in t or "egg" in t]
    assert len(recipes) == 3  # 5 requests in that eval's two files, capped at 3
    assert "What should I pack for a week in Oslo?" in texts
    assert "What is the capital of Peru, briefly?" in texts  # the non-English, short and long ones are not
    assert not any("moon" in t or "Mars" in t for t in texts)  # the canary eval, both files
    assert not any("Decode" in t for t in texts)  # a cipher eval
    assert len(texts) == 5
    assert evals_prompts(wheel, per_eval=3, seed=0) == prompts
    assert {p["text"] for p in evals_prompts(wheel, per_eval=10, seed=1)} >= set(texts)


def test_a_missing_wheel_names_the_make_target(tmp_path):
    with pytest.raises(FileNotFoundError, match="make smollm2"):
        evals_prompts(tmp_path / EVALS_WHEEL)


@pytest.mark.skipif(not (WHEEL_DIR / EVALS_WHEEL).exists(), reason="the evals wheel is downloaded by `make smollm2`")
def test_the_real_wheels_requests_miss_the_held_out_file():
    prompts = {p["text"].lower() for p in evals_prompts(WHEEL_DIR / EVALS_WHEEL, per_eval=25, seed=0)}
    assert len(prompts) > 1000
    held = {p.lower() for p in read_prompts(DEFAULT_PROMPTS)}
    assert not prompts & held
