"""Random-weight checkpoints with real models' proportions (evaluation.geometry), for the benchmark."""

from types import SimpleNamespace

import pytest
from transformers import AutoConfig

from evaluation.geometry import GEOMETRIES, build_checkpoint
from operators.accounting import language_model_flops, vision_tower_flops


def configs(geometry, scale):
    """(vision, text) configs as the accounting reads them, at ``scale``, without building weights."""
    sizes = geometry.scaled(scale)
    vision = SimpleNamespace(
        hidden_size=sizes["vision_width"],
        intermediate_size=sizes["vision_mlp"],
        num_hidden_layers=geometry.vision_layers,
        image_size=geometry.image_size,
        patch_size=geometry.patch_size,
    )
    text = SimpleNamespace(hidden_size=sizes["text_width"], intermediate_size=sizes["text_mlp"])
    return vision, text, sizes


def vision_share(geometry, scale, text_tokens=40):
    vision, text, _ = configs(geometry, scale)
    patches = (geometry.image_size // geometry.patch_size) ** 2
    tower = vision_tower_flops(vision, 1)
    lm = language_model_flops(text, [patches + text_tokens] * geometry.text_layers)
    return tower / (tower + lm)


def test_full_scale_is_the_real_model():
    _, _, sizes = configs(GEOMETRIES["llava-1.5-7b"], 1.0)
    assert sizes == dict(
        vision_width=1024, vision_heads=16, vision_mlp=4096,
        text_width=4096, text_heads=32, text_kv_heads=32, text_mlp=11008, vocab=32000,
    )  # fmt: skip
    _, _, sizes = configs(GEOMETRIES["qwen2.5-vl-7b"], 1.0)
    assert sizes == dict(
        vision_width=1280, vision_heads=16, vision_mlp=3420,
        text_width=3584, text_heads=28, text_kv_heads=4, text_mlp=18944, vocab=152064,
    )  # fmt: skip


def test_scaled_widths_keep_the_vision_share_of_prefill():
    """LLaVA-1.5-7B's tower is 4.5 % of its prefill; at 1/8 of the widths 6.0 % (attention's n^2 term
    shrinks less than the projections), where the demo model's is over half."""
    geometry = GEOMETRIES["llava-1.5-7b"]
    full, eighth = vision_share(geometry, 1.0), vision_share(geometry, 0.125)
    assert 0.03 < full < 0.06
    assert 0 < eighth - full < 0.02


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=[pytest.mark.slow] if n.startswith("qwen") else []) for n in sorted(GEOMETRIES)]
)
def test_a_built_checkpoint_keeps_depths_and_tokens_and_is_reused(name, tmp_path):
    from PIL import Image

    from operators.engine import Engine, EngineConfig, Request, format_prompt
    from operators.loading import load_vlm

    geometry = GEOMETRIES[name]
    folder = build_checkpoint(name, tmp_path, width_scale=1 / 32)
    config = AutoConfig.from_pretrained(folder)
    vision_depth = getattr(config.vision_config, "depth", None) or config.vision_config.num_hidden_layers
    assert config.model_type == geometry.model_type and vision_depth == geometry.vision_layers
    assert config.text_config.num_hidden_layers == geometry.text_layers
    assert config.text_config.hidden_size == geometry.scaled(1 / 32)["text_width"]
    # What the language model sees per square image (the corpus's), whatever its size: the real model's
    # count (Qwen keeps the aspect ratio of others, so their count is about this).
    model, processor = load_vlm(str(folder))
    engine = Engine(model, processor, EngineConfig(max_new_tokens=2, ignore_eos=True))
    image = Image.new("RGB", (80, 80), (200, 30, 30))
    result = engine.generate([Request(format_prompt(processor, "describe the image ."), images=[image])])[0]
    assert result.visual_tokens_total == geometry.tokens_per_image and len(result.token_ids) == 2
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert build_checkpoint(name, tmp_path, width_scale=1 / 32) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp  # built once
