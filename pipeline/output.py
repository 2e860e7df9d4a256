"""Output layout: the Parquet part files (schema: pipeline.schema), atomic part writes and the resume index.

Layout under ``output.uri``::

    part-<hash>.parquet      rows; <hash> = sha1(config fingerprint + the part's sorted item ids)
    _runs/<run_id>.json      one summary per run (config, counts, timings)

Exactly-once comes from the layout, not from Ray: a part file appears whole or not at all
(temporary name + rename locally, one PUT on object stores), a part's name is a function of its
content, so a retried write task rewrites the same file, and a rerun first reads the
``(item_id, config_fingerprint)`` pairs already written and skips them.
"""

from __future__ import annotations

import hashlib
import io
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.schema import KEY_COLUMNS, SCHEMA


def part_name(item_ids: list[str], fingerprint: str) -> str:
    digest = hashlib.sha1(fingerprint.encode())
    for item_id in sorted(item_ids):
        digest.update(b"\0" + item_id.encode())
    return f"part-{digest.hexdigest()[:20]}.parquet"


def write_part(table: pa.Table, output_uri: str, options: dict | None = None) -> str:
    """Write one part atomically; returns its URI. Same rows, same name: retries are idempotent."""
    table = table.select(SCHEMA.names).cast(SCHEMA)
    fingerprints = set(table.column("config_fingerprint").to_pylist())
    if len(fingerprints) != 1:
        raise ValueError(f"a part must hold one config fingerprint, got {sorted(map(str, fingerprints))}")
    name = part_name(table.column("item_id").to_pylist(), fingerprints.pop())
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    uri = storage.join(output_uri, name)
    storage.write_bytes_atomic(uri, buffer.getvalue(), options)
    return uri


def part_files(output_uri: str, options: dict | None = None) -> list[str]:
    """URIs of the part files directly under the output (a fresh listing, never a cached one)."""
    fs, path = storage.open_fs(output_uri, options)
    try:
        names = fs.ls(path, detail=False, refresh=True)
    except FileNotFoundError:
        return []
    names = sorted(n.rstrip("/").rsplit("/", 1)[-1] for n in names)
    return [storage.join(output_uri, n) for n in names if n.startswith("part-") and n.endswith(".parquet")]


def read_keys(output_uri: str, options: dict | None = None) -> pa.Table:
    """(item_id, config_fingerprint, status) of every row already written."""
    files = part_files(output_uri, options)
    columns = [*KEY_COLUMNS, "status"]

    def read(uri: str) -> pa.Table:
        return pq.read_table(io.BytesIO(storage.read_bytes(uri, options)), columns=columns)

    if not files:
        return pa.table({c: pa.array([], pa.string()) for c in columns})
    with ThreadPoolExecutor(max_workers=16) as pool:  # object stores: latency-bound, so read in parallel
        return pa.concat_tables(pool.map(read, files))


def completed_items(output_uri: str, fingerprint: str, options: dict | None = None) -> set[str]:
    keys = read_keys(output_uri, options)
    ids = keys.column("item_id").to_pylist()
    fps = keys.column("config_fingerprint").to_pylist()
    return {i for i, f in zip(ids, fps, strict=True) if f == fingerprint}


def read_output(output_uri: str, options: dict | None = None) -> pa.Table:
    """Every row under the output (all configs), for tests and small reports."""
    files = part_files(output_uri, options)
    if not files:
        return SCHEMA.empty_table()
    tables = [pq.read_table(io.BytesIO(storage.read_bytes(f, options))) for f in files]
    # Parts written by an earlier schema version lack the columns added since: they read as nulls.
    return pa.concat_tables([conform(t) for t in tables])


def conform(table: pa.Table) -> pa.Table:
    """``table`` with SCHEMA's columns in SCHEMA's order, missing (older-version) columns as nulls."""
    columns = [
        table.column(f.name).cast(f.type) if f.name in table.column_names else pa.nulls(len(table), f.type)
        for f in SCHEMA
    ]
    return pa.Table.from_arrays(columns, schema=SCHEMA)
