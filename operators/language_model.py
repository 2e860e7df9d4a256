"""Running a Hugging Face decoder-only language model layer by layer over a KV cache.

We call the model's own decoder layers (Llama, Mistral, Qwen2, ... all share the signature)
with our cache and masks, so in-LLM pruning (FastV, twig-guided pruning) can change the token
set between layers while each layer stays HF's code. The staged prefill that decides which
tokens each layer sees is ``operators.prefill``.
"""

from __future__ import annotations

import torch
from torch import nn

from operators.cpu_linear import PackedLinear
from operators.kv_cache import CacheGroup, KVCache


def text_model(model: nn.Module) -> nn.Module:
    """The decoder stack (embed_tokens, layers, norm, rotary_emb) of a *ForConditionalGeneration,
    or of a text-only *ForCausalLM (whose ``model`` is the stack itself)."""
    return getattr(model.model, "language_model", model.model)


def left_padded_positions(valid: torch.Tensor) -> torch.Tensor:
    """Position ids [B, S] of left-padded rows (valid [B, S], True = real token), as HF generate
    makes them: 0.. over each row's real tokens, 1 on padding."""
    return (valid.long().cumsum(dim=1) - 1).masked_fill(~valid, 1)


def rope_positions(positions: torch.Tensor) -> torch.Tensor:
    """Positions as the model's ``rotary_emb`` takes them: [B, S] unchanged; multimodal-RoPE
    [B, S, 3] (our layout, so row gathers work on dim 1) -> HF's [3, B, S]."""
    return positions.permute(2, 0, 1) if positions.dim() == 3 else positions


def layer_position_ids(positions: torch.Tensor) -> torch.Tensor | None:
    """What decoder layers get as ``position_ids``: 1-D positions; None for M-RoPE, as HF's Qwen-VL
    text model passes them (its layers use only ``position_embeddings``)."""
    return None if positions.dim() == 3 else positions


