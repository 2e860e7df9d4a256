"""jobs/bench_scale.py on small sizes: S3 streaming with the object store capped, and a 3-node local cluster."""

import pytest

from evaluation import bench_scale

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_corpus_check_streams_from_s3_exactly_once(tmp_path):
    result = bench_scale.run_check(["corpus", "--videos", "40", "--object-store-mb", "256", "--out", str(tmp_path)])
    assert result["items"] == result["ok"] == 40 and result["duplicates"] == result["missing"] == 0
    assert result["peak_rss_mb"] > 0 and result["spilled_mb"] >= 0
    assert (tmp_path / "corpus.json").exists()


def test_nodes_check_runs_on_three_local_nodes(tmp_path):
    result = bench_scale.run_check(["nodes", "--videos", "24", "--out", str(tmp_path)])
    assert result["nodes"] == 3
    assert [r["actors"] for r in result["results"]] == [1, 2]
    assert all(r["items"] == 24 and r["duplicates"] == r["missing"] == 0 for r in result["results"])
