"""Every Arrow schema of the pipeline, and the output schema's version.

* ``SCHEMA``: the output rows, as written to Parquet parts (pipeline.output) by the inference stage;
  ``KEY_COLUMNS`` identify a row for resume.
* ``WORK_FIELDS``: the work rows the driver builds from the input (pipeline.sources.work_row);
  ``DECODED_SCHEMA``: those rows after the decode stage, with ``DECODED_FIELDS`` added.
* ``PART_SUMMARY``: the one row per written part that the write stage returns to the driver.

Rows are built with ``build_row``: every field of the schema given, nothing else.
"""

from __future__ import annotations

import pyarrow as pa

# Bumped when the Parquet schema or the meaning of a column changes; written to every part's footer.
# 4 added `retryable` and `attempts` (at the end, so every v3 column keeps its position).
OUTPUT_SCHEMA_VERSION = 4
# The schema's share of the config fingerprint (pipeline.config.Config.fingerprint). Bumped only when the
# rows written for the same config would differ in content (what a column means, how text is made), not
# when columns are added: v4's new columns left it at 3, so output written by v3 keeps resuming.
FINGERPRINT_SCHEMA = 3

# The output contract (README "Output schema"); OUTPUT_SCHEMA_VERSION changes with it.
SCHEMA = pa.schema(
    [
        ("item_id", pa.string()),
        ("uri", pa.string()),
        ("media_type", pa.string()),  # "image" / "video" as decoded; null when decoding failed early
        ("task", pa.string()),  # "caption" / "qa"
        ("question", pa.string()),
        ("answer", pa.string()),  # reference answer from the input, when it has one
        ("question_type", pa.string()),
        ("text", pa.string()),  # the model's caption or answer; null on error
        ("status", pa.string()),  # "ok" / "error"
        ("error_kind", pa.string()),  # e.g. not_found, too_large, corrupt, decode_timeout, inference_failed
        ("error", pa.string()),  # human-readable message
        ("model", pa.string()),
        ("pruning_method", pa.string()),
        ("pruning_budget", pa.int32()),
        ("visual_tokens_total", pa.int32()),
        ("visual_tokens_kept", pa.int32()),
        ("visual_tokens_layer_mean", pa.float64()),  # averaged over LLM layers (TwigVLM's R-bar)
        ("decode_strategy", pa.string()),
        ("generated_tokens", pa.int32()),
        ("drafted_tokens", pa.int32()),  # SSD: tokens the twig drafted (null for greedy)
        ("accepted_tokens", pa.int32()),  # SSD: drafts the base accepted
        ("draft_rounds", pa.int32()),  # SSD: verification rounds
        ("num_frames", pa.int32()),
        ("prefill_flops", pa.float64()),
        ("kv_cache_bytes", pa.int64()),
        ("latency_ms", pa.float64()),  # this row's share of its engine batch's wall time
        ("prefill_ms", pa.float64()),  # of which preprocessing, vision tower, pruning and prefill
        ("generate_ms", pa.float64()),  # of which token generation (greedy steps or SSD rounds)
        ("decode_ms", pa.float64()),  # read + decode wall time of the media
        ("config_fingerprint", pa.string()),
        ("run_id", pa.string()),
        ("created_at", pa.timestamp("ms", tz="UTC")),
        # v4. True: the row failed on storage that stayed unavailable (transient: a later run may succeed);
        # False: any other error (not found, corrupt, inference_failed, ...); null on ok rows.
        ("retryable", pa.bool_()),
        ("attempts", pa.int32()),  # reads of the row's media tried (1 unless retried); null in v3 parts
    ]
)
KEY_COLUMNS = ["item_id", "config_fingerprint"]

# The work rows the driver builds from the input (pipeline.sources.work_row).
WORK_FIELDS = [
    ("item_id", pa.string()),
    ("uri", pa.string()),
    ("media_type", pa.string()),
    ("question", pa.string()),
    ("answer", pa.string()),
    ("question_type", pa.string()),
]
# Columns the decode stage adds to the work rows.
DECODED_FIELDS = [
    ("frames", pa.large_binary()),  # uint8 RGB frames, C order, shape in frame_shape
    ("frame_shape", pa.list_(pa.int32())),  # [T, H, W, 3]
    ("error_kind", pa.string()),
    ("error", pa.string()),
    ("retryable", pa.bool_()),  # on a read error: transient (storage unavailable) or not; null when decoded
    ("attempts", pa.int32()),  # reads tried (pipeline.faults.with_retries)
    ("decode_ms", pa.float64()),
]
DECODED_SCHEMA = pa.schema(WORK_FIELDS + DECODED_FIELDS)

# One row per part the write stage wrote, streamed back to the driver.
PART_SUMMARY = pa.schema(
    [
        ("part", pa.string()),
        ("item_ids", pa.list_(pa.string())),
        ("rows", pa.int64()),
        ("ok", pa.int64()),
        ("error_kinds", pa.string()),  # JSON {kind: count}
        ("retryable_errors", pa.int64()),  # rows in error with retryable=True: storage was unavailable
        ("generated_tokens", pa.int64()),
        ("visual_tokens_kept", pa.int64()),
        ("visual_tokens_total", pa.int64()),
        ("latency_ms", pa.float64()),
        ("prefill_ms", pa.float64()),
        ("generate_ms", pa.float64()),
        ("decode_ms", pa.float64()),
        ("write_ms", pa.float64()),
        # SSD, summed over the ok rows that have draft counts (0 without SSD); the driver's ratios are exact.
        ("drafted_tokens", pa.int64()),
        ("accepted_tokens", pa.int64()),
        ("draft_rounds", pa.int64()),
        ("ssd_generated_tokens", pa.int64()),  # generated tokens of those rows
        # QA rows with a reference answer, and how many of them the model answered right (errors: wrong).
        ("answers_scored", pa.int64()),
        ("answers_correct", pa.int64()),
        # A part that could not be written (disk full, read-only, storage gone past the retries): the task
        # reports it here rather than raising, so the driver stops the run with the error itself (Ray would
        # wrap it in its own exception text). All counts are 0 then: nothing of the batch was written.
        ("write_error", pa.string()),
        ("write_errno", pa.int32()),
        ("write_fault", pa.string()),  # "storage" (StorageUnavailable) or "disk" (an OSError)
    ]
)


def build_row(schema: pa.Schema, values: dict, what: str = "row") -> dict:
    """A row of ``schema`` (a dict in its field order) from ``values``, which must give every field.

    A null is given as None: a field left out is a mistake, not a null. Raises ``ValueError`` naming
    the fields missing from ``values`` and the keys of ``values`` that ``schema`` does not have,
    e.g. "output row is missing fields: text, status".
    """
    names = schema.names
    missing = [name for name in names if name not in values]
    known = set(names)
    unknown = [key for key in values if key not in known]
    problems = []
    if missing:
        problems.append(f"is missing fields: {', '.join(missing)}")
    if unknown:
        problems.append(f"has fields not in its schema: {', '.join(map(str, unknown))}")
    if problems:
        raise ValueError(f"{what} {'; and '.join(problems)}")
    return {name: values[name] for name in names}
