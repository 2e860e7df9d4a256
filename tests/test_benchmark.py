"""jobs/benchmark.py end to end on a few items, and its Pareto front."""

import json
from pathlib import Path

import pytest

from evaluation import benchmark
from evaluation.measure import tree_rss

pytestmark = pytest.mark.timeout(600)


def test_pareto_front_keeps_only_unbeaten_points():
    points = [(1.0, 4.0), (0.8, 9.0), (0.9, 5.0), (0.85, 3.0), (0.7, 8.0)]
    assert benchmark.pareto_front(points) == [(0.8, 9.0), (0.9, 5.0), (1.0, 4.0)]


def test_overrides_may_follow_the_setup_names():
    _, args = benchmark.parse_args(["--setups", "vispruner-1/9", "ttp-1/9", "compute.batch_size=4", "--repeats", "2"])
    assert args.setups == ["vispruner-1/9", "ttp-1/9"] and args.overrides == ["compute.batch_size=4"]
    _, args = benchmark.parse_args(["decode.max_new_tokens=8", "--setups", "pruning.budget=7"])
    assert args.setups is None and args.overrides == ["decode.max_new_tokens=8", "pruning.budget=7"]


def test_tree_rss_counts_this_process():
    import os

    assert tree_rss(os.getpid()) > 10 * 2**20
    assert tree_rss(os.getpid(), exclude=(os.getpid(),)) == 0


@pytest.mark.slow  # ~45 s: every setup through the real job (make test-all)
def test_benchmark_runs_every_setup_and_checks_ssd_text(ray_local, tmp_path):
    out = tmp_path / "bench"
    report = benchmark.run_benchmark(
        [
            "--images", "3", "--videos", "2", "--max-new-tokens", "12", "--out", str(out),
            "--setups", "vispruner-1/9", "ttp-1/9", "ttp+ssd-1/9",
        ]
    )  # fmt: skip
    results = {r["setup"]: r for r in report["results"]}
    assert list(results) == ["none", "vispruner-1/9", "ttp-1/9", "ttp+ssd-1/9"]
    for r in results.values():
        assert r["items"] == r["ok"] == 5 and r["duplicates"] == r["missing"] == 0
        assert r["items_per_s"] > 0 and r["peak_rss_mb"] > 100 and 0 < r["actor_busy"] <= 1
        assert r["speedup"] == pytest.approx(r["items_per_s"] / results["none"]["items_per_s"])
    assert results["none"]["visual_tokens_kept"] == results["none"]["visual_tokens_total"]
    assert results["vispruner-1/9"]["visual_tokens_kept"] < results["none"]["visual_tokens_kept"] / 5
    assert results["vispruner-1/9"]["prefill_gflops_per_item"] < results["none"]["prefill_gflops_per_item"]
    assert results["ttp+ssd-1/9"]["same_text_as_greedy"] is True  # SSD wrote the TTP setup's captions
    assert 0 <= results["ttp+ssd-1/9"]["acceptance"] <= 1
    # accuracy comes from the committed quality table
    quality = json.loads(Path("reports/quality/quality.json").read_text())
    vis = next(r for r in quality["results"]["image"] if r["method"] == "vispruner" and r["fraction"] == "1/9")
    assert results["vispruner-1/9"]["rel_acc"]["image"] == vis["rel_acc"]
    assert (out / "benchmark.png").stat().st_size > 0
    table = (out / "benchmark.md").read_text()
    assert "| ttp+ssd-1/9 |" in table and "| yes |" in table


def test_engine_stages_prints_every_stage_and_the_ratio(capsys):
    from evaluation import engine_stages

    engine_stages.main(["--items", "2", "--max-new-tokens", "4", "--repeats", "1", "--threads", "1"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("| method | preprocess | vision | prune | prefill | decode | total")
    rows = {line.split(" | ")[0].strip("| "): line for line in lines[3:]}
    assert set(rows) == {"none", "vispruner:7"}
    assert rows["none"].split(" | ")[-2] == "1.00"  # the baseline's ratio to itself
