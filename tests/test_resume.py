"""Resume after faults: retryable error rows are redone by reruns, permanent ones on request, and a
redone item's newer row replaces the old one in the Parquet itself (one current row per item for any
reader). Exit statuses of finished runs."""

from datetime import UTC, datetime, timedelta

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import exit_status, output, resume
from pipeline.cli import parse_args
from pipeline.config import ConfigError
from pipeline.run import Summary, main_exit_code
from pipeline.schema import SCHEMA

T0 = datetime(2026, 12, 1, tzinfo=UTC)


def row(item_id: str, status: str = "ok", kind: str | None = None, retryable: bool | None = None, at=T0, run="r1"):
    base = {f.name: None for f in SCHEMA}
    base.update(
        item_id=item_id, uri=f"/m/{item_id}.png", status=status, error_kind=kind, retryable=retryable,
        text="a caption" if status == "ok" else None, config_fingerprint="f", created_at=at, run_id=run,
    )  # fmt: skip
    return base


def part(rows: list[dict], out) -> str:
    return output.write_part(pa.Table.from_pylist(rows, schema=SCHEMA), str(out))


def test_retryable_errors_are_redone_permanent_ones_only_on_request(tmp_path):
    part(
        [
            row("a"),
            row("b", "error", "read_failed", retryable=True),
            row("c", "error", "not_found", retryable=False),
            row("d", "error", "decode_timeout", retryable=False),
        ],
        tmp_path,
    )
    # A part written before schema v4: no retryable column, so its errors are not retryable.
    old = pa.Table.from_pylist([row("e", "error", "read_failed")], schema=SCHEMA).drop_columns(
        ["retryable", "attempts"]
    )
    pq.write_table(old, tmp_path / "part-v3.parquet")
    done, redo = resume.done_items(str(tmp_path), "f")
    assert (done, redo) == ({"a", "c", "d", "e"}, 1)
    done, redo = resume.done_items(str(tmp_path), "f", retry_kinds=resume.check_retry_kinds(["decode_timeout"]))
    assert (done, redo) == ({"a", "c", "e"}, 2)
    done, _ = resume.done_items(str(tmp_path), "f", retry_kinds=resume.check_retry_kinds(["all"]))
    assert done == {"a"}
    assert resume.done_items(str(tmp_path), "another config") == (set(), 0)
    with pytest.raises(
        ConfigError, match="output.retry_errors: unknown error kind 'bad_luck'; allowed: all, not_found"
    ):
        resume.check_retry_kinds(["bad_luck"])


def test_a_newer_row_replaces_the_old_one_in_the_parquet(tmp_path):
    first = part([row("a"), row("b", "error", "read_failed", retryable=True)], tmp_path)
    lone = part([row("c", "error", "read_failed", retryable=True)], tmp_path)
    later = T0 + timedelta(minutes=5)
    second = part([row("b", at=later, run="r2"), row("c", at=later, run="r2")], tmp_path)
    assert resume.drop_superseded(str(tmp_path), "f") == 2
    rows = {(r["item_id"], r["run_id"]): r for r in output.read_output(str(tmp_path)).to_pylist()}
    assert set(rows) == {("a", "r1"), ("b", "r2"), ("c", "r2")}
    assert all(r["status"] == "ok" for r in rows.values())
    # The part that held b's old row keeps its name and footer, minus that row; c's old part is gone.
    assert pq.read_table(first).column("item_id").to_pylist() == ["a"]
    assert output.part_metadata(first)["vlm_batch.config_fingerprint"] == "f"
    assert not (tmp_path / lone.rsplit("/", 1)[1]).exists() and (tmp_path / second.rsplit("/", 1)[1]).exists()
    # Any reader sees one row per item, no custom query needed.
    total, distinct = duckdb.sql(f"SELECT count(*), count(DISTINCT item_id) FROM '{tmp_path}/*.parquet'").fetchall()[0]
    assert total == distinct == 3
    assert resume.drop_superseded(str(tmp_path), "f") == 0  # nothing left to do


def test_an_ok_row_wins_a_tie_and_other_configs_are_left_alone(tmp_path):
    part([row("a", "error", "read_failed", retryable=True)], tmp_path)
    part([row("a", run="r2"), row("b", run="r2")], tmp_path)  # (a part of the same ids would replace the first)
    other = {**row("a", "error", "corrupt"), "config_fingerprint": "g"}
    part([other], tmp_path)
    assert resume.drop_superseded(str(tmp_path), "f") == 1
    rows = sorted((r["config_fingerprint"], r["status"]) for r in output.read_output(str(tmp_path)).to_pylist())
    assert rows == [("f", "ok"), ("f", "ok"), ("g", "error")]


def summary(**counts) -> Summary:
    values = {"run_id": "r", "output": "o", "config_fingerprint": "f", "items_total": 10, "items_skipped": 0}
    return Summary(**values, **counts)


@pytest.mark.parametrize(
    "counts, max_rate, status, message",
    [
        ({}, None, exit_status.OK, ""),
        ({"missing": 1}, None, exit_status.INCOMPLETE, "not exactly one row per item"),
        ({"errors_for_config": 2, "retryable_errors": 2, "error_rate": 0.2}, 0.5, exit_status.INFRASTRUCTURE,
         "2 items still failed after retries"),
        ({"errors_for_config": 2, "error_rate": 0.2}, 0.1, exit_status.TOO_MANY_ERRORS, "2 of 10 items (20.0%)"),
        ({"errors_for_config": 2, "error_rate": 0.2}, 0.2, exit_status.OK, ""),
        ({"errors_for_config": 2, "error_rate": 0.2}, None, exit_status.OK, ""),
    ],
)  # fmt: skip
def test_exit_status_of_a_finished_run(counts, max_rate, status, message, capsys):
    assert main_exit_code(summary(**counts), max_rate) == status
    err = capsys.readouterr().err
    assert (message in err and err.count("\n") == 1) if message else err == ""


def test_command_line_flags_set_the_config(tmp_path):
    config, _ = parse_args(
        ["--config", "configs/demo.yaml", "--retry-errors", "decode_timeout, corrupt", "--max-error-rate", "0.05"]
    )
    assert config.output.retry_errors == ["decode_timeout", "corrupt"] and config.output.max_error_rate == 0.05
    with pytest.raises(ConfigError, match="output.max_error_rate"):
        parse_args(["--config", "configs/demo.yaml", "--max-error-rate", "2"])
