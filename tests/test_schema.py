"""pipeline.schema: rows are built from their schema, and every stage's rows match its schema exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from operators.engine import Result
from pipeline import inference
from pipeline.config import load_config
from pipeline.decode import decode_row
from pipeline.inference import InferenceStage, base_values, error_row, ok_row
from pipeline.schema import DECODED_SCHEMA, PART_SUMMARY, SCHEMA, WORK_FIELDS, build_row
from pipeline.write import write_batch

ROOT = Path(__file__).resolve().parent.parent
SMALL = pa.schema([("a", pa.string()), ("b", pa.int32()), ("c", pa.float64())])


@pytest.fixture(scope="module")
def config():
    return load_config(ROOT / "configs" / "demo.yaml")


def decoded(item_id: str, error_kind: str | None = None, frames: int = 4) -> dict:
    """A row as the decode stage hands it on: frames, or an error."""
    shape = [frames, 8, 8, 3]
    return build_row(
        DECODED_SCHEMA,
        {
            "item_id": item_id,
            "uri": f"/data/{item_id}",
            "media_type": None if error_kind else "video",
            "question": None,
            "answer": None,
            "question_type": None,
            "frames": None if error_kind else np.zeros(shape, np.uint8).tobytes(),
            "frame_shape": None if error_kind else shape,
            "error_kind": error_kind,
            "error": f"it is {error_kind}" if error_kind else None,
            "retryable": False if error_kind else None,
            "attempts": 1,
            "decode_ms": 1.5,
        },
        "decoded row",
    )


def result(text: str = "a red square") -> Result:
    return Result(
        text=text,
        token_ids=[1, 2, 3],
        visual_tokens_total=64,
        visual_tokens_kept=21,
        visual_tokens_layer_mean=21.0,
        prefill_flops=1e9,
        kv_cache_bytes=4096,
        stage_ms={"preprocess": 1.0, "vision": 2.0, "prune": 0.5, "prefill": 3.0, "decode": 10.0},
    )


# ---------------------------------------------------------------------------------------------------------
# build_row


def test_build_row_gives_every_field_in_schema_order():
    row = build_row(SMALL, {"c": 1.0, "a": "x", "b": None})
    assert row == {"a": "x", "b": None, "c": 1.0} and list(row) == ["a", "b", "c"]


def test_a_missing_field_is_an_error_not_a_null():
    with pytest.raises(ValueError, match=r"^output row is missing fields: b, c$"):
        build_row(SMALL, {"a": "x"}, "output row")


def test_an_unknown_field_is_refused():
    with pytest.raises(ValueError, match=r"^row has fields not in its schema: d$"):
        build_row(SMALL, {"a": "x", "b": 1, "c": 1.0, "d": 2})


def test_missing_and_unknown_fields_are_both_named():
    with pytest.raises(ValueError, match=r"is missing fields: c; and has fields not in its schema: texts"):
        build_row(SMALL, {"a": "x", "b": 1, "texts": "y"})


# ---------------------------------------------------------------------------------------------------------
# The inference stage's rows


def test_inference_columns_partition_the_output_schema(config):
    base = base_values(decoded("x"), config, "f" * 16, "run")
    assert not set(base) & set(inference.RESULT_COLUMNS) and "status" not in base
    assert sorted([*base, *inference.RESULT_COLUMNS, "status"]) == sorted(SCHEMA.names)


def test_inference_error_and_ok_rows_cover_exactly_the_output_schema(config):
    failed = error_row(base_values(decoded("bad", "corrupt"), config, "fp", "run"))
    crashed = error_row(base_values(decoded("x"), config, "fp", "run"), error_kind="inference_failed", error="boom")
    ok = ok_row(base_values(decoded("y"), config, "fp", "run"), result())
    for row in (failed, crashed, ok):
        assert list(row) == SCHEMA.names
    assert (failed["status"], failed["error_kind"], failed["error"], failed["num_frames"]) == (
        "error",
        "corrupt",
        "it is corrupt",
        None,
    )
    assert (crashed["status"], crashed["error_kind"], crashed["error"], crashed["num_frames"]) == (
        "error",
        "inference_failed",
        "boom",
        4,
    )
    assert all(failed[c] is None and crashed[c] is None for c in inference.RESULT_COLUMNS)
    assert ok["status"] == "ok" and ok["error_kind"] is None and ok["text"] == "a red square"
    assert ok["generated_tokens"] == 3 and ok["latency_ms"] == 16.5
    assert ok["generate_ms"] == 10.0 and ok["prefill_ms"] == 6.5
    assert ok["model"] == "shapes-llava" and ok["pruning_budget"] == 21 and ok["config_fingerprint"] == "fp"
    table = pa.Table.from_pylist([failed, crashed, ok], schema=SCHEMA)
    assert table.num_rows == 3


def test_an_error_row_refuses_a_column_the_schema_does_not_have(config):
    with pytest.raises(ValueError, match="not in its schema: reason"):
        error_row(base_values(decoded("x"), config, "fp", "run"), reason="boom")


class FakeEngine:
    """Answers every request except those for ``fail``; no model involved."""

    def __init__(self, fail: str) -> None:
        self.fail = fail
        self.calls = 0

    def generate(self, requests: list[dict]) -> list[Result]:
        self.calls += 1
        if any(r["uri"].endswith(self.fail) for r in requests):
            raise RuntimeError("engine failed")
        return [result(f"caption of {r['item_id']}") for r in requests]


def test_inference_stage_call_without_a_model(config, monkeypatch):
    stage = object.__new__(InferenceStage)  # skips loading the model
    stage.config, stage.fingerprint, stage.run_id = config, config.fingerprint(), "run"
    stage.engine = FakeEngine(fail="c")
    monkeypatch.setattr(InferenceStage, "request", lambda self, row: row)
    rows = [decoded("a"), decoded("b", "not_found"), decoded("c"), decoded("d")]
    table = stage(pa.Table.from_pylist(rows, schema=DECODED_SCHEMA))
    assert table.schema == SCHEMA
    out = table.to_pylist()
    assert [r["item_id"] for r in out] == ["a", "b", "c", "d"]
    assert [r["status"] for r in out] == ["ok", "error", "error", "ok"]
    assert [r["error_kind"] for r in out] == [None, "not_found", "inference_failed", None]
    assert out[2]["error"] == "RuntimeError: engine failed" and out[2]["text"] is None
    assert out[0]["text"] == "caption of a" and out[3]["text"] == "caption of d"
    assert stage.engine.calls == 4  # the batch of three, then each of them alone


# ---------------------------------------------------------------------------------------------------------
# The decode and write stages' rows


def test_decode_row_of_a_missing_file_covers_exactly_the_decoded_schema(config, tmp_path):
    work = {name: None for name, _ in WORK_FIELDS} | {"item_id": "gone", "uri": str(tmp_path / "gone.png")}
    row = decode_row(work, worker=None, options=config.media, storage_config=None)
    assert list(row) == DECODED_SCHEMA.names
    assert row["error_kind"] == "not_found" and row["frames"] is None and row["decode_ms"] >= 0


def test_write_batch_summary_covers_exactly_the_part_summary(config, tmp_path):
    rows = [
        ok_row(base_values(decoded("a"), config, "fp", "run"), result()),
        error_row(base_values(decoded("b", "corrupt"), config, "fp", "run")),
    ]
    summary = write_batch(pa.Table.from_pylist(rows, schema=SCHEMA), str(tmp_path), {})
    assert summary.schema == PART_SUMMARY
    (part,) = summary.to_pylist()
    assert part["rows"] == 2 and part["ok"] == 1 and part["error_kinds"] == '{"corrupt": 1}'
    assert part["item_ids"] == ["a", "b"] and part["generated_tokens"] == 3 and part["decode_ms"] == 3.0
