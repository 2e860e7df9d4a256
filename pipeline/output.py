"""Output layout: the Parquet part files (schema: pipeline.schema), atomic part writes and the resume index.

Layout under ``output.uri``::

    part-<hash>.parquet      rows; <hash> = sha1(config fingerprint + the part's sorted item ids); file
                             key/value metadata: PART_METADATA_KEYS (schema version, config fingerprint)
    _runs/<run_id>.json      one summary per run (config, counts, timings)

Exactly-once comes from the layout, not from Ray: a part file appears whole or not at all
(temporary name + rename locally, one PUT on object stores), a part's name is a function of its
content, so a retried write task rewrites the same file, and a rerun first reads the
``(item_id, config_fingerprint)`` pairs already written and skips them.

Part writes and the resume reads retry transient storage errors (``pipeline.faults``): an object store
that is away for a while delays a run instead of failing it.
"""

from __future__ import annotations

import errno
import hashlib
import io
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import faults, storage
from pipeline.faults import RetryPolicy, StorageUnavailable, with_retries
from pipeline.schema import KEY_COLUMNS, OUTPUT_SCHEMA_VERSION, SCHEMA

# Parquet key/value metadata of every part: a part holds one config's rows, so a reader can tell a
# file's schema version and config from its footer alone (pq.read_metadata, DuckDB's parquet_kv_metadata).
SCHEMA_VERSION_KEY = "vlm_batch.schema_version"
FINGERPRINT_KEY = "vlm_batch.config_fingerprint"
PART_METADATA_KEYS = (SCHEMA_VERSION_KEY, FINGERPRINT_KEY)


def part_name(item_ids: list[str], fingerprint: str) -> str:
    digest = hashlib.sha1(fingerprint.encode())
    for item_id in sorted(item_ids):
        digest.update(b"\0" + item_id.encode())
    return f"part-{digest.hexdigest()[:20]}.parquet"


def write_part(table: pa.Table, output_uri: str, options: dict | None = None, policy: RetryPolicy | None = None) -> str:
    """Write one part atomically; returns its URI. Same rows, same name: retries are idempotent.

    Transient storage errors are retried per ``policy`` (default ``RetryPolicy()``); when they outlast it,
    raises ``faults.StorageUnavailable`` naming the part, the cause and the attempts. A permanent error
    (a full or read-only disk, no permission) is raised at once, as an OSError naming the part.
    """
    table = table.select(SCHEMA.names).cast(SCHEMA)
    fingerprints = set(table.column("config_fingerprint").to_pylist())
    if len(fingerprints) != 1:
        raise ValueError(f"a part must hold one config fingerprint, got {sorted(map(str, fingerprints))}")
    fingerprint = fingerprints.pop()
    name = part_name(table.column("item_id").to_pylist(), fingerprint)
    metadata = {SCHEMA_VERSION_KEY: str(OUTPUT_SCHEMA_VERSION), FINGERPRINT_KEY: fingerprint}
    table = table.replace_schema_metadata(metadata)
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    uri = storage.join(output_uri, name)
    data = buffer.getvalue()
    try:
        with_retries(
            lambda: storage.write_bytes_atomic(uri, data, options), policy or RetryPolicy(), f"writing part {uri}"
        )
    except StorageUnavailable:
        raise
    except OSError as e:
        raise _not_retried(uri, e) from e
    return uri


def _not_retried(uri: str, error: OSError) -> OSError:
    """``error`` reworded to name the part, keeping its errno and builtin class (ENOSPC, EROFS, EACCES, ...)."""
    if error.errno is not None:
        code = errno.errorcode.get(error.errno, str(error.errno))
        # OSError(errno, text) picks the errno's class itself: EACCES gives a PermissionError.
        return OSError(error.errno, f"cannot write part {uri}: {error.strerror} ({code}; not retried)")
    builtin = next(c for c in type(error).__mro__ if c.__module__ == "builtins")
    return builtin(f"cannot write part {uri}: {faults.describe(error)} (not retried)")


def part_metadata(uri: str, options: dict | None = None) -> dict[str, str]:
    """A part's ``vlm_batch.*`` key/value metadata (empty for parts written before it was added)."""
    meta = pq.read_metadata(io.BytesIO(storage.read_bytes(uri, options))).metadata or {}
    return {k.decode(): v.decode() for k, v in meta.items() if k.decode() in PART_METADATA_KEYS}


def part_files(output_uri: str, options: dict | None = None, policy: RetryPolicy | None = None) -> list[str]:
    """URIs of the part files directly under the output (a fresh listing, never a cached one).

    Transient errors are retried per ``policy`` (default ``RetryPolicy()``): a resume must not start over,
    or stop, because the object store blinked.
    """
    fs, path = storage.open_fs(output_uri, options)

    def listing() -> list[str]:
        try:
            return fs.ls(path, detail=False, refresh=True)
        except FileNotFoundError:
            return []

    names, _ = with_retries(listing, policy or RetryPolicy(), f"listing {output_uri}")
    names = sorted(n.rstrip("/").rsplit("/", 1)[-1] for n in names)
    return [storage.join(output_uri, n) for n in names if n.startswith("part-") and n.endswith(".parquet")]


def read_keys(output_uri: str, options: dict | None = None, policy: RetryPolicy | None = None) -> pa.Table:
    """(item_id, config_fingerprint, status) of every row already written; transient errors retried."""
    policy = policy or RetryPolicy()
    files = part_files(output_uri, options, policy)
    columns = [*KEY_COLUMNS, "status"]

    def read(uri: str) -> pa.Table:
        data, _ = with_retries(lambda: storage.read_bytes(uri, options), policy, f"reading part {uri}")
        # without the part's metadata: concat_tables would keep the first part's fingerprint for all of them
        return pq.read_table(io.BytesIO(data), columns=columns).replace_schema_metadata()

    if not files:
        return pa.table({c: pa.array([], pa.string()) for c in columns})
    with ThreadPoolExecutor(max_workers=16) as pool:  # object stores: latency-bound, so read in parallel
        return pa.concat_tables(pool.map(read, files))


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


def rewrite_part(table: pa.Table, uri: str, options: dict | None = None) -> None:
    """Replace the part at ``uri`` with ``table`` (a subset of its rows), atomically, keeping its name
    and metadata: how ``pipeline.resume`` drops rows a newer row superseded."""
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    storage.write_bytes_atomic(uri, buffer.getvalue(), options)
