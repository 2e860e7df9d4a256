"""Batched greedy decoding over (possibly pruned) prompts with a KV cache."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from operators.decoder import Prefill, decode_step, prefill, text_model


@dataclass
class Generation:
    tokens: torch.Tensor  # [B, T] generated ids; after a row's EOS, the pad id
    lengths: torch.Tensor  # [B] generated tokens per row, EOS included
    prefill_state: Prefill
    prefill_s: float
    decode_s: float


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def greedy_generate(
    model: nn.Module,
    embeds: torch.Tensor,
    positions: torch.Tensor,
    valid: torch.Tensor,
    max_new_tokens: int,
    eos_token_ids: list[int],
    pad_token_id: int,
    prunable: torch.Tensor | None = None,
    fastv_layer: int | None = None,
    fastv_keep: torch.Tensor | None = None,
) -> Generation:
    """Greedy decoding, token-for-token what ``model.generate(do_sample=False)`` produces.

    embeds [B, S, D] left-padded prompt embeddings, positions/valid [B, S]. A row stops at any of
    ``eos_token_ids``; the loop stops when every row has or after ``max_new_tokens``.
    """
    lm = text_model(model)
    device = embeds.device
    batch = embeds.shape[0]
    eos = torch.tensor(eos_token_ids, device=device)
    t0 = time.perf_counter()
    state = prefill(lm, embeds, positions, valid, max_new_tokens, prunable, fastv_layer, fastv_keep)
    _sync(device)
    t1 = time.perf_counter()

    tokens = torch.full((batch, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    lengths = torch.zeros(batch, dtype=torch.long, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    hidden, position = state.last_hidden, state.next_position
    for step in range(max_new_tokens):
        logits = model.lm_head(hidden).float()  # [B, V]
        next_token = logits.argmax(dim=-1).masked_fill(done, pad_token_id)
        tokens[:, step] = next_token
        lengths += (~done).long()
        done |= torch.isin(next_token, eos)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        embeds_step = lm.embed_tokens(next_token)[:, None]  # [B, 1, D]
        hidden = decode_step(lm, embeds_step, position[:, None], state.cache)
        position = position + 1
    _sync(device)
    t2 = time.perf_counter()
    width = int(lengths.max()) if batch else 0
    return Generation(tokens[:, :width], lengths, state, t1 - t0, t2 - t1)
