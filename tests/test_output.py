"""Output parts: older schema versions read back beside current ones; the parts' file metadata."""

from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import output, resume
from pipeline.schema import OUTPUT_SCHEMA_VERSION, SCHEMA


def row(item_id: str, **extra) -> dict:
    base = {f.name: None for f in SCHEMA}
    base.update(item_id=item_id, status="ok", config_fingerprint="f", created_at=datetime.now(UTC), **extra)
    return base


def test_parts_without_columns_added_later_read_as_nulls(tmp_path):
    v2_schema = pa.schema([f for f in SCHEMA if f.name not in ("prefill_ms", "generate_ms")])
    old = pa.Table.from_pylist([row("a")], schema=SCHEMA).select(v2_schema.names)
    pq.write_table(old, tmp_path / "part-old.parquet")
    output.write_part(pa.Table.from_pylist([row("b", prefill_ms=1.5, generate_ms=2.0)], schema=SCHEMA), str(tmp_path))
    table = output.read_output(str(tmp_path))
    assert table.schema == SCHEMA
    rows = {r["item_id"]: r for r in table.to_pylist()}
    assert rows["a"]["prefill_ms"] is None and rows["b"]["prefill_ms"] == 1.5
    assert resume.done_items(str(tmp_path), "f") == ({"a", "b"}, 0)


def test_parts_carry_schema_version_and_fingerprint_in_their_footer(tmp_path):
    uri = output.write_part(pa.Table.from_pylist([row("a"), row("b")], schema=SCHEMA), str(tmp_path))
    meta = pq.read_metadata(uri).metadata
    assert meta[b"vlm_batch.schema_version"] == str(OUTPUT_SCHEMA_VERSION).encode() == b"4"
    assert meta[b"vlm_batch.config_fingerprint"] == b"f"
    assert output.part_metadata(uri) == {"vlm_batch.schema_version": "4", "vlm_batch.config_fingerprint": "f"}
    assert pq.read_schema(uri).remove_metadata() == SCHEMA  # the rows' schema is unchanged
    pq.write_table(pa.Table.from_pylist([row("c")], schema=SCHEMA), tmp_path / "part-old.parquet")
    assert output.part_metadata(str(tmp_path / "part-old.parquet")) == {}  # written before the keys existed
    assert output.read_keys(str(tmp_path)).schema.metadata is None  # no one part's fingerprint on all rows
