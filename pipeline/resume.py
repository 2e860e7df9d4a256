"""Resume: which items a run still has to do, and one current row per item after it.

An item counts as done for a config when its current row (below) is ``ok``, or an error that
a rerun would not fix: ``retryable`` false (a missing file, a corrupt video) and its kind not
named in ``output.retry_errors`` (``--retry-errors``). Retryable errors (storage unreachable,
throttled, timed out: still failing after the run's own retries) are redone by every rerun.

A redone item has two rows until the run ends; then ``drop_superseded`` rewrites each part that
holds a superseded row without it (atomically, same name; a part left empty is deleted), so a
plain ``SELECT * FROM 'out/*.parquet'`` sees one row per item and config. The current row is
the newest by ``created_at`` (an ``ok`` row wins a tie). A run killed between the two steps
leaves both rows until the next run of the config, which removes the older one first thing.
"""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import output, storage
from pipeline.config import ConfigError
from pipeline.faults import RetryPolicy, with_retries

INDEX_COLUMNS = ("item_id", "config_fingerprint", "status", "error_kind", "retryable", "created_at", "run_id")
# Error kinds a row can carry (pipeline.media ERROR_KINDS plus the read and inference stages' own).
STAGE_ERROR_KINDS = ("not_found", "read_failed", "decode_failed", "inference_failed")


def known_error_kinds() -> tuple[str, ...]:
    from pipeline.media.types import ERROR_KINDS

    return (*STAGE_ERROR_KINDS, *ERROR_KINDS)


def check_retry_kinds(kinds: list[str]) -> frozenset[str]:
    """``output.retry_errors`` validated: known kinds, or ``all``."""
    known = known_error_kinds()
    if "all" in kinds:
        return frozenset(known)
    unknown = [k for k in kinds if k not in known]
    if unknown:
        raise ConfigError(
            f"output.retry_errors: unknown error kind {', '.join(map(repr, unknown))}; allowed: all, {', '.join(known)}"
        )
    return frozenset(kinds)


def read_index(
    output_uri: str, fingerprint: str, options: dict | None = None, policy: RetryPolicy | None = None
) -> list[dict]:
    """This config's rows under the output (``INDEX_COLUMNS`` plus ``part``, the file holding each);
    transient storage errors are retried per ``policy``."""
    policy = policy or RetryPolicy()

    def read(uri: str) -> list[dict]:
        data, _ = with_retries(lambda: storage.read_bytes(uri, options), policy, f"reading part {uri}")
        names = pq.read_schema(io.BytesIO(data)).names
        table = pq.read_table(io.BytesIO(data), columns=[c for c in INDEX_COLUMNS if c in names])
        rows = table.to_pylist()
        for row in rows:  # parts from before schema v4 have no retryable column: not retryable
            row.setdefault("retryable", None)
            row["part"] = uri
        return [r for r in rows if r["config_fingerprint"] == fingerprint]

    files = output.part_files(output_uri, options, policy)
    with ThreadPoolExecutor(max_workers=16) as pool:  # object stores: latency-bound, so read in parallel
        return [row for rows in pool.map(read, files) for row in rows]


def _newness(row: dict) -> tuple:
    created = row["created_at"]
    return (created.timestamp() if created is not None else float("-inf"), row["status"] == "ok")


def current_rows(index: list[dict]) -> dict[str, dict]:
    """item_id -> its current row: the newest (an ok row wins a tie)."""
    current: dict[str, dict] = {}
    for row in index:
        best = current.get(row["item_id"])
        if best is None or _newness(row) > _newness(best):
            current[row["item_id"]] = row
    return current


def needs_redo(row: dict, retry_kinds: frozenset[str]) -> bool:
    return row["status"] != "ok" and (bool(row["retryable"]) or row["error_kind"] in retry_kinds)


def done_items(
    output_uri: str,
    fingerprint: str,
    options: dict | None = None,
    retry_kinds: frozenset[str] = frozenset(),
    policy: RetryPolicy | None = None,
) -> tuple[set[str], int]:
    """(item ids a run of this config can skip, how many of the others are earlier errors to redo)."""
    current = current_rows(read_index(output_uri, fingerprint, options, policy))
    redo = {i for i, row in current.items() if needs_redo(row, retry_kinds)}
    return set(current) - redo, len(redo)


def drop_superseded(
    output_uri: str, fingerprint: str, options: dict | None = None, policy: RetryPolicy | None = None
) -> int:
    """Rewrite the parts holding rows that a newer row of the same item and config replaced, without
    them (a part left empty is deleted). Returns how many rows were dropped."""
    policy = policy or RetryPolicy()
    index = read_index(output_uri, fingerprint, options, policy)
    current = current_rows(index)
    stale: dict[str, set[tuple]] = {}
    for row in index:
        if row is not current[row["item_id"]]:
            stale.setdefault(row["part"], set()).add(_row_key(row))
    for part, keys in stale.items():
        _drop_rows(part, keys, options, policy)
    return sum(len(keys) for keys in stale.values())


def _drop_rows(part: str, keys: set[tuple], options: dict | None, policy: RetryPolicy) -> None:
    """Rewrite ``part`` without the rows named by ``keys`` (delete it if none is left)."""
    data, _ = with_retries(lambda: storage.read_bytes(part, options), policy, f"reading part {part}")
    table = pq.read_table(io.BytesIO(data))
    keep = [_row_key(r) not in keys for r in table.select(["item_id", "created_at", "run_id"]).to_pylist()]
    kept = table.filter(pa.array(keep))
    if kept.num_rows:
        with_retries(lambda: output.rewrite_part(kept, part, options), policy, f"rewriting part {part}")
    else:
        with_retries(lambda: storage.delete(part, options), policy, f"deleting part {part}")


def _row_key(row: dict) -> tuple:
    return (row["item_id"], row["created_at"], row["run_id"])
