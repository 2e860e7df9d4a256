"""jobs/bench_twig_lm.py on a tiny text-only Llama: the engine's greedy decoding and SSD work on a
*ForCausalLM, SSD's output equals greedy's, and train_twig's labelling and loop run on chat text."""

import json
import math
import re
import zipfile
from collections import Counter

import pytest
import torch

from evaluation.bench_twig_lm import (
    DEFAULT_PROMPTS,
    TextProcessor,
    compare,
    engine_inputs,
    extend_to_replies,
    greedy_decode,
    greedy_replies,
    half_twig,
    main,
    prompt_batch,
    restrict_to_replies,
)
from operators.twig import grow_twig, load_twig, restrict_vocab, save_twig
from tests.tiny_models import tiny_llama
from training import instructions
from training.eval_prompts import EVALS_WHEEL
from training.instructions import read_prompts
from training.train_twig import IGNORE, Conversation, TwigTrainConfig, encode, train_twig

PROMPTS = ["what shape is the red circle ?", "describe the picture .", "where is the blue square ?", "is there a cat ?"]


def test_greedy_on_a_causal_lm_equals_hugging_face_generate():
    model, tokenizer = tiny_llama(seed=1)
    ids, mask = prompt_batch(tokenizer, PROMPTS[:3])
    ours = greedy_decode(model, engine_inputs(model, ids, mask), 10, tokenizer.eos_token_id, tokenizer.pad_token_id)
    theirs = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False)[:, ids.shape[1] :]
    for row in range(3):
        n = int(ours.lengths[row])
        assert ours.tokens[row, :n].tolist() == theirs[row, :n].tolist()


def test_ssd_equals_greedy_on_a_causal_lm_at_batch_1_and_3():
    model, tokenizer = tiny_llama(seed=2, num_hidden_layers=6)
    twig = grow_twig(model, K=2, T=1)
    with torch.no_grad():  # a twig that agrees with the base only sometimes
        for p in twig.layers.parameters():
            p.add_(0.05 * torch.randn_like(p))
    rows = compare(model, twig, tokenizer, PROMPTS, [1, 3], max_new_tokens=16, label="noisy")
    assert [r["batch"] for r in rows] == [1, 3]
    assert all(r["identical"] for r in rows)
    assert all(r["generated"] > len(PROMPTS) and 0.0 <= r["acceptance"] <= 1.0 for r in rows)


def test_chat_text_is_labelled_on_the_reply_and_the_twig_trains():
    model, tokenizer = tiny_llama(seed=3)
    processor = TextProcessor(tokenizer)
    replies = greedy_replies(model, tokenizer, PROMPTS, max_new_tokens=8, batch=2)
    conversations = [Conversation(f"c{n}", [(p, r)]) for n, (p, r) in enumerate(zip(PROMPTS, replies, strict=True))]
    encoded = encode(processor, Conversation("x", [("what shape is the red circle ?", "a red circle")]))
    labelled = encoded.labels[encoded.labels != IGNORE].tolist()
    assert tokenizer.decode(labelled) == "a red circle </s>"
    twig = grow_twig(model, K=1, T=1)
    before = [p.detach().clone() for p in twig.parameters()]
    result = train_twig(
        model,
        processor,
        twig,
        conversations,
        TwigTrainConfig(K=1, T=1, steps=2, batch_size=2, warmup=1),
        log=lambda _: None,
    )
    assert math.isfinite(result["final_loss"]) and result["answer_tokens"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, twig.parameters(), strict=True))


