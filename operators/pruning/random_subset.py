"""The random baseline: a uniform subset of the budget, in raster order, seeded per media item."""

from __future__ import annotations

import zlib

import torch

from operators.families.base import MediaInput
from operators.pruning.base import BeforeLLM, Selection, VisualItem, gather_tokens, keep_all, top_k_indices


def media_generator(seed: int, media: MediaInput) -> torch.Generator:
    """A generator seeded by the config seed and the media's pixels, so the random baseline picks
    the same tokens for an item whatever batch it lands in."""
    digest = zlib.crc32(media.pixel_values.detach().cpu().float().numpy().tobytes())
    return torch.Generator().manual_seed(seed * 1_000_003 + digest)


def random_subset(features: torch.Tensor, budget: int, generator: torch.Generator | None = None) -> Selection:
    """A uniform random subset of ``budget`` of the N tokens of each row [B, N, C], in raster order."""
    batch, n, _ = features.shape
    if budget >= n:
        return keep_all(features)
    noise = torch.rand(batch, n, generator=generator, device="cpu").to(features.device)
    indices = top_k_indices(noise, budget)
    return indices, gather_tokens(features, indices)


class RandomSubset(BeforeLLM):
    name = "random"

    def select_one(self, item: VisualItem, budget: int) -> Selection:
        return random_subset(item.segments.patches, budget, media_generator(self.config.seed, item.media))
