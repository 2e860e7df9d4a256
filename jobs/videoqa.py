"""Answer the questions of a VideoQA annotation file and score them.

    python jobs/videoqa.py --config configs/shapes-qa.yaml [--input ANNOTATIONS] [--output URI] \
        [--baseline URI] [--predictions FILE.jsonl] [key=value ...]

Runs the caption job with ``task=qa`` (resumable like it), then reads this config's rows back
and prints normalised exact-match accuracy per question type. With ``--baseline`` (the output of
an unpruned run; it may be the same output prefix), it also prints RelAcc: the mean over
question types of accuracy ÷ the unpruned accuracy. ``--predictions`` writes Video-LLaVA's
``{"id", "question", "answer", "pred"}`` JSON lines.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jobs.caption import parse_args  # noqa: E402
from pipeline.config import Config, ConfigError  # noqa: E402
from pipeline.scoring import accuracy_by_type, is_correct, relative_accuracy  # noqa: E402


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
    return accuracy_by_type((r["question_type"] or "all", is_correct(r["text"], r["answer"])) for r in rows)


def main(argv: list[str] | None = None) -> int:
    from pipeline.run import main_exit_code, run
    from pipeline.sources import SourceError

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--baseline", help="output URI of an unpruned run of the same config")
    parser.add_argument("--predictions", type=Path, help="write Video-LLaVA-style prediction JSON lines here")
    extra, rest = parser.parse_known_args(argv)
    try:
        config, _ = parse_args([*rest, "task=qa"])
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


if __name__ == "__main__":
    sys.exit(main())