def test_a_draft_vocabulary_from_the_base_replies_keeps_ssd_identical():
    """--draft-vocab: the head keeps the replies' most frequent tokens (EOS too); SSD is still greedy."""
    model, tokenizer = tiny_llama(seed=2, num_hidden_layers=6)
    processor = TextProcessor(tokenizer)
    replies = greedy_replies(model, tokenizer, PROMPTS, max_new_tokens=8, batch=4)
    conversations = [Conversation(f"c{n}", [(p, r)]) for n, (p, r) in enumerate(zip(PROMPTS, replies, strict=True))]
    twig = grow_twig(model, K=2, T=4)  # the rest of the base: drafts fail only off the vocabulary
    report = restrict_to_replies(twig, processor, conversations, 6)
    assert report["size"] == 6 == twig.head.out_features and 0 < report["coverage"] <= 1
    assert tokenizer.eos_token_id in twig.draft_vocab.tolist()
    rows = compare(model, twig, tokenizer, PROMPTS, [1, 3], max_new_tokens=12, label="small vocab")
    assert all(r["identical"] for r in rows)


def test_a_widened_draft_vocabulary_takes_the_replies_missing_tokens_and_keeps_ssd_identical():
    """--draft-vocab above an --init-twig's size: the most frequent reply tokens it lacks join its head."""
    model, tokenizer = tiny_llama(seed=2, num_hidden_layers=6)
    processor = TextProcessor(tokenizer)
    replies = greedy_replies(model, tokenizer, PROMPTS, max_new_tokens=8, batch=4)
    conversations = [Conversation(f"c{n}", [(p, r)]) for n, (p, r) in enumerate(zip(PROMPTS, replies, strict=True))]
    twig = grow_twig(model, K=2, T=4)
    restrict_to_replies(twig, processor, conversations, 3)
    small = twig.draft_vocab.tolist()
    held = [encode(processor, c) for c in conversations[:2]]
    report = extend_to_replies(model, twig, processor, conversations, 8, held)
    wide = twig.draft_vocab.tolist()
    assert wide[:3] == small and len(wide) == report["size"] == twig.head.out_features
    labels = torch.cat([encode(processor, c).labels for c in conversations])
    counts = Counter(labels[labels != IGNORE].tolist())
    seen = [t for t in sorted(counts, key=lambda t: (-counts[t], t)) if t not in small]
    unseen = [t for t in range(twig.vocab_size) if t not in counts and t not in small]
    assert wide[3:] == (seen + unseen)[:5]  # the most frequent missing ones, then unseen ones by id
    assert (
        report["coverage"] >= report["coverage_before"]
        and report["heldout_coverage"] >= report["heldout_coverage_before"]
    )
    rows = compare(model, twig, tokenizer, PROMPTS, [1, 3], max_new_tokens=12, label="widened vocab")
    assert all(r["identical"] for r in rows)


def _normalised(text: str) -> str:
    return re.sub(r"[^a-z0-9 ]", "", text.lower()).strip()


def test_training_instructions_are_varied_unique_deterministic_and_miss_the_held_out_file():
    records = instructions.build(3000, seed=0)
    texts = [r["text"] for r in records]
    assert len(set(texts)) == len(texts) == 3000
    sources = Counter(r["source"] for r in records)
    assert set(sources) == {"chatterbot", "humaneval", "request", "edit", "arithmetic"}
    assert sources["humaneval"] == 164 and sources["chatterbot"] > 500  # every package prompt is used
    assert len({t.split()[0] for t in texts}) > 100  # not a handful of templates
    assert instructions.build(3000, seed=0) == records
    held = read_prompts(DEFAULT_PROMPTS)
    assert len(held) >= 60
    assert not {_normalised(t) for t in texts} & {_normalised(h) for h in held}


