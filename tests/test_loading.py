"""Loading checkpoints from a directory and from an object-store URI (fsspec)."""

import shutil

import fsspec
import pytest
import torch

from operators.engine import Engine, EngineConfig, Request, format_prompt
from operators.loading import fetch_checkpoint, load_vlm
from tests.conftest import random_image, random_video
from tests.tiny_models import save_tiny


@pytest.mark.parametrize("family", ["llava", "llava_next", "video_llava"])
def test_saved_checkpoint_loads_and_generates_like_the_original(tmp_path, tiny, family):
    directory = save_tiny(family, tmp_path / family, seed=0)
    model, processor = load_vlm(directory)
    original, original_processor = tiny(family)
    kind = "video" if family == "video_llava" else "image"
    media = {"video": random_video(1)} if kind == "video" else {"images": [random_image(1)]}
    request = Request(format_prompt(processor, "what is this ?", kind), **media)
    loaded = Engine(model, processor, EngineConfig(max_new_tokens=5)).generate([request])[0]
    reference = Engine(original, original_processor, EngineConfig(max_new_tokens=5)).generate([request])[0]
    assert loaded.token_ids == reference.token_ids
    assert model.config._attn_implementation == "sdpa"


def test_object_store_uri_is_copied_once_into_the_cache(tmp_path):
    directory = save_tiny("llava", tmp_path / "ckpt")
    fs = fsspec.filesystem("memory")
    for path in directory.iterdir():
        fs.pipe(f"/bucket/models/llava/{path.name}", path.read_bytes())
    cache = tmp_path / "cache"
    local = fetch_checkpoint("memory://bucket/models/llava/", cache)
    assert (local / "config.json").exists() and any(local.glob("*.safetensors"))
    assert not list(cache.glob(".partial-*"))  # staging directory renamed away
    fs.rm("/bucket/models/llava", recursive=True)  # a second load must not touch the store
    model, _ = load_vlm("memory://bucket/models/llava/", cache_dir=cache)
    assert isinstance(model.lm_head.weight, torch.Tensor)


def test_refuses_checkpoints_without_safetensors(tmp_path):
    directory = save_tiny("llava", tmp_path / "ckpt")
    for weights in directory.glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_vlm(directory)


def test_refuses_unsupported_model_type(tmp_path):
    directory = save_tiny("llava", tmp_path / "ckpt")
    config = (directory / "config.json").read_text().replace('"model_type": "llava"', '"model_type": "qwen2_vl"')
    (directory / "config.json").write_text(config)
    with pytest.raises(ValueError, match="supported: llava, llava_next, video_llava, llava_onevision"):
        load_vlm(directory)


def test_missing_remote_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        fetch_checkpoint("memory://bucket/nothing-here/", tmp_path)
    shutil.rmtree(tmp_path, ignore_errors=True)
