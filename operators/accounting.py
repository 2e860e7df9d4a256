"""FLOPs and KV-cache estimates per sample.

Prefill FLOPs use 2 FLOPs per multiply-accumulate:
* language model, per layer with n tokens, hidden d, FFN width m (SwiGLU, 3 matrices):
  8nd^2 (q, k, v, o projections) + 4n^2d (scores and weighted sum) + 6ndm (FFN);
  GQA's smaller k/v projections are ignored, as in the papers' tables;
* vision tower, per layer with n = patches + 1 tokens, width c, MLP width f (2 matrices):
  8nc^2 + 4n^2c + 4ncf, plus the patch embedding 2 * patches * (3 p^2) * c;
* projector (2-layer MLP c -> D -> D) on the tokens that reach the language model.
"""

from __future__ import annotations


def transformer_layer_flops(n: int, d: int, m: int, ffn_matrices: int = 3) -> float:
    return 8.0 * n * d * d + 4.0 * n * n * d + 2.0 * ffn_matrices * n * d * m


def language_model_flops(text_config, tokens_per_layer: list[int]) -> float:
    """Prefill FLOPs of the decoder for one row; ``tokens_per_layer`` [L] is n for each layer."""
    d, m = text_config.hidden_size, text_config.intermediate_size
    return sum(transformer_layer_flops(n, d, m) for n in tokens_per_layer)


def vision_tower_flops(vision_config, segments: int) -> float:
    c, f = vision_config.hidden_size, vision_config.intermediate_size
    patches = (vision_config.image_size // vision_config.patch_size) ** 2
    per_segment = vision_config.num_hidden_layers * transformer_layer_flops(patches + 1, c, f, ffn_matrices=2)
    per_segment += 2.0 * patches * 3 * vision_config.patch_size**2 * c
    return segments * per_segment


def projector_flops(vision_width: int, text_width: int, tokens: int) -> float:
    return 2.0 * tokens * (vision_width * text_width + text_width * text_width)


def vision_flops(adapter, media, segments, kept_per_segment: int, rows_sharing: int = 1) -> float:
    """Tower + projector FLOPs for one media item of one row. When ``rows_sharing`` rows share one
    tower pass over the item (questions about the same video), each is charged an equal share of it,
    so the rows' sum is what ran; every row runs its own projector on the tokens it keeps."""
    if hasattr(adapter, "vision_flops"):  # towers unlike CLIP's (Qwen-VL) estimate their own
        return adapter.vision_flops(media, segments, kept_per_segment, rows_sharing)
    config = adapter.config
    count = media.pixel_values.shape[0]
    projected = adapter.projected_tokens(media, segments, kept_per_segment)
    return vision_tower_flops(config.vision_config, count) / rows_sharing + projector_flops(
        config.vision_config.hidden_size, config.text_config.hidden_size, projected
    )


def kv_cache_bytes(text_config, tokens_per_layer: list[int], element_size: int) -> int:
    """Bytes of K and V for one row's prompt across all layers."""
    heads = text_config.num_attention_heads
    kv_heads = getattr(text_config, "num_key_value_heads", None) or heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
    return int(sum(tokens_per_layer) * 2 * kv_heads * head_dim * element_size)


def generated_token_flops(text_config) -> float:
    """Dense FLOPs of the base model per generated token: every layer's projections and FFN plus the
    LM head. Attention over the cache (4·n·d per layer) is left out; it is small next to these for
    short contexts and depends on each row's cache length."""
    d, m = text_config.hidden_size, text_config.intermediate_size
    return text_config.num_hidden_layers * (8.0 * d * d + 6.0 * d * m) + 2.0 * d * text_config.vocab_size
