"""The job's command lines: ``caption`` (jobs/caption.py, console script ``vlm-caption``) and ``videoqa``
(jobs/videoqa.py, ``vlm-videoqa``). Each prints its own usage text below with ``--help``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipeline.config import Config, ConfigError, load_config

CAPTION_USAGE = """Caption images and videos, or answer questions about them, into Parquet.

    python jobs/caption.py --config configs/demo.yaml [--input URI] [--output URI] [key=value ...]
    ray job submit --working-dir . -- python jobs/caption.py --config configs/X.yaml ...

Overrides are dotted config keys, e.g. ``pruning.method=vispruner pruning.budget=64 task=qa``.
The config, the input, the output and the model are checked before any cluster work; a problem
exits with status 2 and one message naming it. Rerunning the same command skips items already
written for the same config, so a killed or scheduled run just picks up where it stopped.
"""

VIDEOQA_USAGE = """Answer the questions of a VideoQA annotation file and score them.

    python jobs/videoqa.py --config configs/shapes-qa.yaml [--input ANNOTATIONS] [--output URI] \\
        [--baseline URI] [--predictions FILE.jsonl] [key=value ...]

Runs the caption job with ``task=qa`` (resumable like it), then reads this config's rows back
and prints normalised exact-match accuracy per question type. With ``--baseline`` (the output of
an unpruned run; it may be the same output prefix), it also prints RelAcc: the mean over
question types of accuracy ÷ the unpruned accuracy. ``--predictions`` writes Video-LLaVA's
``{"id", "question", "answer", "pred"}`` JSON lines.
"""


def parse_args(
    argv: list[str] | None, description: str = CAPTION_USAGE, parents: tuple[argparse.ArgumentParser, ...] = ()
) -> tuple[Config, argparse.Namespace]:
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter, parents=list(parents)
    )
    parser.add_argument("--config", help="YAML config (see configs/)")
    parser.add_argument("--input", help="input URI: prefix/directory, manifest or annotation file (input.uri)")
    parser.add_argument("--output", help="output directory or prefix for Parquet parts (output.uri)")
    parser.add_argument("--show", type=int, default=0, metavar="N", help="print N rows of this config's output")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    args = parser.parse_args(argv)
    overrides = list(args.overrides)
    if args.input:
        overrides.append(f"input.uri={args.input}")
    if args.output:
        overrides.append(f"output.uri={args.output}")
    # Values are YAML-parsed; URIs must stay strings even if they look like numbers.
    overrides = [_quote_uri(o) for o in overrides]
    return load_config(args.config, overrides), args


def _quote_uri(text: str) -> str:
    key, _, value = text.partition("=")
    if key.strip() in ("input.uri", "output.uri", "model.path", "input.media_prefix", "input.answers_uri"):
        escaped = value.replace("'", "''")
        return f"{key}='{escaped}'"
    return text


def caption_main(argv: list[str] | None = None) -> int:
    from pipeline.run import main_exit_code, run
    from pipeline.sources import SourceError

    try:
        config, args = parse_args(argv)
        summary = run(config)
    except (ConfigError, SourceError, PermissionError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.show:
        show_rows(config, args.show)
    return main_exit_code(summary)


def show_rows(config: Config, count: int) -> None:
    """A few rows of this config's output, and how to query all of it."""
    from pipeline.output import read_output
    from pipeline.run import options_for

    rows = [
        r
        for r in read_output(config.output.uri, options_for(config.output.uri, config)).to_pylist()
        if r["config_fingerprint"] == config.fingerprint()
    ]
    rows.sort(key=lambda r: (r["status"] != "ok", r["item_id"]))
    for r in rows[:count]:
        detail = r["text"] if r["status"] == "ok" else f"{r['error_kind']}: {r['error']}"
        tokens = f"{r['visual_tokens_kept']}/{r['visual_tokens_total']} visual tokens"
        print(f"\n{r['item_id']} [{r['media_type']}, {tokens}]")
        print(f"  {detail}")
    if "://" not in config.output.uri:
        query = f"SELECT status, count(*) FROM '{config.output.uri}/*.parquet' GROUP BY status"
        print(f'\nquery it: python -c "import duckdb; duckdb.sql(\\"{query}\\").show()"')


# --- videoqa: the caption job with task=qa, then scored


def rows_for(output: str, fingerprint: str, config: Config) -> list[dict]:
    from pipeline.output import read_output
    from pipeline.run import options_for

    table = read_output(output, options_for(output, config))
    return [r for r in table.to_pylist() if r["config_fingerprint"] == fingerprint]


def unpruned_fingerprint(config: Config) -> str:
    """The fingerprint the same config has with pruning off: how a baseline's rows are found."""
    baseline = config.model_copy(deep=True)
    baseline.pruning.method = "none"
    baseline.pruning.budget = None
    return baseline.fingerprint()


def score(rows: list[dict]) -> dict[str, float]:
    from evaluation.scoring import accuracy_by_type, is_correct

    return accuracy_by_type((r["question_type"] or "all", is_correct(r["text"], r["answer"])) for r in rows)


def videoqa_main(argv: list[str] | None = None) -> int:
    from evaluation.scoring import relative_accuracy
    from pipeline.run import main_exit_code, run
    from pipeline.sources import SourceError

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--baseline", help="output URI of an unpruned run of the same config")
    parser.add_argument("--predictions", type=Path, help="write Video-LLaVA-style prediction JSON lines here")
    extra, rest = parser.parse_known_args(argv)
    try:
        config, _ = parse_args([*rest, "task=qa"], VIDEOQA_USAGE, parents=(parser,))
        summary = run(config)
    except (ConfigError, SourceError, PermissionError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows = rows_for(config.output.uri, config.fingerprint(), config)
    unanswerable = [r for r in rows if r["answer"] is None]
    if unanswerable:
        print(f"{len(unanswerable)} rows have no reference answer; they are not scored")
    scored = [r for r in rows if r["answer"] is not None]
    accuracy = score(scored)
    print(f"\naccuracy ({len(scored)} questions, {sum(r['status'] != 'ok' for r in scored)} in error count as wrong):")
    for qtype, value in accuracy.items():
        print(f"  {qtype:<12} {value:.3f}")
    report = {"config_fingerprint": config.fingerprint(), "questions": len(scored), "accuracy": accuracy}
    if extra.baseline:
        fingerprint = unpruned_fingerprint(config)
        base_rows = [r for r in rows_for(extra.baseline, fingerprint, config) if r["answer"] is not None]
        if not base_rows:
            print(f"error: no unpruned rows (config {fingerprint}) under {extra.baseline}", file=sys.stderr)
            return 2
        base_ids = {r["item_id"] for r in base_rows}
        common = [r for r in scored if r["item_id"] in base_ids]
        baseline = score(base_rows)
        method = score(common)
        rel = relative_accuracy(method, baseline)
        report.update(baseline_accuracy=baseline, rel_acc=rel, baseline_questions=len(base_rows))
        print(f"RelAcc vs unpruned ({len(base_rows)} questions): {rel:.3f}")
    if extra.predictions:
        with extra.predictions.open("w") as f:
            for r in scored:
                record = {"id": r["item_id"], "question": r["question"], "answer": r["answer"], "pred": r["text"]}
                f.write(json.dumps(record) + "\n")
        print(f"predictions: {extra.predictions}")
    print(json.dumps(report))
    return main_exit_code(summary)
