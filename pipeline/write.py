"""Write stage (CPU Ray tasks): each batch of output rows becomes one atomic Parquet part.

Returns one summary row per part (schema.PART_SUMMARY); the driver streams these back and adds them up,
so no output row ever travels to the driver.
"""

from __future__ import annotations

import json
import time
from collections import Counter

import pyarrow as pa

from evaluation.scoring import is_correct
from pipeline import output, storage
from pipeline.faults import RetryPolicy, StorageUnavailable
from pipeline.schema import PART_SUMMARY, build_row


def write_batch(batch: pa.Table, output_uri: str, storage_config: dict) -> pa.Table:
    """Ray Data UDF (tasks): write the batch as one part, return one summary row."""
    options = storage.fsspec_options(output_uri, **storage_config)
    start = time.perf_counter()
    try:
        # Retries transient errors; past the policy, StorageUnavailable (an OSError naming the part).
        part = output.write_part(batch, output_uri, options, RetryPolicy.from_storage(storage_config))
    except OSError as error:  # disk or storage: reported to the driver, which stops the run with it
        return failed_part(batch, error)
    write_ms = 1000.0 * (time.perf_counter() - start)
    rows = batch.to_pylist()
    ok = [r for r in rows if r["status"] == "ok"]
    kinds = Counter(r["error_kind"] for r in rows if r["status"] != "ok")
    ssd = [r for r in ok if r["draft_rounds"] is not None]
    scored = [r for r in rows if r["task"] == "qa" and r["answer"] is not None]
    summary = {
        "part": part,
        "item_ids": [r["item_id"] for r in rows],
        "rows": len(rows),
        "ok": len(ok),
        "error_kinds": json.dumps(dict(kinds)),
        # errors a later run may fix (storage was unavailable), apart from those it would only repeat
        "retryable_errors": sum(r["status"] != "ok" and r["retryable"] is True for r in rows),
        "generated_tokens": sum(r["generated_tokens"] or 0 for r in ok),
        "visual_tokens_kept": sum(r["visual_tokens_kept"] or 0 for r in ok),
        "visual_tokens_total": sum(r["visual_tokens_total"] or 0 for r in ok),
        "latency_ms": sum(r["latency_ms"] or 0.0 for r in ok),
        "prefill_ms": sum(r["prefill_ms"] or 0.0 for r in ok),
        "generate_ms": sum(r["generate_ms"] or 0.0 for r in ok),
        "decode_ms": sum(r["decode_ms"] or 0.0 for r in rows),
        "write_ms": write_ms,
        "drafted_tokens": sum(r["drafted_tokens"] or 0 for r in ssd),
        "accepted_tokens": sum(r["accepted_tokens"] or 0 for r in ssd),
        "draft_rounds": sum(r["draft_rounds"] for r in ssd),
        "ssd_generated_tokens": sum(r["generated_tokens"] or 0 for r in ssd),
        "answers_scored": len(scored),
        # a row in error has no text, so it counts as wrong (as jobs/videoqa.py scores it)
        "answers_correct": sum(r["status"] == "ok" and is_correct(r["text"], r["answer"]) for r in scored),
    }
    summary.update(write_error=None, write_errno=None, write_fault=None)
    return pa.Table.from_pylist([build_row(PART_SUMMARY, summary, "part summary")], schema=PART_SUMMARY)


def failed_part(batch: pa.Table, error: OSError) -> pa.Table:
    """The summary of a part that was not written: no counts, the error to stop the run with."""
    summary = {name: 0 for name in PART_SUMMARY.names}
    summary.update(
        part=None,
        item_ids=[],
        error_kinds="{}",
        write_error=str(error) or type(error).__name__,
        write_errno=error.errno,
        write_fault="storage" if isinstance(error, StorageUnavailable) else "disk",
    )
    return pa.Table.from_pylist([build_row(PART_SUMMARY, summary, "part summary")], schema=PART_SUMMARY)
