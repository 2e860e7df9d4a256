"""What a pruning method is, and the tensor helpers methods share.

A method is a class registered in ``operators.registry`` and built once per engine with its
:class:`~operators.settings.EngineConfig`. It acts in one of two places:

* :class:`BeforeLLM`: on each media item's vision features. ``select`` gets every distinct item of
  an engine batch at once (so a method may batch them) and returns, per item, the kept raster
  positions and the features carried there::

      select(items: list[VisualItem], budget) -> list[(indices [n, k] ascending, tokens [n, k, C])]

  ``n`` is the item's segments (image, crops or frames), ``N`` its patches per segment.
* :class:`InLLM`: inside the language model. ``layers`` says where: layers [0, K) see every token,
  layers [K, K_end) the text and the kept visual tokens, layers [K_end, L) the text only; ``scores``
  ranks the visual tokens at layer K from what the prefill has computed by then.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from operators.families.base import MediaInput, Segments
from operators.kv_cache import CacheGroup
from operators.settings import EngineConfig

Selection = tuple[torch.Tensor, torch.Tensor]  # (indices [n, k], tokens [n, k, C])


@dataclass
class VisualItem:
    """One media item's vision output, as a before-LLM method sees it."""

    media: MediaInput  # pixels and kind (the random baseline seeds itself from the pixels)
    segments: Segments  # patches [n, N, C], cls_attention [n, N], grid (h, w)


@dataclass
class ScoreContext:
    """What the staged prefill has computed when it reaches layer K (see ``operators.prefill``)."""

    lm: nn.Module  # the decoder stack
    positions: torch.Tensor  # [B, S] position ids of the tokens layer K - 1 saw
    layer_inputs: dict[int, torch.Tensor]  # base layer index -> hidden state entering it [B, S, D]
    group: CacheGroup  # the cache group holding base layer K - 1
    twig: nn.Module | None = None  # the twig, when it ran at this layer
    twig_inputs: dict[int, torch.Tensor] | None = None  # twig layer id -> hidden state entering it
    twig_group: CacheGroup | None = None


class PruningMethod:
    """Common base: holds the engine's settings."""

    name = ""

    def __init__(self, config: EngineConfig):
        self.config = config


class BeforeLLM(PruningMethod):
    keeps_everything = False  # True for the unpruned method: every placeholder must be filled

    def select(self, items: list[VisualItem], budget: int | None) -> list[Selection]:
        """Per item, (indices, tokens); ``budget`` is per segment (None: keep all). One item at a time
        unless a method overrides this to batch them."""
        return [
            self.select_one(item, budget if budget is not None else item.segments.patches.shape[1]) for item in items
        ]

    def select_one(self, item: VisualItem, budget: int) -> Selection:
        raise NotImplementedError


class InLLM(PruningMethod):
    uses_twig = False  # the scores come from the twig, which must then run at layer K

    def layers(self, n_layers: int, twig: nn.Module | None) -> tuple[int, int]:
        """(K, K_end): layers [0, K) see all tokens, [K, K_end) the kept ones, [K_end, L) text only."""
        raise NotImplementedError

    def scores(self, context: ScoreContext) -> torch.Tensor:
        """Importance of every token at layer K, [B, S]; the top ones among the visual tokens stay."""
        raise NotImplementedError


# --- shared tensor helpers -------------------------------------------------------------------------


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


def gather_tokens(features: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """features [B, N, C], indices [B, k] -> [B, k, C]."""
    return torch.gather(features, 1, indices[..., None].expand(-1, -1, features.shape[-1]))


def keep_all(features: torch.Tensor) -> Selection:
    """Every token: indices [B, N] = 0..N-1, the features themselves."""
    batch, n, _ = features.shape
    return torch.arange(n, device=features.device).expand(batch, n).clone(), features


def keep_top(scores: torch.Tensor, prunable: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Every non-prunable token plus each row's top ``keep[b]`` prunable tokens by score. -> [B, S] bool."""
    masked = scores.masked_fill(~prunable, float("-inf"))
    kept = ~prunable
    for row in range(scores.shape[0]):
        k = int(min(keep[row], prunable[row].sum()))
        if k > 0:
            kept[row, top_k_indices(masked[row : row + 1], k)[0]] = True
    return kept
