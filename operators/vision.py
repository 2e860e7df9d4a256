"""Vision-tower features and [CLS] attention from one layer, captured by hooks.

VisPruner needs the layer -2 patch features and that same layer's [CLS]->patch attention.
Asking a Hugging Face CLIP tower for ``output_attentions`` would force eager attention and keep
every layer's [B, H, N, N] map (about 256 MB per image for CLIP-L in fp16). Instead we hook the
one layer: a pre-hook on its self-attention grabs the normalised input, and we recompute only
the [CLS] query row, softmax(q_cls . K^T * scale), which is [B, H, N+1]. The tower itself keeps
running on SDPA.

Towers without [CLS] (SigLIP in LLaVA-OneVision) use :func:`encode_with_received_attention`: the
same hooks, scoring each patch by the attention it receives, averaged over every query (the
authors' SigLIP rule), computed a chunk of query rows at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class VisionOutput:
    features: torch.Tensor  # [B, 1+N, C] hidden states of the selected layer (CLS first)
    cls_attention: torch.Tensor  # [B, H, N] [CLS] -> patch attention of that layer, not renormalised


def encoder_layers(vision_tower: nn.Module) -> nn.ModuleList:
    """The transformer layers of a CLIP-style vision tower."""
    inner = getattr(vision_tower, "vision_model", vision_tower)
    return inner.encoder.layers


def resolve_layer(num_layers: int, feature_layer: int) -> int:
    """Map HF's ``vision_feature_layer`` (an index into ``hidden_states``) to the encoder layer index.

    ``hidden_states`` has num_layers + 1 entries (embeddings first), so ``hidden_states[f]`` is the
    output of layer f-1 for f >= 1, and of layer num_layers + f for negative f.
    """
    if not isinstance(feature_layer, int):
        raise ValueError(f"only a single vision_feature_layer is supported, got {feature_layer!r}")
    index = feature_layer - 1 if feature_layer >= 0 else num_layers + feature_layer
    if not 0 <= index < num_layers:
        raise ValueError(f"vision_feature_layer {feature_layer} is outside a {num_layers}-layer tower")
    return index


def cls_attention_row(attn: nn.Module, normed: torch.Tensor) -> torch.Tensor:
    """[CLS]-query attention probabilities of a CLIP attention module. normed [B, 1+N, C] -> [B, H, N]."""
    batch, length, _ = normed.shape
    heads, head_dim = attn.num_heads, attn.head_dim
    q = attn.q_proj(normed[:, :1]).view(batch, 1, heads, head_dim).transpose(1, 2)  # [B, H, 1, Dh]
    k = attn.k_proj(normed).view(batch, length, heads, head_dim).transpose(1, 2)  # [B, H, 1+N, Dh]
    logits = (q.float() @ k.float().transpose(-1, -2)) * attn.scale  # [B, H, 1, 1+N]
    return logits.softmax(dim=-1)[:, :, 0, 1:]  # drop CLS->CLS, no renormalisation (as the authors)


def run_with_layer_hooks(
    vision_tower: nn.Module, pixel_values: torch.Tensor, feature_layer: int, score
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the tower once with hooks on the layer producing ``hidden_states[feature_layer]``.
    Returns (that layer's output, ``score(its attention module, the attention's normalised input)``)."""
    layers = encoder_layers(vision_tower)
    layer = layers[resolve_layer(len(layers), feature_layer)]
    captured: dict[str, torch.Tensor] = {}

    def grab_attention_input(module, args, kwargs):
        normed = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        captured["score"] = score(module, normed)

    def grab_layer_output(module, args, output):
        captured["features"] = output[0] if isinstance(output, tuple) else output

    handles = [
        layer.self_attn.register_forward_pre_hook(grab_attention_input, with_kwargs=True),
        layer.register_forward_hook(grab_layer_output),
    ]
    try:
        vision_tower(pixel_values=pixel_values.to(vision_tower.dtype))
    finally:
        for handle in handles:
            handle.remove()
    return captured["features"], captured["score"]


@torch.no_grad()
def encode_with_cls_attention(
    vision_tower: nn.Module, pixel_values: torch.Tensor, feature_layer: int = -2
) -> VisionOutput:
    """Run the tower once and return the selected layer's hidden states and [CLS] attention."""
    features, cls_attention = run_with_layer_hooks(vision_tower, pixel_values, feature_layer, cls_attention_row)
    return VisionOutput(features=features, cls_attention=cls_attention)


# --- towers without [CLS] (SigLIP): the attention each patch receives -----------------------------


@dataclass
class ReceivedAttentionOutput:
    features: torch.Tensor  # [B, N, C] hidden states of the selected layer (no CLS in SigLIP)
    received_attention: torch.Tensor  # [B, H, N] attention each patch receives, mean over all queries


# Largest [B, H, chunk, N] float32 block of attention probabilities alive at once (256 MB).
MAX_BLOCK_ELEMENTS = 1 << 26


def received_attention(attn: nn.Module, normed: torch.Tensor, query_chunk: int = 256) -> torch.Tensor:
    """Mean attention each token receives over every query position, per head. normed [B, N, C] -> [B, H, N].

    softmax(q_i . K^T * scale) is computed ``query_chunk`` query rows at a time (fewer when B is
    large, see ``MAX_BLOCK_ELEMENTS``: a batch of video frames) and summed over the rows, so only a
    [B, H, chunk, N] block is alive at once, never the whole [B, H, N, N] map.
    """
    batch, length, _ = normed.shape
    heads, head_dim = attn.num_heads, attn.head_dim
    query_chunk = max(1, min(query_chunk, MAX_BLOCK_ELEMENTS // (batch * heads * length)))
    k = attn.k_proj(normed).view(batch, length, heads, head_dim).transpose(1, 2).float()  # [B, H, N, Dh]
    total = k.new_zeros(batch, heads, length)
    for start in range(0, length, query_chunk):
        rows = normed[:, start : start + query_chunk]
        q = attn.q_proj(rows).view(batch, rows.shape[1], heads, head_dim).transpose(1, 2).float()  # [B, H, c, Dh]
        probs = ((q @ k.transpose(-1, -2)) * attn.scale).softmax(dim=-1)  # [B, H, c, N]
        total += probs.sum(dim=2)
    return total / length


@torch.no_grad()
def encode_with_received_attention(
    vision_tower: nn.Module, pixel_values: torch.Tensor, feature_layer: int = -1, query_chunk: int = 256
) -> ReceivedAttentionOutput:
    """VisPruner's importance for towers without [CLS] (SigLIP, as in LLaVA-OneVision).

    Rule, from the authors' released code (Theia-4869/VisPruner ``siglip_encoder.py``): a patch's
    score is the attention it *receives*, averaged over all query positions, in the last layer the
    tower runs (here the layer producing ``hidden_states[feature_layer]``, whose output is also
    the feature), per head; the adapter then averages heads. Scores sum to 1 over patches per head.
    Captured with hooks on that one layer (only q and k are recomputed, queries in chunks), so the
    tower keeps running on SDPA and no [B, H, N, N] map is kept.
    """
    features, received = run_with_layer_hooks(
        vision_tower, pixel_values, feature_layer, lambda attn, normed: received_attention(attn, normed, query_chunk)
    )
    return ReceivedAttentionOutput(features=features, received_attention=received)