def next_positions(positions: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[B] position of each row's first generated token: after its last prompt token (1-D), or
    max + 1 over all axes and tokens (M-RoPE, HF's rope deltas: a video's temporal positions may run
    past the text after it)."""
    if positions.dim() == 3:
        return positions.masked_fill(~valid[..., None], 0).amax(dim=(1, 2)) + 1
    return positions[:, -1] + 1


def base_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The base's head on final-norm hidden states [..., D] -> float32 logits [..., V].

    Written as ``(W @ x.T).T`` rather than ``F.linear(x, W)``: for the few rows a decode step or a
    verification has, CPU BLAS runs the transposed product much faster (measured on this CPU for
    SmolLM2's 49152 x 576 head, medians: 2 rows 16 ms against 44 ms, 8 rows 33 ms against 56 ms, 1 row
    the same). Greedy decoding, SSD's verification and its folded prefill all use this function, so
    their argmaxes agree bit for bit. It matches ``F.linear`` to float32 rounding. A head packed for
    oneDNN (``operators.cpu_linear``) runs packed: 5-7 ms for 1-8 rows, where this product takes 6-15."""
    head = model.lm_head
    flat = hidden.reshape(-1, hidden.shape[-1])
    if isinstance(head, PackedLinear):
        logits = head(flat)
    else:
        logits = (head.weight @ flat.T).T
        if head.bias is not None:
            logits = logits + head.bias
    return logits.reshape(*hidden.shape[:-1], logits.shape[-1]).float()


def kv_geometry(lm: nn.Module) -> tuple[int, int]:
    config = lm.config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return getattr(config, "num_key_value_heads", None) or heads, head_dim


def new_group(lm: nn.Module, layers: range | list[int], batch: int, capacity: int, like: torch.Tensor) -> CacheGroup:
    kv_heads, head_dim = kv_geometry(lm)
    return CacheGroup(layers, batch, kv_heads, head_dim, capacity, like.dtype, like.device)


def run_layers(
    lm: nn.Module,
    hidden: torch.Tensor,
    positions: torch.Tensor,
    block_valid: torch.Tensor,
    cache: KVCache,
    group: CacheGroup,
    layer_inputs: dict[int, torch.Tensor] | None = None,
    modules: dict[int, nn.Module] | None = None,
    additions: dict[int, torch.Tensor] | None = None,
    block_dense: bool | None = None,
) -> torch.Tensor:
    """Run the group's layers on a block hidden [B, q, D] at positions [B, q] (or [B, q, 3], M-RoPE);
    commit it to the cache.

    ``layer_inputs``, when given, receives the hidden state entering each layer (for scoring).
    ``modules`` maps the group's layer ids to modules outside the base stack (a twig's layers).
    ``additions`` maps a layer id to [B, q, D] added to its output (Qwen3-VL's DeepStack).
    ``block_dense``: whether every slot of ``block_valid`` is True, when the caller knows it without
    a device sync (None: looked at, but only while the group has no holes; see ``CacheGroup.dense``).
    """
    layers = [modules[index] if modules is not None else lm.layers[index] for index in group.layers]
    if block_dense is None:
        block_dense = group.dense and bool(block_valid.all())
    mask = attention_mask(layers[0], group, block_valid, hidden.dtype, block_dense)
    position_embeddings = lm.rotary_emb(hidden, rope_positions(positions))
    position_ids = layer_position_ids(positions)
    for index, layer in zip(group.layers, layers, strict=True):
        if layer_inputs is not None:
            layer_inputs[index] = hidden
        out = layer(
            hidden,
            attention_mask=mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
            position_embeddings=position_embeddings,
        )
        hidden = out[0] if isinstance(out, tuple) else out
        if additions is not None and index in additions:
            hidden = hidden + additions[index]
    group.advance(block_valid, block_dense)
    return hidden


def attention_mask(
    layer: nn.Module, group: CacheGroup, block_valid: torch.Tensor, dtype: torch.dtype, block_dense: bool | None = None
) -> torch.Tensor | None:
    """The mask ``layer``'s attention implementation needs for a block appended to ``group``.

    SDPA takes a bool mask, or None for "causal" (its fast path); eager attention adds the mask to
    its scores, so it gets an additive float mask and is never handed None for a multi-token block
    (it would attend non-causally).
    """
    implementation = layer.self_attn.config._attn_implementation
    if implementation == "sdpa":
        return group.attention_mask(block_valid, block_dense=block_dense)
    if implementation == "eager":
        mask = group.attention_mask(block_valid, implicit_causal=False, block_dense=block_dense)
        if mask is None:
            return None
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    raise ValueError(
        f"attention implementation {implementation!r} is not supported by the engine (it needs arbitrary "
        "masks over its own KV cache); load the model with attn_implementation='sdpa' or 'eager'"
    )


def last_token_attention(
    lm: nn.Module,
    layer_index: int,
    layer_input: torch.Tensor,
    positions: torch.Tensor,
    group: CacheGroup,
    layer: nn.Module | None = None,
) -> torch.Tensor:
    """Head-mean attention of each row's last token over all keys in ``layer_index``. -> [B, S].

    Recomputes only the last query row against the keys already in the cache (post-RoPE), so
    no [B, H, S, S] map is built and the layer can stay on SDPA. ``layer`` overrides the base
    layer (a twig's last layer, cached under its own id).
    """
    layer = layer if layer is not None else lm.layers[layer_index]
    attn = layer.self_attn
    batch = layer_input.shape[0]
    normed = layer.input_layernorm(layer_input[:, -1:])  # [B, 1, D]
    heads = lm.config.num_attention_heads
    kv_heads, head_dim = kv_geometry(lm)
    q = attn.q_proj(normed).view(batch, 1, heads, head_dim)
    if hasattr(attn, "q_norm"):  # Qwen3: per-head RMSNorm on q (and k) before RoPE
        q = attn.q_norm(q)
    q = q.transpose(1, 2)  # [B, H, 1, Dh]
    cos, sin = lm.rotary_emb(normed, rope_positions(positions[:, -1:]))  # [B, 1, Dh]
    q = q * cos[:, None] + _rotate_half(q) * sin[:, None]
    keys = group.keys[layer_index][:, :, : group.length]  # [B, H_kv, S, Dh]
    keys = keys.repeat_interleave(heads // kv_heads, dim=1)  # [B, H, S, Dh]
    logits = (q.float() @ keys.float().transpose(-1, -2)).squeeze(2) * attn.scaling  # [B, H, S]
    logits = logits.masked_fill(~group.valid[:, None, : group.length], float("-inf"))
    return logits.softmax(dim=-1).mean(dim=1)  # [B, S]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def compact_rows(keep: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Gather the kept positions of each row, left-padded to the longest row.

    keep [B, S] bool; tensors [B, S, ...]. Returns (valid [B, S'], *gathered tensors). Padding
    slots repeat position 0 of the row and are marked invalid.
    """
    counts = keep.sum(dim=1)
    width = int(counts.max())
    batch, length = keep.shape
    index = torch.zeros(batch, width, dtype=torch.long, device=keep.device)
    valid = torch.zeros(batch, width, dtype=torch.bool, device=keep.device)
    for row in range(batch):
        kept = keep[row].nonzero().squeeze(1)
        index[row, width - len(kept) :] = kept
        valid[row, width - len(kept) :] = True
    out = [valid]
    for tensor in tensors:
        gather_index = index.view(batch, width, *([1] * (tensor.dim() - 2))).expand(-1, -1, *tensor.shape[2:])
        out.append(torch.gather(tensor, 1, gather_index))
    return tuple(out)


@torch.no_grad()
def decode_step(lm: nn.Module, embeds: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """One new token per row through every layer group. embeds [B, 1, D], positions [B, 1] -> [B, D]."""
    hidden = embeds
    block_valid = torch.ones(embeds.shape[:2], dtype=torch.bool, device=embeds.device)
    for group in cache.groups:
        hidden = run_layers(lm, hidden, positions, block_valid, cache, group, block_dense=True)
    return lm.norm(hidden[:, -1])
