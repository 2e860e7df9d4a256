"""Turning logits into tokens: argmax, or a draw from the processed distribution.

Processing follows the usual order: temperature, then top-k, then top-p (nucleus). With one
generator per row, seeded from the row's key (``row_seed``), a row's sample does not depend on the
batch it lands in or on what the other rows do: a rerun reproduces it.
"""

from __future__ import annotations

import hashlib

import torch


def row_seed(seed: int, key: str) -> int:
    """A 63-bit seed from the configured seed and a row's key (its item id)."""
    digest = hashlib.sha256(f"{seed}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class Sampler:
    """Greedy at temperature 0; else samples, each row from its own generator (``generators`` a
    list, one per row) or every row from one shared generator (vectorised; for tests and tools)."""

    def __init__(
        self,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float = 1.0,
        generators: list[torch.Generator] | torch.Generator | None = None,
    ):
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.generators = generators

    @classmethod
    def for_rows(
        cls, temperature: float, top_k: int | None, top_p: float, seed: int, keys: list[str], device
    ) -> Sampler:
        if temperature <= 0:
            return cls()
        generators = [torch.Generator(device=device).manual_seed(row_seed(seed, key)) for key in keys]
        return cls(temperature, top_k, top_p, generators)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    def select_rows(self, index: torch.Tensor) -> Sampler:
        """The sampler of rows ``index`` [B'] of this batch (row compaction): per-row generators follow
        their rows; a shared generator (or greedy) is shared as before."""
        if not isinstance(self.generators, list):
            return self
        generators = [self.generators[i] for i in index.tolist()]
        return Sampler(self.temperature, self.top_k, self.top_p, generators)

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """The sampling distribution [..., V] (float32) of logits [..., V]."""
        logits = logits.float() / self.temperature
        if self.top_k is not None and self.top_k < logits.shape[-1]:
            kth = torch.topk(logits, self.top_k, dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = logits.softmax(dim=-1)
        if self.top_p < 1.0:
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of the tokens ranked above
            sorted_probs = sorted_probs.masked_fill(before >= self.top_p, 0.0)  # the top token always stays
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
            probs = probs / probs.sum(dim=-1, keepdim=True)
        return probs

    def pick(self, logits: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """A token per row [B] from logits [B, V]; only ``rows`` (bool [B]) draw (others get the argmax)."""
        if self.greedy:
            return logits.argmax(dim=-1)
        return self.categorical(self.probs(logits), rows)

    def categorical(self, probs: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """One draw per row from probs [B, V]; rows outside ``rows`` get their most likely token."""
        if not isinstance(self.generators, list):
            return torch.multinomial(probs, 1, generator=self.generators)[:, 0]
        out = probs.argmax(dim=-1)
        for b in _selected(rows, probs.shape[0]):
            out[b] = torch.multinomial(probs[b], 1, generator=self.generators[b])[0]
        return out

    def uniform(self, counts: torch.Tensor, width: int) -> torch.Tensor:
        """[B, width] uniforms in [0, 1); row b draws only its first ``counts[b]`` (the rest are 1)."""
        if not isinstance(self.generators, list):
            return torch.rand((counts.shape[0], width), generator=self.generators, device=counts.device)
        out = torch.ones(counts.shape[0], width, device=counts.device)
        for b in range(counts.shape[0]):
            n = int(counts[b])
            if n > 0:
                out[b, :n] = torch.rand(n, generator=self.generators[b], device=counts.device)
        return out


def _selected(rows: torch.Tensor | None, batch: int) -> list[int]:
    return list(range(batch)) if rows is None else rows.nonzero().flatten().tolist()
