"""VisPruner (Zhang et al., ICCV 2025): important tokens by [CLS] attention, then diverse ones."""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.nn.functional as F

from operators.pruning.base import BeforeLLM, Selection, VisualItem, compute_dtype, gather_tokens, head_mean

# VisPruner drops at most this many near-duplicates per round (authors' constant).
MAX_DROP_PER_ROUND = 8


def vispruner(
    features: torch.Tensor,
    cls_attention: torch.Tensor,
    budget: int,
    important_ratio: float = 0.5,
) -> torch.Tensor:
    """VisPruner token selection (Zhang et al., ICCV 2025).

    features [B, N, C] (pre-projector, layer -2), cls_attention [B, H, N] or [B, N].
    Returns kept indices [B, min(budget, N)], ascending.

    1. Important: the ``int(budget * important_ratio)`` patches with the highest head-mean
       [CLS] attention.
    2. Diverse: the rest of the budget, from the remaining patches taken in descending
       attention order, by repeated rounds that split the list by position parity into A
       (even) and B (odd) and drop the ``min(8, R - T_div)`` members of A with the highest
       max-cosine similarity to B; the kept A (descending similarity) are followed by B.
    Unlike the authors' code this works for odd residual counts. Scores and similarities are
    computed in the inputs' precision (at least float32).
    """
    if features.dim() != 3:
        raise ValueError(f"features must be [B, N, C], got shape {tuple(features.shape)}")
    if not 0.0 <= important_ratio <= 1.0:
        raise ValueError(f"important_ratio must be in [0, 1], got {important_ratio}")
    if budget < 1:
        raise ValueError(f"budget must be >= 1, got {budget}")
    scores = head_mean(cls_attention)
    batch, n, _ = features.shape
    if scores.shape != (batch, n):
        raise ValueError(f"attention covers {tuple(scores.shape)} tokens, features {(batch, n)}")
    device = features.device
    if budget >= n:
        return torch.arange(n, device=device).expand(batch, n).clone()

    n_important = int(budget * important_ratio)
    n_diverse = budget - n_important
    order = torch.argsort(scores, dim=-1, descending=True, stable=True)  # [B, N]
    important = order[:, :n_important]  # [B, T_imp]
    residual = order[:, n_important:]  # [B, R], descending attention

    if n_diverse > 0:
        unit = F.normalize(features.to(compute_dtype(features)), dim=-1)  # [B, N, C], normalised once
        rows = torch.arange(batch, device=device)[:, None]
        while True:
            r = min(MAX_DROP_PER_ROUND, residual.shape[1] - n_diverse)
            if r <= 0:
                break
            set_a, set_b = residual[:, 0::2], residual[:, 1::2]  # [B, ceil(R/2)], [B, floor(R/2)]
            sim = unit[rows, set_a] @ unit[rows, set_b].transpose(1, 2)  # [B, |A|, |B|]
            redundancy = sim.max(dim=-1).values  # [B, |A|]
            by_redundancy = torch.argsort(redundancy, dim=-1, descending=True, stable=True)
            kept_a = torch.gather(set_a, 1, by_redundancy[:, r:])  # drop the r most redundant
            residual = torch.cat([kept_a, set_b], dim=1)  # [B, R - r]
    kept = torch.cat([important, residual[:, :n_diverse]], dim=1)  # residual has exactly n_diverse left
    return kept.sort(dim=-1).values


class VisPruner(BeforeLLM):
    name = "vispruner"

    def select(self, items: list[VisualItem], budget: int | None) -> list[Selection]:
        """One :func:`vispruner` call per segment shape over every item (it works row by row, so this
        equals a call per item, minus the per-call overhead)."""
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, item in enumerate(items):
            groups[tuple(item.segments.patches.shape[1:])].append(i)
        out: list[Selection | None] = [None] * len(items)
        for shape, members in groups.items():
            patches = torch.cat([items[i].segments.patches for i in members])  # [sum of segments, N, C]
            attention = torch.cat([items[i].segments.cls_attention for i in members])
            indices = vispruner(
                patches, attention, budget if budget is not None else shape[0], self.config.important_ratio
            )
            tokens = gather_tokens(patches, indices)
            offset = 0
            for i in members:
                count = items[i].segments.patches.shape[0]
                out[i] = (indices[offset : offset + count], tokens[offset : offset + count])
                offset += count
        return out