def test_read_prompts_skips_comments_and_blank_lines(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("# a comment\n\nfirst line\n  second\\nline  \n")
    assert read_prompts(path) == ["first line", "second\nline"]


def _saved_base(tmp_path, seed: int = 2):
    model, tokenizer = tiny_llama(seed=seed, num_hidden_layers=6)
    cache = tmp_path / "base"
    model.save_pretrained(cache)
    tokenizer.save_pretrained(cache)
    return model, tokenizer, cache


def _prompts_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# held out\n" + "\n".join(PROMPTS) + "\n")
    return path


def test_eval_only_prints_one_json_line_per_batch_with_the_issue_fields(tmp_path, capsys):
    model, tokenizer, cache = _saved_base(tmp_path)
    twig = grow_twig(model, K=2, T=1)
    with torch.no_grad():  # a twig that agrees with the base only sometimes
        for p in twig.layers.parameters():
            p.add_(0.05 * torch.randn_like(p))
    restrict_vocab(twig, torch.arange(len(tokenizer) - 8))
    save_twig(half_twig(twig), tmp_path / "twig", model)
    argv = ["--eval-only", "--cache", str(cache), "--twig", str(tmp_path / "twig"), "--prompts"]
    argv += [str(_prompts_file(tmp_path)), "--batch", "1", "3", "--max-new-tokens", "10", "--json"]
    assert main(argv) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["batch"] for r in rows] == [1, 3]
    for row in rows:
        assert row["identical"] == 1.0 and row["prompts"] == len(PROMPTS)
        assert 0.0 <= row["acceptance"] <= 1.0 and row["tokens_per_round"] >= 1.0
        assert row["speedup"] > 0 and row["draft_cost"] > 0 and row["draft_vocab"] == len(tokenizer) - 8
        assert row["base_features"] is False
        assert row["speedup"] == pytest.approx(row["ssd_tokens_per_s"] / row["greedy_tokens_per_s"], rel=0.01)


def test_eval_only_sampled_reports_speed_and_acceptance(tmp_path, capsys):
    model, tokenizer, cache = _saved_base(tmp_path, seed=4)
    save_twig(half_twig(grow_twig(model, K=2, T=2)), tmp_path / "twig", model)
    argv = ["--eval-only", "--cache", str(cache), "--twig", str(tmp_path / "twig"), "--prompts"]
    argv += [str(_prompts_file(tmp_path)), "--batch", "2", "--max-new-tokens", "8", "--temperature", "0.7", "--json"]
    assert main(argv) == 0
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert (
        row["temperature"] == 0.7
        and row["identical"] is None
        and row["sampling_tokens_per_s"] > 0
        and 0.0 <= row["acceptance"] <= 1.0
    )


def test_eval_only_without_a_twig_is_one_line_and_exit_2(tmp_path, capsys):
    _, _, cache = _saved_base(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["--eval-only", "--cache", str(cache), "--twig", str(tmp_path / "nothing")])
    assert exit_info.value.code == 2
    assert "holds no twig" in capsys.readouterr().err


def test_training_mode_distils_saves_a_bf16_twig_with_its_report_and_evaluates_it(tmp_path):
    model, tokenizer, cache = _saved_base(tmp_path, seed=5)
    out = tmp_path / "run"
    argv = ["--cache", str(cache), "--out", str(out), "--prompts", str(_prompts_file(tmp_path))]
    argv += [
        "--instructions",
        "14",
        "--validation",
        "2",
        "--reply-tokens",
        "6",
        "--data-batch",
        "6",
        "--steps",
        "2",
        "--batch-size",
        "4",
    ]
    argv += ["--K", "2", "--T", "1", "--draft-vocab", "16", "--batch", "2", "--max-new-tokens", "6"]
    assert main(argv) == 0
    replies = [json.loads(line) for line in (out / "replies.jsonl").read_text().splitlines()]
    assert len(replies) == 14 and all({"text", "source", "reply"} <= set(r) for r in replies)
    config = json.loads((out / "twig" / "twig.json").read_text())
    assert config["dtype"] == "bfloat16" and config["draft_vocab"] == 16 and config["K"] == 2
    report = json.loads((out / "twig" / "training_report.json").read_text())
    assert (
        report["training"]["steps"] == 2
        and report["instructions"] == 12
        and len(read_prompts(out / "validation_prompts.txt")) == 2
        and report["agreement"]["trained"] >= 0
    )
    twig = load_twig(out / "twig", model)
    assert next(twig.parameters()).dtype == torch.float32 and twig.head.out_features == 16
    result = json.loads((out / "twig_lm.json").read_text())["results"]
    assert [r["batch"] for r in result] == [2] and result[0]["identical"] == 1.0


