"""Inference stage (GPU actor pool): decoded rows in, output rows (schema.SCHEMA) out.

A callable class: the constructor loads the model once per actor (from a local directory, an
object-store URI or a Hugging Face hub id, cached on the node), ``__call__`` runs the engine on a
batch. Rows that failed to decode pass through as error rows; if the engine fails on a batch, each
row is retried alone so one bad row cannot take its neighbours down with it.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

import pyarrow as pa
from PIL import Image

from pipeline.config import Config
from pipeline.decode import frames_of
from pipeline.schema import SCHEMA, build_row

log = logging.getLogger(__name__)

# The output columns the engine's result fills (in ok_row); null on a row in error.
RESULT_COLUMNS = (
    "text",
    "visual_tokens_total",
    "visual_tokens_kept",
    "visual_tokens_layer_mean",
    "generated_tokens",
    "drafted_tokens",
    "accepted_tokens",
    "draft_rounds",
    "prefill_flops",
    "kv_cache_bytes",
    "latency_ms",
    "prefill_ms",
    "generate_ms",
)


def pick_device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("model.device=cuda but this actor sees no CUDA device (set compute.gpus_per_actor >= 1)")
    return requested


class InferenceStage:
    """Loads the model once; ``__call__(batch)`` captions or answers every row of the batch."""

    def __init__(self, config: Config, storage_config: dict | None, run_id: str):
        import torch
        from transformers.utils import logging as hf_logging

        from operators.cpu_linear import apply_cpu_linear
        from operators.engine import Engine
        from operators.loading import load_vlm
        from pipeline.models import checkpoint_directory
        from pipeline.storage import fsspec_options

        self.config = cfg = config  # validated once, on the driver (pickled here as it is)
        self.run_id = run_id
        self.fingerprint = cfg.fingerprint()
        torch.set_num_threads(cfg.compute.torch_threads or max(1, int(cfg.compute.cpus_per_actor)))
        # Hugging Face's "Loading weights" bar would reach the driver's stderr (log_to_driver) as a
        # line of carriage returns per actor start; its warnings are left on.
        hf_logging.disable_progress_bar()
        device = pick_device(cfg.model.device)
        dtype = cfg.model.dtype
        if dtype == "auto":
            dtype = "bfloat16" if device == "cuda" else "float32"
        options = fsspec_options(cfg.model.path, **(storage_config or {}))
        directory = checkpoint_directory(cfg.model.path, storage_options=options)
        model, processor = load_vlm(directory, dtype=dtype, device=device)
        twig = None
        if cfg.decode.twig:
            from operators.twig import load_twig
            from pipeline.models import local_twig

            twig_options = fsspec_options(cfg.decode.twig, **(storage_config or {}))
            # A hub model's twig (hf://org/name/twig) is in the snapshot just fetched.
            twig = load_twig(local_twig(cfg.decode.twig), model, storage_options=twig_options)
        if device == "cpu":  # oneDNN-packed linears: decoding's few rows run near the weights' read time
            apply_cpu_linear(cfg.compute.cpu_linear, model, twig)
        self.engine = Engine(model, processor, cfg.to_engine_config(), twig=twig)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        bases = [base_values(r, self.config, self.fingerprint, self.run_id) for r in rows]
        out: list[dict | None] = [None] * len(rows)
        for i, (row, base) in enumerate(zip(rows, bases, strict=True)):
            if row["error_kind"] is not None:  # failed to decode: passes through as an error row
                out[i] = error_row(base)
        todo = [i for i, o in enumerate(out) if o is None]
        if todo:
            done = self.run_rows([rows[i] for i in todo], [bases[i] for i in todo])
            for i, row in zip(todo, done, strict=True):
                out[i] = row
        assert len(out) == len(rows)
        return pa.Table.from_pylist(out, schema=SCHEMA)

    def run_rows(self, rows: list[dict], bases: list[dict]) -> list[dict]:
        """Output rows for ``rows``; a batch failure falls back to one row at a time."""
        try:
            return self.generate(rows, bases)
        except Exception as batch_error:
            if len(rows) == 1:
                # the engine failed on this row alone: rerunning the same row with the same model fails again
                error = _describe(batch_error)
                return [error_row(bases[0], error_kind="inference_failed", error=error, retryable=False)]
            log.warning("engine batch of %d failed (%s); retrying rows one at a time", len(rows), batch_error)
            return [out for row, base in zip(rows, bases, strict=True) for out in self.run_rows([row], [base])]

    def generate(self, rows: list[dict], bases: list[dict]) -> list[dict]:
        requests = [self.request(row) for row in rows]
        results = self.engine.generate(requests)
        return [ok_row(base, result) for base, result in zip(bases, results, strict=True)]

    def request(self, row: dict):
        from operators.engine import Request, format_prompt

        frames = frames_of(row)
        kind = row["media_type"]
        prompt = self.config.prompt
        if self.config.task == "qa":
            text = prompt.question.format(question=row["question"])
        else:
            text = prompt.caption_video if kind == "video" and prompt.caption_video else prompt.caption
        processor = self.engine.processor
        # QA rows about one file share its vision encoding within a batch (keyed by URI); sampling
        # seeds each row from its item id, so a rerun samples the same text whatever the batching.
        keys = {"media_key": row["uri"], "sample_key": row["item_id"]}
        if kind == "image":
            return Request(format_prompt(processor, text, "image"), images=[Image.fromarray(frames[0])], **keys)
        return Request(format_prompt(processor, text, "video"), video=frames, **keys)


def base_values(row: dict, config: Config, fingerprint: str, run_id: str) -> dict:
    """The values of ``row``'s output row that do not depend on inference: all but status and RESULT_COLUMNS."""
    failed = row["error_kind"] is not None
    return {
        "item_id": row["item_id"],
        "uri": row["uri"],
        "media_type": row["media_type"],
        "task": config.task,
        "question": row["question"],
        "answer": row["answer"],
        "question_type": row["question_type"],
        "error_kind": row["error_kind"],
        "error": row["error"],
        "model": config.model.display_name,
        "pruning_method": config.pruning.method,
        "pruning_budget": config.pruning.budget,
        "decode_strategy": config.decode.strategy,
        "num_frames": None if failed else row["frame_shape"][0],
        "decode_ms": row["decode_ms"],
        "retryable": row["retryable"],  # a decode error's, or null (ok_row keeps it null)
        "attempts": row["attempts"],
        "config_fingerprint": fingerprint,
        "run_id": run_id,
        "created_at": datetime.now(UTC),
    }


