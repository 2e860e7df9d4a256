"""Independent, loop-based numpy reference for VisPruner visual-token selection.

Written from the algorithm description only (not from operators/pruning.py), to
be used as a test oracle.  Clarity over speed.

Per batch row:
  * scores = CLS attention averaged over heads (if 3-D), one per patch.
  * budget >= N: keep every patch.
  * T_imp = int(budget * important_ratio); T_div = budget - T_imp.
  * Patches sorted by score descending (ties: lower index first); the first
    T_imp are "important", the rest form the residual list (same order).
  * Diverse selection: repeatedly split the residual list by position parity
    (A = even positions, B = odd positions), score every a in A by its maximum
    cosine similarity to any b in B, and drop the r = min(8, R - T_div) most
    similar A elements.  New residual = kept A (descending similarity order)
    followed by B (unchanged).  Stop when r <= 0.
  * Kept = important + remaining residual, returned in ascending index order.
"""

from __future__ import annotations

import math

import numpy as np

MAX_DROP_PER_ROUND = 8


def _stable_descending_order(values):
    """Indices 0..len-1 sorted by value descending; ties keep the earlier index first."""
    positions = list(range(len(values)))
    # Python's sort is stable, so sorting on -value keeps equal values in
    # ascending position order.
    positions.sort(key=lambda p: -values[p])
    return positions


def _min_adjacent_gap(sorted_values):
    """Smallest difference between neighbours of an already-sorted sequence."""
    gap = math.inf
    for i in range(len(sorted_values) - 1):
        gap = min(gap, abs(sorted_values[i] - sorted_values[i + 1]))
    return gap


def _normalize_rows(features_row):
    """x_hat_j = x_j / ||x_j||_2 for every patch j (float64)."""
    x = np.asarray(features_row, dtype=np.float64)
    out = np.empty_like(x)
    for j in range(x.shape[0]):
        norm = math.sqrt(float(np.dot(x[j], x[j])))
        out[j] = x[j] / norm
    return out


def reference_vispruner_row(features_row, scores_row, budget, important_ratio=0.5):
    """Run VisPruner on one batch row.

    Args:
        features_row: [N, C] patch features.
        scores_row: [N] per-patch importance scores (already head-averaged).
        budget: number of tokens to keep.
        important_ratio: fraction of the budget taken by attention importance.

    Returns:
        (kept, info) where kept is a sorted Python list of kept patch indices
        and info is a dict of debug information: "rounds" (number of diverse
        pruning rounds executed), "important" (list), "diverse" (list),
        "drops" (list of r per round), "score_margin" and "sim_margin"
        (decision margins, see below; tiny values mean the case is sensitive
        to floating-point rounding).
    """
    n = len(scores_row)
    if budget >= n:
        return list(range(n)), {
            "rounds": 0,
            "important": [],
            "diverse": [],
            "drops": [],
            "score_margin": math.inf,
            "sim_margin": math.inf,
        }

    t_imp = int(budget * important_ratio)
    t_div = budget - t_imp

    scores = [float(s) for s in scores_row]
    order = _stable_descending_order(scores)
    important = order[:t_imp]
    residual = order[t_imp:]

    x_hat = _normalize_rows(features_row)

    # Decision margins (debug only, they do not influence the result): the
    # smallest gap between two neighbouring values whose relative order
    # changes the output.  Tests use them to tell a float32-vs-float64
    # rounding flip on a near-tie apart from a real disagreement.
    #   score_margin: relative gap in the score order, over the
    #     important/residual boundary and (when diverse tokens are selected)
    #     the whole residual order, which fixes the parity split.
    #   sim_margin: absolute gap in a round's similarity order, over the
    #     drop boundary and (if another round follows) the order of the kept
    #     A elements, which fixes the next parity split.
    score_margin = math.inf
    first = max(t_imp - 1, 0)
    last = n - 1 if t_div > 0 else min(t_imp, n - 1)
    for i in range(first, last):
        hi, lo = scores[order[i]], scores[order[i + 1]]
        score_margin = min(score_margin, abs(hi - lo) / max(abs(hi), 1e-300))
    sim_margin = math.inf

    rounds = 0
    drops = []
    while t_div > 0:
        big_r = len(residual)
        r = min(MAX_DROP_PER_ROUND, big_r - t_div)
        if r <= 0:
            break
        group_a = residual[0::2]
        group_b = residual[1::2]

        # s(a) = max over b in B of <x_hat_a, x_hat_b>.  All dot products of
        # the round at once (row i = group_a[i], column j = group_b[j]); the
        # row-wise max is the redundancy score of each A element.  einsum
        # (no BLAS) on purpose: a multi-threaded BLAS call interleaved with
        # torch's own thread pool thrashes badly on small CPU boxes.
        sim_matrix = np.einsum("ik,jk->ij", x_hat[group_a], x_hat[group_b])
        sims = [float(sim_matrix[i].max()) for i in range(len(group_a))]

        a_order = _stable_descending_order(sims)  # positions within group_a
        kept_a = [group_a[p] for p in a_order[r:]]
        residual = kept_a + list(group_b)

        ordered_sims = [sims[p] for p in a_order]
        if r < len(ordered_sims):
            sim_margin = min(sim_margin, ordered_sims[r - 1] - ordered_sims[r])
        if len(residual) > t_div:  # another round follows
            sim_margin = min(sim_margin, _min_adjacent_gap(ordered_sims[r:]))

        rounds += 1
        drops.append(r)

    if t_div > 0:
        assert len(residual) == t_div, (len(residual), t_div)
        diverse = list(residual)
    else:
        diverse = []

    kept = sorted(important + diverse)
    assert len(kept) == budget
    assert len(set(kept)) == budget
    info = {
        "rounds": rounds,
        "important": important,
        "diverse": diverse,
        "drops": drops,
        "score_margin": score_margin,
        "sim_margin": sim_margin,
    }
    return kept, info


def _head_average(cls_attention):
    att = np.asarray(cls_attention, dtype=np.float64)
    if att.ndim == 3:  # [B, H, N]
        att = att.mean(axis=1)
    elif att.ndim != 2:
        raise ValueError(f"cls_attention must be [B,H,N] or [B,N], got {att.shape}")
    return att


def reference_vispruner_with_info(features, cls_attention, budget, important_ratio=0.5):
    """Like reference_vispruner but also returns per-row debug info dicts."""
    feats = np.asarray(features, dtype=np.float64)
    if feats.ndim != 3:
        raise ValueError(f"features must be [B,N,C], got {feats.shape}")
    scores = _head_average(cls_attention)
    b_size, n, _ = feats.shape
    if scores.shape != (b_size, n):
        raise ValueError(f"attention shape {scores.shape} does not match features {feats.shape}")
    keep = min(budget, n)
    out = np.empty((b_size, keep), dtype=np.int64)
    infos = []
    for bi in range(b_size):
        kept, info = reference_vispruner_row(feats[bi], scores[bi], budget, important_ratio)
        out[bi] = np.asarray(kept, dtype=np.int64)
        infos.append(info)
    return out, infos


def reference_vispruner(features, cls_attention, budget, important_ratio=0.5):
    """Reference VisPruner.

    Args:
        features: [B, N, C] patch features.
        cls_attention: [B, H, N] or [B, N] CLS-to-patch attention.
        budget: tokens to keep per row.
        important_ratio: fraction of budget chosen by attention.

    Returns:
        np.ndarray [B, min(budget, N)] of kept indices, ascending per row.
    """
    out, _ = reference_vispruner_with_info(features, cls_attention, budget, important_ratio)
    return out
