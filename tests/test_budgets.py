"""Budget units: R and TwigVLM's R-bar, converted with the authors' formula."""

import math
from fractions import Fraction

import pytest

from operators.budgets import kept_for_layer_mean, layer_mean


def test_kept_for_layer_mean_matches_twigvlm_and_layer_mean_inverts_it():
    # TwigVLM's table for LLaVA-1.5-7B (L=32, K=2, K_f=24, M=576): R-bar 64 / 128 / 192 -> R 41 / 134 / 227
    assert [kept_for_layer_mean(32, 2, 24, 576, r) for r in (64, 128, 192)] == [41, 134, 227]
    for r_bar in (64, 128, 192, 100.5):
        r = kept_for_layer_mean(32, 2, 24, 576, r_bar)
        assert layer_mean(32, 2, 24, 576, r) >= r_bar > layer_mean(32, 2, 24, 576, r - 1)
    assert layer_mean(32, 2, 24, 576, 41) == pytest.approx((576 * 2 + 41 * 22) / 32)
    assert kept_for_layer_mean(32, 2, 24, 576, 10) == 0  # below what layers 1..K already spend
    assert kept_for_layer_mean(32, 2, 24, 576, 1000) == 576
    assert kept_for_layer_mean(4, 1, 3, 64, 21) == math.ceil((4 * 21 - 64) / 2)


def test_fastv_and_pre_llm_cases():
    # FastV: layers after K keep R to the end (K_end = L)
    assert kept_for_layer_mean(32, 2, 32, 576, 64) == math.ceil((32 * 64 - 2 * 576) / 30)
    assert kept_for_layer_mean(32, 0, 32, 576, 64) == 64  # pruning before the LLM: R-bar = R
    # M per segment may be a fraction (LLaVA-NeXT's unpadded crops): exact arithmetic, no float rounding
    assert kept_for_layer_mean(4, 1, 4, Fraction(289, 2), 40) == math.ceil((4 * 40 - 144.5) / 3)
    with pytest.raises(ValueError, match="K < K_end"):
        kept_for_layer_mean(32, 24, 24, 576, 64)
