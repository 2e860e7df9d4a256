"""Random-weight checkpoints with the geometry of real models, widths scaled to fit this CPU.

The demo model's vision tower costs over half of its prefill; LLaVA-1.5-7B's costs about 4 %. An
end-to-end ratio measured on the demo model therefore says more about the demo model than about
pruning. These checkpoints keep a real model's proportions: every depth, the image size, the
patch size (so the visual tokens per image), the head size and the MLP ratios are the real
model's; every width is multiplied by ``width_scale`` (heads scale with it), and the vocabulary
too, so the LM head keeps its share of a decode step (its cost is vocabulary x width against the
layers' width squared). What changes with the scale is the share of attention's S² term, which
grows as widths shrink: the prefill FLOPs each run reports (``operators.accounting``) count it.

    python jobs/benchmark.py --geometry llava-1.5-7b --task qa --videos 0 ...

Saved as a checkpoint folder (safetensors, processor, tokenizer) that ``model.path`` loads like
any other, so the benchmark runs the real pipeline on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

MARKER = "geometry.json"


@dataclass(frozen=True)
class Geometry:
    """A real model's shape; ``widths`` are scaled, everything else is kept."""

    name: str
    model_type: str
    image_size: int
    patch_size: int
    vision_layers: int
    vision_width: int
    vision_mlp: int
    vision_head_dim: int
    text_layers: int
    text_width: int
    text_mlp: int
    text_head_dim: int
    text_kv_heads: int  # at full width
    vocab: int
    note: str
    tokens_per_image: int = 576  # visual tokens the language model sees per image, unpruned
    extra: dict = field(default_factory=dict)  # family-specific settings, kept as the real model's

    def scaled(self, width_scale: float) -> dict:
        """The sizes at ``width_scale``: widths, MLPs, heads and vocabulary scaled, depths kept."""

        def heads(width: int, head_dim: int) -> int:
            return max(1, round(width * width_scale / head_dim))

        vision_heads = heads(self.vision_width, self.vision_head_dim)
        text_heads = heads(self.text_width, self.text_head_dim)
        kv_ratio = (self.text_width // self.text_head_dim) // self.text_kv_heads
        return dict(
            vision_width=vision_heads * self.vision_head_dim,
            vision_heads=vision_heads,
            vision_mlp=round(self.vision_mlp * width_scale),
            text_width=text_heads * self.text_head_dim,
            text_heads=text_heads,
            text_kv_heads=max(1, text_heads // kv_ratio),
            text_mlp=round(self.text_mlp * width_scale),
            vocab=round(self.vocab * width_scale),
        )


GEOMETRIES = {
    "llava-1.5-7b": Geometry(
        name="llava-1.5-7b",
        model_type="llava",
        image_size=336,
        patch_size=14,  # 576 visual tokens, CLIP ViT-L/14-336, feature layer -2
        vision_layers=24,
        vision_width=1024,
        vision_mlp=4096,
        vision_head_dim=64,
        text_layers=32,  # Vicuna-7B
        text_width=4096,
        text_mlp=11008,
        text_head_dim=128,
        text_kv_heads=32,
        vocab=32000,
        note="liuhaotian/llava-v1.5-7b / llava-hf/llava-1.5-7b-hf",
    ),
    # Qwen2.5-VL-7B-Instruct. Images are sized dynamically by the real model; here every square image
    # (the benchmark corpus's) is resized to 672 x 672 px, 48 x 48 patches of 14 px, merged 2x2 into
    # 576 tokens (as LLaVA-1.5's), so the two geometries see the same number of visual tokens. Its
    # tower is large next to LLaVA-1.5's: 2,304 patches through 32 blocks of width 1280.
    "qwen2.5-vl-7b": Geometry(
        name="qwen2.5-vl-7b",
        model_type="qwen2_5_vl",
        image_size=672,
        patch_size=14,
        vision_layers=32,
        vision_width=1280,
        vision_mlp=3420,
        vision_head_dim=80,
        text_layers=28,  # Qwen2-7B
        text_width=3584,
        text_mlp=18944,
        text_head_dim=128,
        text_kv_heads=4,
        vocab=152064,
        note="Qwen/Qwen2.5-VL-7B-Instruct",
        extra=dict(window_size=112, fullatt_block_indexes=[7, 15, 23, 31], mrope_section=[16, 24, 24]),
    ),
}


def build_checkpoint(name: str, out: Path, width_scale: float = 0.125, seed: int = 0) -> Path:
    """Save a random-weight checkpoint of geometry ``name`` at ``width_scale`` under ``out`` (once:
    an existing folder built with the same arguments is reused). Returns the folder."""
    import json

    geometry = GEOMETRIES[name]
    folder = Path(out) / f"{name}-w{width_scale:g}-s{seed}"
    wanted = {"geometry": name, "width_scale": width_scale, "seed": seed}
    marker = folder / MARKER
    if marker.exists() and json.loads(marker.read_text()).get("built") == wanted:
        return folder
    sizes = geometry.scaled(width_scale)
    model, processor = build_model(name, width_scale, seed)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    marker.write_text(json.dumps({"built": wanted, "sizes": sizes, "real": geometry.note}, indent=2))
    return folder


def build_model(name: str, width_scale: float = 0.125, seed: int = 0):
    """(model, processor) of geometry ``name`` at ``width_scale``, random weights, in memory."""
    geometry = GEOMETRIES[name]
    builders = {"llava": _llava, "qwen2_5_vl": _qwen2_5_vl}
    return builders[geometry.model_type](geometry, geometry.scaled(width_scale), seed)


def _qwen2_5_vl(geometry: Geometry, sizes: dict, seed: int):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from training.builders import qwen_image_processor, qwen_tokenizer, random_qwen_vl

    text = dict(
        hidden_size=sizes["text_width"],
        intermediate_size=sizes["text_mlp"],
        num_hidden_layers=geometry.text_layers,
        num_attention_heads=sizes["text_heads"],
        num_key_value_heads=sizes["text_kv_heads"],
        max_position_embeddings=32768,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": geometry.extra["mrope_section"]},
    )
    vision = dict(
        depth=geometry.vision_layers,
        hidden_size=sizes["vision_width"],
        intermediate_size=sizes["vision_mlp"],
        num_heads=sizes["vision_heads"],
        patch_size=geometry.patch_size,
        spatial_merge_size=2,
        temporal_patch_size=2,
        tokens_per_second=2,
        window_size=geometry.extra["window_size"],
        fullatt_block_indexes=geometry.extra["fullatt_block_indexes"],
    )
    tokenizer = qwen_tokenizer(extra_words=max(200, sizes["vocab"] - 130))
    # Every square image resized to exactly tokens_per_image merged tokens (min = max pixels).
    image_processor = qwen_image_processor(geometry.patch_size, geometry.tokens_per_image, geometry.tokens_per_image)
    return random_qwen_vl(Qwen2_5_VLForConditionalGeneration, tokenizer, text, vision, image_processor, seed)


def _llava(geometry: Geometry, sizes: dict, seed: int):
    from transformers import CLIPVisionConfig

    from training.builders import basic_tokenizer, llama_config, random_llava

    tokenizer = basic_tokenizer(extra_words=max(200, sizes["vocab"] - 120))
    vision = CLIPVisionConfig(
        image_size=geometry.image_size,
        patch_size=geometry.patch_size,
        hidden_size=sizes["vision_width"],
        intermediate_size=sizes["vision_mlp"],
        num_hidden_layers=geometry.vision_layers,
        num_attention_heads=sizes["vision_heads"],
        projection_dim=32,
    )
    text = llama_config(
        tokenizer,
        hidden_size=sizes["text_width"],
        intermediate_size=sizes["text_mlp"],
        num_hidden_layers=geometry.text_layers,
        num_attention_heads=sizes["text_heads"],
        num_key_value_heads=sizes["text_kv_heads"],
        max_position_embeddings=4096,
    )
    return random_llava(tokenizer, vision, text, seed=seed)
