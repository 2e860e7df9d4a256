"""Hand-computed cases for the pre-LLM pruning methods."""

import pytest
import torch

from operators import registry
from operators.pruning.base import BeforeLLM, InLLM, top_k_indices
from operators.pruning.pool import pool, pool_grid
from operators.pruning.random_subset import random_subset
from operators.pruning.vispruner import vispruner


def test_vispruner_important_only_takes_top_attention():
    # ratio 1: pure [CLS]-attention top-k, returned in raster order.
    attention = torch.tensor([[0.1, 0.5, 0.05, 0.3, 0.05]])
    features = torch.randn(1, 5, 4)
    assert vispruner(features, attention, 2, important_ratio=1.0).tolist() == [[1, 3]]


def test_vispruner_head_mean_of_3d_attention():
    # head 0 prefers token 0, head 1 prefers token 2 more strongly: mean picks 2.
    attention = torch.tensor([[[0.6, 0.3, 0.1], [0.0, 0.2, 0.8]]])
    assert vispruner(torch.randn(1, 3, 2), attention, 1, important_ratio=1.0).tolist() == [[2]]


def test_vispruner_diverse_drops_the_duplicate():
    # N=5, budget 3, ratio 0 -> T_imp 0, T_div 3. Attention order: 0,1,2,3,4.
    # Round 1: R=5, r=min(8, 5-3)=2; A = positions 0,2,4 -> tokens [0,2,4], B = [1,3].
    # Features: token 0 == token 1 (duplicate), token 2 ~ token 3, token 4 orthogonal to B.
    # s(0)=1.0, s(2)=cos(2,3)=0.8, s(4)=0 -> drop tokens 0 and 2; residual = [4, 1, 3].
    features = torch.tensor([[[1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0], [0, 0.8, 0.6], [0, 0, -1.0]]])
    attention = torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]])
    assert vispruner(features, attention, 3, important_ratio=0.0).tolist() == [[1, 3, 4]]


def test_vispruner_odd_residual_count():
    # N=6, budget 4, ratio 0.25 -> T_imp = int(1.0) = 1 (token 5), residual of 5 (odd), T_div 3.
    # Residual order [0,1,2,3,4]; round 1: r = min(8, 5-3) = 2; A = [0,2,4], B = [1,3].
    # token 0 duplicates 1, token 4 duplicates 3, token 2 is orthogonal -> drop 0 and 4.
    features = torch.tensor([[[1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [0, 0, 1.0], [1.0, 1.0, 1.0]]])
    attention = torch.tensor([[0.3, 0.2, 0.15, 0.1, 0.05, 0.9]])
    assert vispruner(features, attention, 4, important_ratio=0.25).tolist() == [[1, 2, 3, 5]]


def test_vispruner_budget_at_least_n_keeps_everything():
    features, attention = torch.randn(2, 7, 3), torch.rand(2, 7)
    assert vispruner(features, attention, 7).tolist() == [list(range(7))] * 2
    assert vispruner(features, attention, 100).shape == (2, 7)


@pytest.mark.parametrize("n,budget", [(576, 64), (576, 128), (576, 192), (577, 64), (729, 64), (11, 4)])
@pytest.mark.parametrize("ratio", [0.0, 0.5, 1.0])
def test_vispruner_shapes_sorted_unique(n, budget, ratio):
    generator = torch.Generator().manual_seed(n + budget)
    features = torch.randn(2, n, 16, generator=generator)
    attention = torch.rand(2, 4, n, generator=generator)
    kept = vispruner(features, attention, budget, ratio)
    assert kept.shape == (2, budget)
    for row in kept:
        assert torch.equal(row, row.unique())  # strictly ascending, no repeats
    important = top_k_indices(attention.mean(1), int(budget * ratio))
    for row in range(2):  # every important token survives
        assert set(important[row].tolist()) <= set(kept[row].tolist())


def test_vispruner_rejects_bad_arguments():
    with pytest.raises(ValueError, match="important_ratio"):
        vispruner(torch.randn(1, 4, 2), torch.rand(1, 4), 2, important_ratio=1.5)
    with pytest.raises(ValueError, match="budget"):
        vispruner(torch.randn(1, 4, 2), torch.rand(1, 4), 0)
    with pytest.raises(ValueError, match="attention"):
        vispruner(torch.randn(1, 4, 2), torch.rand(1, 5), 2)


def test_random_is_seeded_and_sorted():
    features = torch.randn(3, 50, 4)
    a, _ = random_subset(features, 10, torch.Generator().manual_seed(1))
    b, _ = random_subset(features, 10, torch.Generator().manual_seed(1))
    c, _ = random_subset(features, 10, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a, a.sort(dim=-1).values)


def test_pool_averages_cells_and_anchors_at_centres():
    # 4x4 grid of scalar features equal to their index, pooled to 2x2 (budget 4).
    features = torch.arange(16.0).view(1, 16, 1)
    anchors, tokens = pool(features, 4, grid=(4, 4))
    # cell (0,0) covers indices 0,1,4,5 -> mean 2.5; centre anchor = row 0, col 0 -> index 0.
    assert tokens.flatten().tolist() == [2.5, 4.5, 10.5, 12.5]
    assert anchors.tolist() == [[0, 2, 8, 10]]
    assert pool_grid((24, 24), 64) == (8, 8)
    assert pool_grid((24, 24), 128)[0] * pool_grid((24, 24), 128)[1] <= 128


def test_registry_names_each_method_with_where_it_acts():
    assert registry.pruning_names() == ("none", "vispruner", "fastv", "random", "pool", "ttp")
    for name in registry.pruning_names():
        spec = registry.pruning_spec(name)
        method = registry.load(spec)
        expected = BeforeLLM if spec.acts == registry.BEFORE_LLM else InLLM
        assert issubclass(method, expected) and method.name == name
        assert spec.needs_budget == (name != "none") and spec.needs_twig == (name == "ttp")
    with pytest.raises(KeyError, match="allowed: none, vispruner, fastv, random, pool, ttp"):
        registry.pruning_spec("tome")
