"""Output parts of an older schema version read back beside current ones."""

from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import output
from pipeline.schema import SCHEMA


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
    assert output.completed_items(str(tmp_path), "f") == {"a", "b"}
