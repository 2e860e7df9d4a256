"""Loading checkpoints of the registered model families (safetensors only) from a directory or an
object-store URI."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from operators.families.base import FamilyAdapter, adapter_class

# Files a checkpoint directory may hold that we copy from object storage; weights must be safetensors.
CHECKPOINT_SUFFIXES = (".safetensors", ".json", ".txt", ".model", ".jinja", ".tiktoken")
DEFAULT_CACHE = Path(os.environ.get("VLM_MODEL_CACHE", Path.home() / ".cache" / "vlm-batch" / "models"))


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def fetch_checkpoint(uri: str, cache_dir: str | Path | None = None, storage_options: dict | None = None) -> Path:
    """Copy a checkpoint prefix from object storage into a local cache once; return the local directory.

    The copy lands in a temporary sibling and is renamed into place, so a crash or a concurrent
    loader never sees a half-copied checkpoint.
    """
    import fsspec

    cache = Path(cache_dir) if cache_dir else DEFAULT_CACHE
    target = cache / hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:16]
    if (target / "config.json").exists():
        return target
    fs, root = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    names = [p for p in fs.find(root) if p.endswith(CHECKPOINT_SUFFIXES)]
    if not any(n.endswith("config.json") for n in names):
        raise FileNotFoundError(f"no config.json under {uri}")

    def copy(staging: Path) -> None:
        for name in names:
            local = staging / os.path.relpath(name, root.rstrip("/"))
            local.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(name, str(local))

    return stage_directory(target, copy)


def stage_directory(target: Path, fill) -> Path:
    """Build ``target`` through ``fill(staging)`` in a temporary sibling renamed into place, so a
    crash or a concurrent loader never sees a half-written directory. Returns ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".partial-"))
    try:
        fill(staging)
        try:
            staging.rename(target)
        except OSError:  # another process won the race; theirs is complete
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def model_family(directory: Path) -> type[FamilyAdapter]:
    """The adapter class of the checkpoint's ``model_type``; ValueError if no family serves it."""
    model_type = json.loads((directory / "config.json").read_text()).get("model_type")
    try:
        return adapter_class(model_type)
    except ValueError as e:
        raise ValueError(f"{directory}: {e}") from None


def load_vlm(
    source: str | Path,
    dtype: torch.dtype | str = "auto",
    device: str | torch.device = "cpu",
    cache_dir: str | Path | None = None,
    storage_options: dict | None = None,
) -> tuple[nn.Module, object]:
    """Load (model, processor) from a local directory or an object-store URI (e.g. s3://bucket/llava/).
    Hugging Face hub ids: ``pipeline.models.checkpoint_directory`` fetches them to a directory first.

    The language model runs on SDPA; [CLS] attention comes from a hook (operators.vision), so the
    vision tower needs no eager attention. Only safetensors weights load; remote code never runs.
    """
    import transformers

    source = str(source)
    if is_remote(source):
        directory = fetch_checkpoint(source, cache_dir, storage_options)
    else:
        directory = Path(source.removeprefix("file://"))
    if not (directory / "config.json").exists():
        raise FileNotFoundError(f"{directory} is not a checkpoint directory (no config.json)")
    if not any(directory.glob("*.safetensors")):
        raise FileNotFoundError(f"{directory} has no .safetensors weights (only safetensors checkpoints are loaded)")
    adapter = model_family(directory)
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    model = getattr(transformers, adapter.model_class).from_pretrained(
        directory, dtype=dtype, use_safetensors=True, trust_remote_code=False, attn_implementation="sdpa"
    )
    model.to(device).eval()
    return model, adapter.load_processor(directory)
