"""Visual-token pruning methods that run before the language model.

Every method shares one contract::

    method(features [B, N, C], cls_attention [B, N], budget, grid=(h, w), generator=None)
        -> (indices [B, k] ascending, tokens [B, k, C])

``features`` are the vision tower's pre-projector patch features, ``cls_attention`` the
head-mean [CLS]->patch attention of the same layer, ``grid`` the patch grid (h*w == N).
Selection methods return the chosen features; ``pool`` returns cell averages anchored at
each cell's centre patch, so callers can treat every method as "these raster positions,
carrying these features". ``k == min(budget, N)`` for selection methods and ``k <= budget``
for ``pool``.

``fastv`` prunes inside the language model and lives in ``operators.decoder``; its ranking
helper :func:`top_k_indices` is shared with the methods here.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

Grid = tuple[int, int]
PruneFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]

# VisPruner drops at most this many near-duplicates per round (authors' constant).
MAX_DROP_PER_ROUND = 8


def compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The input's precision, at least float32: rankings then follow the caller's numbers
    (a float64 caller gets float64 decisions) without bf16/fp16 rounding ties."""
    return torch.promote_types(tensor.dtype, torch.float32)


def head_mean(attention: torch.Tensor) -> torch.Tensor:
    """[B, H, N] or [B, N] -> [B, N] (mean over heads, as VisPruner and FastV do)."""
    if attention.dim() == 3:
        return attention.to(compute_dtype(attention)).mean(dim=1)
    if attention.dim() == 2:
        return attention.to(compute_dtype(attention))
    raise ValueError(f"attention must be [B, H, N] or [B, N], got shape {tuple(attention.shape)}")


def top_k_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores per row, returned in ascending (raster) order. [B, N] -> [B, k]."""
    order = torch.argsort(scores, dim=-1, descending=True, stable=True)
    return order[:, :k].sort(dim=-1).values


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


def _gather_tokens(features: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """features [B, N, C], indices [B, k] -> [B, k, C]."""
    return torch.gather(features, 1, indices[..., None].expand(-1, -1, features.shape[-1]))


def prune_none(features, cls_attention, budget, grid=None, generator=None):
    """Keep every token."""
    batch, n, _ = features.shape
    indices = torch.arange(n, device=features.device).expand(batch, n).clone()
    return indices, features


def prune_vispruner(features, cls_attention, budget, grid=None, generator=None, important_ratio=0.5):
    indices = vispruner(features, cls_attention, budget, important_ratio)
    return indices, _gather_tokens(features, indices)


def prune_random(features, cls_attention, budget, grid=None, generator=None):
    """A uniform random subset of ``budget`` tokens per row, in raster order (seeded by ``generator``)."""
    batch, n, _ = features.shape
    if budget >= n:
        return prune_none(features, cls_attention, budget)
    noise = torch.rand(batch, n, generator=generator, device="cpu").to(features.device)
    indices = top_k_indices(noise, budget)
    return indices, _gather_tokens(features, indices)


def pool_grid(grid: Grid, budget: int) -> Grid:
    """The largest pooled grid (gh, gw) with gh*gw <= budget that keeps the grid's aspect ratio."""
    h, w = grid
    if budget >= h * w:
        return h, w
    gh = max(1, min(h, math.floor(math.sqrt(budget * h / w))))
    gw = max(1, min(w, budget // gh))
    return gh, gw


def prune_pool(features, cls_attention, budget, grid=None, generator=None):
    """Spatial average pooling of the patch grid down to at most ``budget`` cells.

    Each pooled token is the mean of its cell (adaptive pooling, so cells may overlap by a
    row or column when sizes do not divide) and is anchored at the cell's centre patch.
    """
    batch, n, c = features.shape
    if grid is None or grid[0] * grid[1] != n:
        raise ValueError(f"pool needs the patch grid of the {n} tokens, got grid={grid}")
    h, w = grid
    gh, gw = pool_grid(grid, budget)
    if (gh, gw) == (h, w):
        return prune_none(features, cls_attention, budget)
    image = features.transpose(1, 2).reshape(batch, c, h, w)
    pooled = F.adaptive_avg_pool2d(image.float(), (gh, gw)).to(features.dtype)  # [B, C, gh, gw]
    tokens = pooled.flatten(2).transpose(1, 2)  # [B, gh*gw, C], raster order
    # Adaptive pooling cell i spans [floor(i*h/gh), ceil((i+1)*h/gh)); anchor at its centre.
    rows = [(math.floor(i * h / gh) + math.ceil((i + 1) * h / gh) - 1) // 2 for i in range(gh)]
    cols = [(math.floor(j * w / gw) + math.ceil((j + 1) * w / gw) - 1) // 2 for j in range(gw)]
    anchors = torch.tensor([r * w + col for r in rows for col in cols], device=features.device)
    return anchors.expand(batch, -1).clone(), tokens


PRE_LLM_METHODS: dict[str, PruneFn] = {
    "none": prune_none,
    "vispruner": prune_vispruner,
    "random": prune_random,
    "pool": prune_pool,
}
IN_LLM_METHODS = ("fastv", "ttp")  # ttp: twig-guided, needs a twig (operators/speculative.py)
METHODS = tuple(PRE_LLM_METHODS) + IN_LLM_METHODS


def get_method(name: str) -> PruneFn:
    """The pre-LLM pruning function registered under ``name``."""
    if name in PRE_LLM_METHODS:
        return PRE_LLM_METHODS[name]
    raise ValueError(f"unknown pre-LLM pruning method {name!r}; allowed: {', '.join(PRE_LLM_METHODS)}")
