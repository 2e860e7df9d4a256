"""Compare operators.pruning.vispruner with an independent numpy reference.

The reference (tests/vispruner_reference.py) follows the VisPruner algorithm description only
and computes in float64. ``vispruner`` computes in its inputs' precision, so the randomised
comparison feeds float64 tensors and demands the exact same index tensor on every case: no
redraws, no excuses. (With float32 inputs, a float64 reference legitimately disagrees on
random data whenever two similarities sit closer than float32 resolution, about 1e-7.)
"""

from __future__ import annotations

import math
import os
import sys

import numpy as np
import pytest
import torch

_TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)

from vispruner_reference import (  # noqa: E402
    reference_vispruner,
    reference_vispruner_with_info,
)

from operators.pruning.vispruner import vispruner  # noqa: E402

# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


@pytest.fixture(autouse=True, scope="module")
def _single_torch_thread():
    # The tensors here are tiny; on small CPU boxes torch's intra-op thread
    # pool only adds contention. Results do not depend on the thread count.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _make_inputs(seed, b, n, c, heads):
    """features randn float64 [B, N, C]; attention softmax of randn, [B, H, N] or [B, N]."""
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(b, n, c, generator=g, dtype=torch.float64)
    shape = (b, heads, n) if heads else (b, n)
    attention = torch.softmax(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)
    return features, attention


def _run_impl(features, attention, budget, ratio):
    out = vispruner(features, attention, budget, ratio)
    assert isinstance(out, torch.Tensor)
    assert out.dtype == torch.long, out.dtype
    b, n = features.shape[0], features.shape[1]
    assert tuple(out.shape) == (b, min(budget, n)), tuple(out.shape)
    return out


def _run_ref(features, attention, budget, ratio):
    ref, infos = reference_vispruner_with_info(features.numpy(), attention.numpy(), budget, ratio)
    return torch.from_numpy(ref), infos


def _describe_row(row, ref_row, out_row, info):
    r_set = set(ref_row.tolist())
    o_set = set(out_row.tolist())
    return (
        f"  row {row}: only in reference={sorted(r_set - o_set)} "
        f"only in impl={sorted(o_set - r_set)} rounds={info['rounds']} "
        f"score_margin={info['score_margin']:.3g} sim_margin={info['sim_margin']:.3g}"
    )


# --------------------------------------------------------------------------
# randomised comparison
# --------------------------------------------------------------------------

RATIOS = (0.0, 0.25, 0.5, 0.75, 1.0, 0.3)
CHANNELS = (3, 8, 64)
BATCHES = (1, 3)
FIXED_SIZES = (5, 6, 7, 8, 9, 10, 13, 16, 17, 31, 32, 64, 65, 100, 143, 196, 257, 576, 577, 729)
NUM_RANDOM_CASES = 216


