"""Tiny random-weight Qwen2.5-VL and Qwen3-VL checkpoints for the tests, built from configs in code (no downloads)."""

from __future__ import annotations

from transformers import Qwen2_5_VLForConditionalGeneration, Qwen3VLForConditionalGeneration

from training.builders import qwen_image_processor, qwen_tokenizer, random_qwen_vl


def tiny_qwen2_5_vl(seed: int = 0, patch_size: int = 4, window_size: int = 16, **text_overrides):
    """Qwen2_5_VLForConditionalGeneration: 4 tower blocks (full attention in 1 and 3, 2x2-merge-unit
    windows elsewhere), a 4-layer GQA LM with M-RoPE (mrope_section 2+3+3 of head_dim/2 = 8)."""
    text = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
    )
    text.update(text_overrides)
    vision = dict(
        depth=4,
        hidden_size=32,
        intermediate_size=64,
        num_heads=4,
        patch_size=patch_size,
        spatial_merge_size=2,
        temporal_patch_size=2,
        tokens_per_second=2,
        window_size=window_size,
        fullatt_block_indexes=[1, 3],
    )
    processor = qwen_image_processor(patch_size)
    return random_qwen_vl(Qwen2_5_VLForConditionalGeneration, qwen_tokenizer(), text, vision, processor, seed)


def tiny_qwen3_vl(seed: int = 0, patch_size: int = 4, **text_overrides):
    """Qwen3VLForConditionalGeneration: 4 tower blocks with DeepStack taps after blocks 1 and 2 (added
    after LM layers 0 and 1), learned position grid 8x8, a 4-layer GQA LM with q/k norms and
    interleaved M-RoPE."""
    text = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2]},
    )
    text.update(text_overrides)
    vision = dict(
        depth=4,
        hidden_size=32,
        intermediate_size=64,
        num_heads=4,
        patch_size=patch_size,
        spatial_merge_size=2,
        temporal_patch_size=2,
        num_position_embeddings=64,
        deepstack_visual_indexes=[1, 2],
    )
    processor = qwen_image_processor(patch_size)
    return random_qwen_vl(Qwen3VLForConditionalGeneration, qwen_tokenizer(), text, vision, processor, seed)