def test_training_mode_goes_on_from_a_saved_twig_with_base_features(tmp_path, capsys):
    model, tokenizer, cache = _saved_base(tmp_path, seed=6)
    common = ["--cache", str(cache), "--prompts", str(_prompts_file(tmp_path)), "--instructions", "10"]
    common += ["--validation", "2", "--reply-tokens", "6", "--data-batch", "5", "--batch-size", "4"]
    common += ["--batch", "2", "--max-new-tokens", "6", "--data", str(tmp_path / "replies.jsonl")]
    first = tmp_path / "first"
    with pytest.raises(SystemExit) as missing:  # --evals-prompts without the wheel: one line, exit 2
        main([*common, "--out", str(first), "--evals-prompts", "2", "--wheel-dir", str(tmp_path / "none")])
    assert missing.value.code == 2
    wheel_dir = tmp_path / "wheels"
    wheel_dir.mkdir()
    with zipfile.ZipFile(wheel_dir / EVALS_WHEEL, "w") as z:
        for name in ("alpha", "beta"):
            lines = [{"input": [{"role": "user", "content": f"Please say {w} about {name} now."}]} for w in "xyz"]
            z.writestr(f"evals/registry/data/{name}/s.jsonl", "\n".join(json.dumps(r) for r in lines))
    evals = ["--evals-prompts", "2", "--wheel-dir", str(wheel_dir)]
    argv = [*common, "--out", str(first), "--steps", "1", "--K", "2", "--T", "1", "--draft-vocab", "8", *evals]
    assert main(argv) == 0
    replies = [json.loads(line) for line in (tmp_path / "replies.jsonl").read_text().splitlines()]
    assert sum(r["source"] == "openai-evals" for r in replies) == 4  # 2 per eval, before the 10 others
    assert len(replies) == 14
    second = tmp_path / "second"
    argv = [*common, "--out", str(second), "--steps", "2", "--data-only", "--init-twig", str(first / "twig")]
    argv += ["--draft-vocab", "20"]  # wider than the first twig's 8: its head gains the replies' next tokens
    with pytest.raises(SystemExit) as bad:  # every position without features would train nothing new
        main([*argv, "--base-features", "--feature-drop", "1.0"])
    assert bad.value.code == 2
    assert main([*argv, "--base-features", "--feature-drop", "0.5"]) == 0
    config = json.loads((second / "twig" / "twig.json").read_text())
    report = json.loads((second / "twig" / "training_report.json").read_text())
    # K, T and the first 8 draft tokens come from the first twig; the feature input is new and trained.
    widened = report["draft_vocab"]
    assert widened["extended_from"] == 8 and widened["size"] == 20 == config["draft_vocab"]
    assert config["base_features"] is True and (config["K"], config["T"]) == (2, 1)
    assert report["init_twig"] == str(first / "twig") and report["feature_drop"] == 0.5
    assert set(report["agreement"]["trained"]) == {"with_base_features", "without"}
    twig = load_twig(second / "twig", model)
    assert twig.base_features and bool(twig.feature_in.weight.abs().sum() > 0)
    assert json.loads((second / "twig_lm.json").read_text())["results"][0]["identical"] == 1.0
    capsys.readouterr()
    argv = ["--eval-only", "--cache", str(cache), "--twig", str(second / "twig"), "--prompts"]
    assert main([*argv, str(_prompts_file(tmp_path)), "--batch", "2", "--max-new-tokens", "8", "--json"]) == 0
    row = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert row["base_features"] is True and row["identical"] == 1.0