def _random_cases():
    rng = np.random.default_rng(20250612)
    cases = []
    for i in range(NUM_RANDOM_CASES):
        ratio = RATIOS[i % len(RATIOS)]
        c = CHANNELS[(i // len(RATIOS)) % len(CHANNELS)]
        b = BATCHES[(i // 18) % len(BATCHES)]
        heads = 4 if (i // 36) % 2 == 0 else 0
        n = FIXED_SIZES[(i // 2) % len(FIXED_SIZES)] if i % 2 == 0 else int(rng.integers(5, 601))
        mode = i % 5
        if mode == 0:
            budget = int(rng.integers(1, min(n, 16) + 1))  # many rounds
        elif mode == 1:
            budget = int(rng.integers(max(1, n - 12), n + 6))  # near / above N
        else:
            budget = int(rng.integers(1, n + 6))  # anywhere in 1..N+5
        cases.append(
            pytest.param(i, b, n, c, heads, budget, ratio, id=f"case{i}-B{b}-N{n}-C{c}-H{heads}-k{budget}-r{ratio}")
        )
    return cases


@pytest.mark.parametrize("case_id,b,n,c,heads,budget,ratio", _random_cases())
def test_random_against_reference(case_id, b, n, c, heads, budget, ratio):
    features, attention = _make_inputs(case_id + 1, b, n, c, heads)
    out = _run_impl(features, attention, budget, ratio)
    ref, infos = _run_ref(features, attention, budget, ratio)
    if not torch.equal(out, ref):
        rows = [_describe_row(r, ref[r], out[r], infos[r]) for r in range(b) if not torch.equal(out[r], ref[r])]
        pytest.fail(f"B={b} N={n} C={c} heads={heads} budget={budget} ratio={ratio}\n" + "\n".join(rows))


def test_random_cases_cover_the_requested_space():
    params = [p.values for p in _random_cases()]
    assert len(params) >= 200
    ns = {p[2] for p in params}
    assert {576, 577, 729} <= ns
    assert any(n % 2 for n in ns) and any(n % 2 == 0 for n in ns)
    assert {p[3] for p in params} == set(CHANNELS)
    assert {p[1] for p in params} == set(BATCHES)
    assert {p[6] for p in params} == set(RATIOS)
    assert {p[4] > 0 for p in params} == {True, False}
    assert any(p[5] == 1 for p in params)
    assert any(p[5] > p[2] for p in params)
    assert any(p[5] == p[2] for p in params)


# --------------------------------------------------------------------------
# hand-computed cases (asserted against BOTH implementations)
# --------------------------------------------------------------------------


def _check_both(features, attention, budget, ratio, expected):
    features = torch.as_tensor(features, dtype=torch.float32)
    attention = torch.as_tensor(attention, dtype=torch.float32)
    expected = torch.tensor(expected, dtype=torch.long)
    ref = torch.from_numpy(reference_vispruner(features.numpy(), attention.numpy(), budget, ratio))
    assert torch.equal(ref, expected), f"reference {ref.tolist()} != hand {expected.tolist()}"
    out = _run_impl(features, attention, budget, ratio)
    assert torch.equal(out, expected), f"vispruner {out.tolist()} != hand {expected.tolist()}"


# Scores shared by the two N=6 cases (2-D attention, one row).  Patches 2 and 5
# tie exactly at 0.10.
#   descending score order, ties -> lower index first:
#     1 (.30), 3 (.25), 4 (.20), 2 (.10), 5 (.10), 0 (.05)
_SCORES6 = [[0.05, 0.30, 0.10, 0.25, 0.20, 0.10]]
# Tiny 2-D features: 3 = 3*(1,0) duplicates 4 = (1,0); 2 = 2*(0,1) duplicates
# 5 = (0,1); 0 = (1,1) sits between them; 1 is the important patch.
_FEATS6 = [[[1.0, 1.0], [-1.0, -3.0], [0.0, 2.0], [3.0, 0.0], [1.0, 0.0], [0.0, 1.0]]]


def test_hand_n6_budget3_ratio034():
    # T_imp = int(3 * 0.34) = int(1.02) = 1, T_div = 2.
    # important = [1]; residual R0 = [3, 4, 2, 5, 0]  (2 before 5: tie rule).
    # Round 1: R = 5, r = min(8, 5 - 2) = 3.  A = [3, 2, 0], B = [4, 5].
    #   All three A elements are dropped, residual = [4, 5] (= T_div), stop.
    # kept = sorted([1] + [4, 5]) = [1, 4, 5].
    # (Had the 2/5 tie been broken the other way, A = [3, 5, 0], B = [4, 2]
    #  and the answer would be [1, 2, 4].)
    _check_both(_FEATS6, _SCORES6, 3, 0.34, [[1, 4, 5]])


def test_hand_n6_budget4_ratio034_drops_obvious_duplicates():
    # T_imp = int(4 * 0.34) = int(1.36) = 1, T_div = 3.
    # important = [1]; residual R0 = [3, 4, 2, 5, 0].
    # Round 1: R = 5, r = min(8, 5 - 3) = 2.  A = [3, 2, 0], B = [4, 5].
    #   s(3) = max(cos(3,4) = 1, cos(3,5) = 0) = 1      (duplicate of 4)
    #   s(2) = max(cos(2,4) = 0, cos(2,5) = 1) = 1      (duplicate of 5)
    #   s(0) = max(1/sqrt2, 1/sqrt2) = 0.7071
    #   drop the two highest: 3 and 2.  residual = [0] + [4, 5] (= T_div), stop.
    # kept = sorted([1] + [0, 4, 5]) = [0, 1, 4, 5].
    _check_both(_FEATS6, _SCORES6, 4, 0.34, [[0, 1, 4, 5]])


def test_hand_ratio1_only_important_with_boundary_tie():
    # N=5, budget 2, ratio 1.0: T_imp = 2, T_div = 0 (no diverse tokens).
    # scores: 2 (.4) first, then 1 and 3 tie at .3 -> lower index 1 wins.
    # kept = [1, 2].  Features are irrelevant.
    feats = [[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 1.0]]]
    scores = [[0.1, 0.3, 0.4, 0.3, 0.2]]
    _check_both(feats, scores, 2, 1.0, [[1, 2]])


def test_hand_ratio0_odd_residual():
    # N=7, budget 4, ratio 0 -> T_imp = 0, T_div = 4; 2-D features on the unit
    # circle at the angles below (degrees), radii varied.
    # scores descending by index, so R0 = [0, 1, 2, 3, 4, 5, 6] (R = 7, odd).
    # Round 1: r = min(8, 7 - 4) = 3.  A = [0, 2, 4, 6] (ceil(7/2) = 4),
    #   B = [1, 3, 5].  Angles: 0:0, 1:90, 2:92, 3:180, 4:270, 5:273, 6:45.
    #   s(0 @0)   = cos87 = .0523  (5 @273 is 87 deg away; 1 @90 is 90)
    #   s(2 @92)  = cos2  = .9994  (1 @90)
    #   s(4 @270) = cos3  = .9986  (5 @273)
    #   s(6 @45)  = cos45 = .7071  (1 @90)
    #   sorted desc: 2, 4, 6, 0 -> drop 2, 4, 6; residual = [0] + [1, 3, 5] = 4.
    # kept = [0, 1, 3, 5].
    angles = [0, 90, 92, 180, 270, 273, 45]
    radii = [1.0, 2.0, 0.5, 3.0, 1.0, 2.0, 1.5]
    points = zip(angles, radii, strict=True)
    feats = [[[r * math.cos(math.radians(a)), r * math.sin(math.radians(a))] for a, r in points]]
    scores = [[1.0 - 0.1 * i for i in range(7)]]
    _check_both(feats, scores, 4, 0.0, [[0, 1, 3, 5]])


# Two-round case.  N=20, budget 10, ratio 0 -> T_imp = 0, T_div = 10.
# 3-D attention with 2 heads: head0[i] = 2*(20-i) + 30*(i odd),
# head1[i] = 30 - 30*(i odd); the head mean is 35 - i, so R0 = [0..19]
# (either head alone would give a different order).
# Features: 2-D points at the angles below (degrees), radii 1/2/3.
_ANGLES20 = {
    # odds (group B in round 1)
    1: 0,
    3: 60,
    5: 95,
    7: 130,
    9: 165,
    11: 200,
    13: 235,
    15: 236,
    17: 275,
    19: 315,
    # evens (group A in round 1)
    0: 62,
    2: 97,
    4: 18,
    6: 133,
    8: 168,
    10: 330,
    12: 203,
    14: 238,
    16: 278,
    18: 312,
}


def test_hand_two_rounds_order_of_kept_a_matters():
    # Round 1: R = 20, r = min(8, 20 - 10) = 8.  A = evens, B = odds.
    #   s(even) = cos(angle to the nearest odd):
    #     0: 2deg .9994   2: 2deg .9994   4: 18deg .9511  6: 3deg .9986
    #     8: 3deg .9986  10: 15deg .9659 12: 3deg .9986  14: 2deg .9994
    #    16: 3deg .9986  18: 3deg .9986
    #   drop the 8 highest; keep 10 (.9659) then 4 (.9511), in that order.
    #   residual = [10, 4, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19]  (R = 12)
    # Round 2: r = min(8, 12 - 10) = 2.
    #   A = [10, 1, 5, 9, 13, 17], B = [4, 3, 7, 11, 15, 19]
    #   (B angles 18, 60, 130, 200, 236, 315)
    #   s(10 @330) = cos15 (19 @315) = .9659
    #   s(1 @0)    = cos18 (4 @18)   = .9511
    #   s(5 @95)   = cos35           = .8192
    #   s(9 @165)  = cos35           = .8192
    #   s(13 @235) = cos1  (15 @236) = .9998
    #   s(17 @275) = cos39 (15 @236) = .7771
    #   drop 13 and 10 -> residual = [1, 5, 9, 17] + B, 10 = T_div, stop.
    # kept = [1, 3, 4, 5, 7, 9, 11, 15, 17, 19];  rounds = 2.
    # (Keeping round-1 survivors in index order [4, 10] instead would put 4
    #  in A and 10 in B, drop 13 and 1, and give a different set.)
    feats = []
    for i in range(20):
        a = math.radians(_ANGLES20[i])
        r = 1.0 + (i % 3)
        feats.append([r * math.cos(a), r * math.sin(a)])
    odd = [1.0 if i % 2 else 0.0 for i in range(20)]
    head0 = [2.0 * (20 - i) + 30.0 * odd[i] for i in range(20)]
    head1 = [30.0 - 30.0 * odd[i] for i in range(20)]
    expected = [[1, 3, 4, 5, 7, 9, 11, 15, 17, 19]]
    _check_both([feats], [[head0, head1]], 10, 0.0, expected)
    _, infos = reference_vispruner_with_info(
        np.asarray([feats], dtype=np.float32), np.asarray([[head0, head1]], dtype=np.float32), 10, 0.0
    )
    assert infos[0]["rounds"] == 2
    assert infos[0]["drops"] == [8, 2]


def test_hand_budget_at_least_n_keeps_everything():
    feats = torch.randn(2, 7, 3, generator=torch.Generator().manual_seed(0))
    att = torch.softmax(torch.randn(2, 4, 7, generator=torch.Generator().manual_seed(1)), -1)
    expected = torch.arange(7).repeat(2, 1)
    for budget in (7, 8, 12):
        _check_both(feats, att, budget, 0.5, expected.tolist())


# --------------------------------------------------------------------------
# number of rounds
# --------------------------------------------------------------------------


@pytest.mark.parametrize("budget", [64, 128, 192])
def test_round_count_n576(budget):
    n, ratio = 576, 0.5
    features, attention = _make_inputs(7000 + budget, 1, n, 64, 4)
    _, infos = reference_vispruner_with_info(features.numpy(), attention.numpy(), budget, ratio)
    expected_rounds = math.ceil((n - budget) / 8)
    assert infos[0]["rounds"] == expected_rounds
    # every round drops 8 except possibly the last
    assert all(r == 8 for r in infos[0]["drops"][:-1])
    assert sum(infos[0]["drops"]) == n - budget
    # and the implementation agrees on this configuration
    assert torch.equal(_run_impl(features, attention, budget, ratio), _run_ref(features, attention, budget, ratio)[0])
