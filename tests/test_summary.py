"""The final summary: SSD acceptance and QA accuracy counted per part by write_batch, added up exactly by
the driver (pipeline.run.consume), shown only when they apply, and kept in the run record."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pytest

from pipeline.config import load_config
from pipeline.run import Summary, consume, write_run_record
from pipeline.schema import SCHEMA
from pipeline.write import write_batch

ROOT = Path(__file__).resolve().parent.parent


def out_row(item_id: str, status: str = "ok", task: str = "caption", **values) -> dict:
    """An output row: nulls, plus what the test gives."""
    row = {name: None for name in SCHEMA.names}
    row.update(item_id=item_id, status=status, task=task, config_fingerprint="f" * 16, created_at=datetime.now(UTC))
    if status == "ok":
        row.update(text="a red square", generated_tokens=8, visual_tokens_kept=21, visual_tokens_total=64)
        row.update(latency_ms=10.0, prefill_ms=4.0, generate_ms=6.0)
    else:
        row.update(error_kind="corrupt", error="it is corrupt")
    row.update(decode_ms=1.0, **values)
    return row


def ssd(drafted: int, accepted: int, rounds: int, generated: int) -> dict:
    return {
        "drafted_tokens": drafted,
        "accepted_tokens": accepted,
        "draft_rounds": rounds,
        "generated_tokens": generated,
    }


def part(tmp_path: Path, rows: list[dict]) -> pa.Table:
    return write_batch(pa.Table.from_pylist(rows, schema=SCHEMA), str(tmp_path), {})


class Parts:
    """Stands in for the Ray dataset: iter_batches yields the part summaries, optionally slowly."""

    def __init__(self, tables: list[pa.Table], delay_s: float = 0.0):
        self.tables, self.delay_s = tables, delay_s

    def iter_batches(self, **_):
        for table in self.tables:
            time.sleep(self.delay_s)
            yield table


def summed(tables: list[pa.Table], **kwargs) -> Summary:
    items = sum(t.column("rows")[0].as_py() for t in tables)
    return consume(Parts(tables), Summary("run", "out", "f" * 16, items, 0), **kwargs)


def test_write_batch_counts_draft_tokens_and_correct_answers(tmp_path):
    rows = [
        out_row("a", task="qa", text="Red.", answer="red", **ssd(10, 6, 5, 12)),  # right after normalisation
        out_row("b", task="qa", text="two", answer="3", **ssd(4, 4, 2, 7)),
        out_row("c", "error", task="qa", answer="blue"),  # in error: scored, wrong
        out_row("d", task="qa", text="yes"),  # no reference answer: not scored
    ]
    (summary,) = part(tmp_path, rows).to_pylist()
    assert (summary["drafted_tokens"], summary["accepted_tokens"], summary["draft_rounds"]) == (14, 10, 7)
    assert summary["ssd_generated_tokens"] == 19 and summary["generated_tokens"] == 27  # d has no draft counts
    assert (summary["answers_scored"], summary["answers_correct"]) == (3, 1)


def test_caption_rows_are_not_scored_even_with_an_answer(tmp_path):
    (summary,) = part(tmp_path, [out_row("a", text="red", answer="red")]).to_pylist()
    assert (summary["answers_scored"], summary["answers_correct"], summary["draft_rounds"]) == (0, 0, 0)


def test_ratios_are_exact_over_the_run_not_a_mean_of_parts(tmp_path):
    tables = [
        part(tmp_path, [out_row("a", task="qa", answer="red", text="red", **ssd(10, 9, 4, 14))]),
        part(tmp_path, [out_row(i, task="qa", answer="red", text="blue", **ssd(30, 3, 20, 24)) for i in "bcd"]),
    ]
    summary = summed(tables)
    assert summary.acceptance == pytest.approx((9 + 3 * 3) / (10 + 3 * 30))  # 0.18; the mean of the parts is 0.5
    assert summary.tokens_per_round == pytest.approx((14 + 3 * 24) / (4 + 3 * 20))
    assert summary.accuracy == pytest.approx(1 / 4)
    lines = summary.lines()
    assert "  speculative decoding: acceptance 18.0% (18 of 100 drafted tokens), 1.34 tokens per round (64 rounds)" in (
        lines
    )
    assert any(line.startswith("  accuracy: 0.250 (1 of 4 answers match the reference") for line in lines)


def test_greedy_caption_summary_has_neither_line(tmp_path):
    summary = summed([part(tmp_path, [out_row("a"), out_row("b", "error")])])
    assert (summary.acceptance, summary.tokens_per_round, summary.accuracy) == (None, None, None)
    assert (summary.ok, summary.errors, summary.generated_tokens) == (1, 1, 8)
    text = "\n".join(summary.lines())
    assert "speculative" not in text and "accuracy" not in text


def test_the_run_record_keeps_the_new_figures(tmp_path):
    config = load_config(ROOT / "configs" / "demo.yaml", [f"output.uri='{tmp_path / 'out'}'"])
    summary = summed([part(tmp_path, [out_row("a", task="qa", answer="red", text="red", **ssd(5, 4, 2, 6))])])
    write_run_record(config, summary, {})
    record = json.loads((tmp_path / "out" / "_runs" / "run.json").read_text())["summary"]
    assert record["acceptance"] == 0.8 and record["tokens_per_round"] == 3.0 and record["accuracy"] == 1.0
    assert (record["drafted_tokens"], record["answers_scored"]) == (5, 1)


def test_consume_logs_progress_lines_while_parts_arrive(tmp_path):
    tables = [part(tmp_path, [out_row(f"{i}")]) for i in range(3)]
    lines: list[str] = []
    summed_ = consume(Parts(tables, delay_s=0.1), Summary("run", "out", "f", 5, 2), 0.02, lines.append)
    assert summed_.items_processed == 3
    assert lines and all(line.startswith("progress: ") and "/3 items" in line for line in lines)
