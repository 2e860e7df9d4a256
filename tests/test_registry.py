"""A pruning method is one class plus one registration: a test-only method, registered here and
nowhere else, is accepted by the job config, run by the engine and listed by the quality and
benchmark jobs."""

from __future__ import annotations

import pytest
import torch

from evaluation import benchmark, quality
from operators import registry
from operators.engine import Engine, EngineConfig
from operators.pruning.base import BeforeLLM, Selection, VisualItem, gather_tokens
from pipeline.config import ConfigError, load_config
from tests.test_engine import make_requests


class KeepFirst(BeforeLLM):
    """Test-only: the first ``budget`` patches of every segment, in raster order."""

    name = "keep_first"
    calls: list[int] = []  # budgets it was called with

    def select_one(self, item: VisualItem, budget: int) -> Selection:
        KeepFirst.calls.append(budget)
        patches = item.segments.patches  # [n, N, C]
        indices = torch.arange(min(budget, patches.shape[1])).expand(patches.shape[0], -1)
        return indices, gather_tokens(patches, indices)


@pytest.fixture
def keep_first():
    spec = registry.PruningSpec(
        "keep_first", registry.BEFORE_LLM, f"{__name__}:KeepFirst", "test only: first k patches"
    )
    registry.register_pruning(spec)
    yield spec
    registry.unregister_pruning("keep_first")


def test_the_config_accepts_a_registered_method_and_no_other(keep_first):
    config = load_config("configs/demo.yaml", ["pruning.method=keep_first", "pruning.budget=3"])
    assert config.to_engine_config().pruning == keep_first
    with pytest.raises(ConfigError, match="pruning.budget: required when pruning.method is 'keep_first'"):
        load_config("configs/demo.yaml", ["pruning.method=keep_first", "pruning.budget=null"])
    registry.unregister_pruning("keep_first")
    with pytest.raises(ConfigError, match="unknown pruning method 'keep_first'"):
        load_config("configs/demo.yaml", ["pruning.method=keep_first", "pruning.budget=3"])


def test_the_engine_runs_a_registered_method(tiny, keep_first):
    model, processor = tiny("llava")  # 144 patches per image
    requests = make_requests("llava", processor, count=2)
    engine = Engine(model, processor, EngineConfig("keep_first", budget=5, max_new_tokens=3))
    assert isinstance(engine.method, KeepFirst)
    KeepFirst.calls.clear()
    results = engine.generate(requests)
    assert KeepFirst.calls == [5, 5]  # once per image
    assert [r.visual_tokens_kept for r in results] == [5, 5]
    assert [r.visual_tokens_total for r in results] == [144, 144]
    # The visual tokens the language model gets are the first five patches, projected.
    batch = engine.prompt_batch(requests[:1])
    start, end = batch.media_spans[0][0]
    row = engine.adapter.preprocess(requests[0].prompt, requests[0].images)
    patches = engine.adapter.encode("image", row.media[0].pixel_values).patches
    torch.testing.assert_close(batch.embeds[0, start:end], engine.adapter.project(patches[0, :5]))


def test_the_quality_and_benchmark_jobs_list_a_registered_method(keep_first, capsys):
    assert "keep_first" in quality.compared_methods()
    assert quality.parse_methods(["keep_first"]) == ("keep_first",)
    names = [s.name for s in benchmark.setups(64, twig=None)]
    assert {"keep_first-1/3", "keep_first-2/9", "keep_first-1/9"} <= set(names)
    assert "keep_first+ssd-1/9" in [s.name for s in benchmark.setups(64, twig="some/twig")]
    benchmark.run_benchmark(["--list"])
    assert "keep_first-1/9" in capsys.readouterr().out.split()
