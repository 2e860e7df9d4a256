"""training.self_instruct (Magpie): requests sampled from a tiny chat model after its template's user
header are finished turns, filtered, new (the held-out file's excluded), seeded, and resumed from
their JSONL; jobs/bench_twig_lm.py puts them first in its training data."""

import json

import pytest
import torch
from torch import nn

from evaluation.bench_twig_lm import main
from tests.test_bench_twig_lm import PROMPTS, _prompts_file, _saved_base
from tests.tiny_models import tiny_llama
from training import self_instruct
from training.self_instruct import acceptable, normalise, query_prefix, sample_requests


def _chatty_model(seed: int = 0):
    """A tiny chat model whose head favours EOS a little, so sampled turns end after a few words, and
    never says the tokenizer's filler words (``w15``: digits, which the filter rejects)."""
    model, tokenizer = tiny_llama(seed=seed)
    old = model.lm_head
    head = nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(old.weight)
        head.bias.zero_()
        for token, index in tokenizer.get_vocab().items():
            if any(ch.isdigit() for ch in token):
                head.bias[index] = -30.0
        head.bias[tokenizer.eos_token_id] = 3.0
    model.lm_head = head
    return model, tokenizer


def test_the_query_prefix_is_the_template_up_to_the_users_words():
    _, tokenizer = tiny_llama()
    assert query_prefix(tokenizer) == "USER : "
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}{% endfor %}"  # drops the content
    with pytest.raises(ValueError, match="verbatim"):
        query_prefix(tokenizer)


def test_acceptable_requests_have_words_and_letters():
    assert acceptable("How do I plan a trip to Japan?")
    assert not acceptable("Hi there")  # too few words
    assert not acceptable("1 2 3 4 5 6 7 8 9 10 11")  # numbers, not a request
    assert not acceptable("это просто длинный текст на другом языке")  # not the held-out file's language
    assert not acceptable("word " * 200)  # too long
    assert normalise("How do I, plan a TRIP?") == normalise("how do i plan a trip")


def test_sampled_requests_end_their_turn_are_new_seeded_and_resume(tmp_path):
    model, tokenizer = _chatty_model()
    kwargs = dict(batch=8, max_tokens=24, temperature=1.5, top_p=1.0, log=lambda _: None)
    path = tmp_path / "self.jsonl"
    first = sample_requests(model, tokenizer, 5, seed=3, path=path, **kwargs)
    assert len(first) == 5 and all(r["source"] == "self" and acceptable(r["text"]) for r in first)
    assert len({normalise(r["text"]) for r in first}) == 5
    saved = [json.loads(line) for line in path.read_text().splitlines()]
    assert saved[:5] == first  # and the rest of the last batch's, for a rerun that asks more
    # Seeded per row: the same seed draws the same requests without a file.
    assert sample_requests(model, tokenizer, 5, seed=3, **kwargs) == first
    # Resumed: the kept ones are read back first and the run goes on to n.
    more = sample_requests(model, tokenizer, 8, seed=3, path=path, **kwargs)
    assert more[:5] == first and len(more) == 8 and len({normalise(r["text"]) for r in more}) == 8
    # An excluded instruction (the held-out file) never comes out, even when drawn.
    again = sample_requests(model, tokenizer, 5, seed=3, exclude=[first[0]["text"].upper()], **kwargs)
    assert first[0] not in again and again[:4] == first[1:5]


def test_a_model_that_never_ends_its_turn_stops_after_max_draws():
    model, tokenizer = _chatty_model(seed=1)
    with torch.no_grad():  # EOS can never win
        model.lm_head.bias[tokenizer.eos_token_id] = -1e4
    notes = []
    kept = sample_requests(model, tokenizer, 3, batch=4, max_tokens=6, temperature=1.0, max_draws=8, log=notes.append)
    assert kept == [] and "stopping with 0 after 8 draws" in notes[-1]


def test_training_mode_trains_on_self_written_requests_first(tmp_path, monkeypatch):
    _, _, cache = _saved_base(tmp_path, seed=7)
    calls = {}

    def written(model, tokenizer, n, seed, batch, exclude, path, log):
        calls.update(n=n, exclude=list(exclude), path=path)
        return [{"text": f"Please tell me about topic number {i} today.", "source": "self"} for i in range(n)]

    monkeypatch.setattr(self_instruct, "sample_requests", written)
    out = tmp_path / "run"
    argv = ["--cache", str(cache), "--out", str(out), "--prompts", str(_prompts_file(tmp_path))]
    argv += ["--self-instructions", "3", "--instructions", "6", "--validation", "2", "--reply-tokens", "4"]
    argv += ["--data-batch", "3", "--steps", "1", "--batch-size", "4", "--K", "2", "--T", "1", "--draft-vocab", "16"]
    argv += ["--batch", "2", "--max-new-tokens", "4"]
    assert main(argv) == 0
    assert calls["n"] == 3 and calls["exclude"] == PROMPTS and calls["path"] == out / "self_instructions.jsonl"
    replies = [json.loads(line) for line in (out / "replies.jsonl").read_text().splitlines()]
    assert len(replies) == 9 and sum(r["source"] == "self" for r in replies) == 3
    report = json.loads((out / "twig" / "training_report.json").read_text())
    assert report["sources"]["self"] == 3 and report["instructions"] == 7  # 9 less 2 for validation
