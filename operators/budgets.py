"""Budget units: R (visual tokens kept per segment) and TwigVLM's R-bar (their mean over LLM layers).

A method that prunes inside the language model lets layers [0, K) see all M visual tokens of a
segment, layers [K, K_end) the R it keeps, and layers [K_end, L) none (TTP's FinalWipe; FastV has
K_end = L). So R_bar = (M*K + R*(K_end - K)) / L; a method that prunes before the language model
is the case K = 0, K_end = L, where R_bar = R. No torch here: the arithmetic is exact.
"""

from __future__ import annotations

import math
from fractions import Fraction


def kept_for_layer_mean(L: int, K: int, K_end: int, M: int | Fraction, R_bar: float | Fraction) -> int:
    """R for a layer-averaged budget R_bar: ceil((L*R_bar - K*M) / (K_end - K)), clamped to [0, M]
    (TwigVLM's formula). LLaVA-1.5-7B with TTP (L=32, K=2, K_end=24, M=576): R_bar 64 / 128 / 192 ->
    R 41 / 134 / 227."""
    if not 0 <= K < K_end <= L:
        raise ValueError(f"need 0 <= K < K_end <= L, got K={K}, K_end={K_end}, L={L}")
    exact = (L * Fraction(R_bar) - K * Fraction(M)) / (K_end - K)  # exact: no float rounding before the ceiling
    return max(0, min(math.floor(M), math.ceil(exact)))


def layer_mean(L: int, K: int, K_end: int, M: int | float, R: int | float) -> float:
    """R_bar = (M*K + R*(K_end - K)) / L, the inverse of :func:`kept_for_layer_mean`."""
    return (M * K + R * (K_end - K)) / L