def error_row(base: dict, **error) -> dict:
    """An output row in error: ``base`` (with the decode error, or ``error_kind``/``error`` given), no results."""
    return build_row(SCHEMA, {**base, **dict.fromkeys(RESULT_COLUMNS), "status": "error", **error}, "output row")


def ok_row(base: dict, result) -> dict:
    """The output row of an item the engine answered: ``base`` plus the engine's ``Result``."""
    generate_ms = result.stage_ms.get("decode", 0.0)  # the engine's "decode" is token generation
    latency_ms = sum(result.stage_ms.values())
    values = {
        "status": "ok",
        "retryable": None,  # only rows in error say whether a later run may succeed
        "text": result.text,
        "visual_tokens_total": result.visual_tokens_total,
        "visual_tokens_kept": result.visual_tokens_kept,
        "visual_tokens_layer_mean": result.visual_tokens_layer_mean,
        "generated_tokens": len(result.token_ids),
        "drafted_tokens": result.drafted,
        "accepted_tokens": result.accepted,
        "draft_rounds": result.rounds,
        "prefill_flops": result.prefill_flops,
        "kv_cache_bytes": result.kv_cache_bytes,
        "latency_ms": latency_ms,
        "prefill_ms": latency_ms - generate_ms,
        "generate_ms": generate_ms,
    }
    return build_row(SCHEMA, {**base, **values}, "output row")


def _describe(error: Exception) -> str:
    text = f"{type(error).__name__}: {error}"
    return text if len(text) <= 2000 else text[:2000] + " ..."
