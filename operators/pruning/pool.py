"""The pooling baseline: average the patch grid down to at most the budget's cells."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from operators.pruning.base import BeforeLLM, Selection, VisualItem, keep_all

Grid = tuple[int, int]


def pool_grid(grid: Grid, budget: int) -> Grid:
    """The largest pooled grid (gh, gw) with gh*gw <= budget that keeps the grid's aspect ratio."""
    h, w = grid
    if budget >= h * w:
        return h, w
    gh = max(1, min(h, math.floor(math.sqrt(budget * h / w))))
    gw = max(1, min(w, budget // gh))
    return gh, gw


def pool(features: torch.Tensor, budget: int, grid: Grid | None) -> Selection:
    """Spatial average pooling of the patch grid of features [B, N, C] down to at most ``budget`` cells.

    Each pooled token is the mean of its cell (adaptive pooling, so cells may overlap by a
    row or column when sizes do not divide) and is anchored at the cell's centre patch, so callers
    can treat it like a selection: "these raster positions, carrying these features".
    """
    batch, n, c = features.shape
    if grid is None or grid[0] * grid[1] != n:
        raise ValueError(f"pool needs the patch grid of the {n} tokens, got grid={grid}")
    h, w = grid
    gh, gw = pool_grid(grid, budget)
    if (gh, gw) == (h, w):
        return keep_all(features)
    image = features.transpose(1, 2).reshape(batch, c, h, w)
    pooled = F.adaptive_avg_pool2d(image.float(), (gh, gw)).to(features.dtype)  # [B, C, gh, gw]
    tokens = pooled.flatten(2).transpose(1, 2)  # [B, gh*gw, C], raster order
    # Adaptive pooling cell i spans [floor(i*h/gh), ceil((i+1)*h/gh)); anchor at its centre.
    rows = [(math.floor(i * h / gh) + math.ceil((i + 1) * h / gh) - 1) // 2 for i in range(gh)]
    cols = [(math.floor(j * w / gw) + math.ceil((j + 1) * w / gw) - 1) // 2 for j in range(gw)]
    anchors = torch.tensor([r * w + col for r in rows for col in cols], device=features.device)
    return anchors.expand(batch, -1).clone(), tokens


class GridPool(BeforeLLM):
    name = "pool"

    def select_one(self, item: VisualItem, budget: int) -> Selection:
        return pool(item.segments.patches, budget, item.segments.grid)
