"""Decode stage (CPU Ray tasks): read each row's media bytes and decode them to RGB frames.

Runs before, and apart from, the GPU actors so they never wait on decoding. Decoding itself
happens in a killable child process (pipeline.media.DecodeWorker), one per Ray worker process
and reused across batches, so a decoder that hangs or crashes costs one row, not the task.
Every input row comes out exactly once, with either frames or an error.
"""

from __future__ import annotations

import time
from typing import NamedTuple

import numpy as np
import pyarrow as pa

from pipeline import faults, storage
from pipeline.media import DecodeWorker, MediaError, MediaOptions
from pipeline.schema import DECODED_SCHEMA, WORK_FIELDS, build_row

_workers: dict[MediaOptions, DecodeWorker] = {}  # per Ray worker process: the child decoder survives batches


def _worker(options: MediaOptions) -> DecodeWorker:
    if options not in _workers:
        _workers[options] = DecodeWorker(options)
    return _workers[options]


class ReadFailure(NamedTuple):
    """Why a row's bytes could not be read: its ``error_kind``, ``error``, ``retryable`` and ``attempts``."""

    kind: str  # not_found, too_large or read_failed
    message: str
    retryable: bool  # transient (storage unavailable until the retries ran out): a later run may succeed
    attempts: int  # reads tried


def read_error(uri: str, error: Exception) -> ReadFailure:
    """The row's error for a failure to fetch the bytes (``error`` as ``faults.with_retries`` raised it)."""
    retryable, attempts = faults.is_transient(error), faults.attempts_of(error)
    if isinstance(error, FileNotFoundError):
        return ReadFailure("not_found", f"{uri} does not exist", retryable, attempts)
    if isinstance(error, PermissionError):
        return ReadFailure("read_failed", f"access denied reading {uri}", retryable, attempts)
    if isinstance(error, IsADirectoryError):
        return ReadFailure("read_failed", f"{uri} is a directory", retryable, attempts)
    if isinstance(error, ValueError) and "limit" in str(error):
        return ReadFailure("too_large", str(error), retryable, attempts)
    if isinstance(error, faults.StorageUnavailable):  # its message names the URI, the attempts and the cause
        return ReadFailure("read_failed", str(error), retryable, attempts)
    return ReadFailure("read_failed", f"reading {uri} failed: {type(error).__name__}: {error}", retryable, attempts)


# Per worker process: when a read outlasted its retries, storage is taken to be down for as long again,
# and reads meanwhile are tried once. Otherwise, in a long outage, every row of a batch would wait out
# the whole retry budget in turn (16 rows x ~1 min); their rows are retryable errors either way.
_storage_down_until = 0.0


def read_policy(policy: faults.RetryPolicy) -> faults.RetryPolicy:
    """``policy``, or one try while storage is taken to be down (``note_outage``)."""
    return faults.RetryPolicy(attempts=1) if time.monotonic() < _storage_down_until else policy


def note_outage(policy: faults.RetryPolicy) -> None:
    global _storage_down_until
    _storage_down_until = time.monotonic() + max(policy.max_total_wait_s, 1.0)


def decode_row(row: dict, worker: DecodeWorker, options: MediaOptions, storage_config: dict | None) -> dict:
    """The decoded row (DECODED_SCHEMA) of a work row: frames, or an error; ``attempts`` reads tried."""
    start = time.perf_counter()
    out = {**row, "frames": None, "frame_shape": None, "error_kind": None, "error": None, "retryable": None}
    policy = read_policy(faults.RetryPolicy.from_storage(storage_config))
    try:
        # Options per URI: a manifest may mix local paths and object-store URIs.
        fs_options = storage.fsspec_options(row["uri"], **(storage_config or {}))
        # An object store that is down for a while (a restart, throttling) must not turn readable media
        # into permanent error rows: transient failures are retried (pipeline.faults).
        data, out["attempts"] = faults.with_retries(
            lambda: storage.read_bytes(row["uri"], fs_options, max_bytes=options.max_bytes),
            policy,
            f"reading {row['uri']}",
        )
    except Exception as e:  # any read failure is this row's error, never the task's
        if isinstance(e, faults.StorageUnavailable):
            note_outage(policy)
        failure = read_error(row["uri"], e)
        out["error_kind"], out["error"] = failure.kind, failure.message
        out["retryable"], out["attempts"] = failure.retryable, failure.attempts
    else:
        try:
            decoded = worker.decode(data, row["uri"])
        except MediaError as e:
            out["error_kind"], out["error"], out["retryable"] = e.kind, e.message, False
        except Exception as e:  # a bug in decoding: keep it on the row, with its type
            out["error_kind"], out["error"], out["retryable"] = "decode_failed", f"{type(e).__name__}: {e}", False
        else:
            frames = np.ascontiguousarray(decoded.frames, dtype=np.uint8)
            out["media_type"] = decoded.kind
            out["frames"] = frames.tobytes()
            out["frame_shape"] = list(frames.shape)
    out["decode_ms"] = 1000.0 * (time.perf_counter() - start)
    return build_row(DECODED_SCHEMA, out, "decoded row")


def decode_batch(batch: pa.Table, media: MediaOptions, storage_config: dict | None = None) -> pa.Table:
    """Ray Data UDF (tasks): work rows in, rows with frames or an error out, same count and order."""
    worker = _worker(media)
    rows = batch.to_pylist()
    done: dict[str, dict] = {}  # QA rows often share a video: decode each URI once per batch
    out = []
    for row in rows:
        cached = done.get(row["uri"])
        if cached is None:
            cached = done[row["uri"]] = decode_row(row, worker, media, storage_config)
            out.append(cached)
        else:
            same = {k: row[k] for k, _ in WORK_FIELDS if k != "media_type"}
            out.append(build_row(DECODED_SCHEMA, {**cached, **same, "decode_ms": 0.0}, "decoded row"))
    assert len(out) == len(rows)
    return pa.Table.from_pylist(out, schema=DECODED_SCHEMA)


def frames_of(row: dict) -> np.ndarray:
    """The [T, H, W, 3] uint8 frames a decoded row carries."""
    return np.frombuffer(row["frames"], dtype=np.uint8).reshape(row["frame_shape"])
