"""The Ray Data job end to end on a local Ray, with the shipped demo model.

Real components throughout: generated H.264 videos and PNGs, broken media, Parquet parts read
back with DuckDB, an inference actor killed mid-run, and a killed-and-rerun job.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.config import load_config
from pipeline.output import part_files, part_metadata, read_output
from pipeline.run import run
from pipeline.schema import SCHEMA
from synthetic.corpus import write_corpus
from tests.broken_media import write_broken_media

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "configs" / "demo.yaml"
pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    write_corpus(str(out), seed=20261123, n_images=6, n_videos=3)
    return out


def job_config(input_uri, output_uri, *overrides):
    return load_config(
        DEMO,
        [
            f"input.uri='{input_uri}'",
            f"output.uri='{output_uri}'",
            "ray.progress_bars=false",
            "decode.max_new_tokens=24",
            *overrides,
        ],
    )


def rows_of(output, fingerprint=None):
    table = read_output(str(output))
    rows = table.to_pylist()
    return [r for r in rows if fingerprint is None or r["config_fingerprint"] == fingerprint]


def test_captions_one_ok_row_per_item(ray_local, corpus, tmp_path):
    config = job_config(corpus, tmp_path / "out", "output.rows_per_file=4")
    summary = run(config, log=lambda *_: None)
    rows = rows_of(tmp_path / "out")
    assert sorted(r["item_id"] for r in rows) == sorted(
        [f"images/img_{i:08d}.png" for i in range(6)] + [f"videos/vid_{i:08d}.mp4" for i in range(3)]
    )
    assert all(r["status"] == "ok" and r["text"] and r["error"] is None for r in rows)
    assert (summary.ok, summary.errors, summary.duplicates, summary.missing) == (9, 0, 0, 0)
    for r in rows:
        frames = 1 if r["media_type"] == "image" else 4
        assert r["num_frames"] == frames
        assert r["visual_tokens_total"] == 64 * frames and r["visual_tokens_kept"] == 21 * frames
        assert r["pruning_method"] == "vispruner" and r["pruning_budget"] == 21
        assert r["model"] == "shapes-llava" and r["task"] == "caption" and r["decode_strategy"] == "greedy"
        assert 0 < r["generated_tokens"] <= 24 and r["latency_ms"] > 0 and r["run_id"] == summary.run_id
        assert r["prefill_ms"] > 0 and r["generate_ms"] > 0
        assert abs(r["prefill_ms"] + r["generate_ms"] - r["latency_ms"]) < 1e-6 * r["latency_ms"] + 1e-9
    parts = part_files(str(tmp_path / "out"))
    assert len(parts) >= 3  # rows_per_file=4
    assert pq.read_schema(parts[0]).remove_metadata() == SCHEMA
    assert all(part_metadata(p)["vlm_batch.config_fingerprint"] == summary.config_fingerprint for p in parts)
    record = json.loads(next((tmp_path / "out" / "_runs").glob("*.json")).read_text())
    assert record["summary"]["ok"] == 9 and record["config"]["pruning"]["budget"] == 21
    assert len({r["text"] for r in rows}) > 1  # captions depend on the media


def test_output_reads_with_duckdb(ray_local, corpus, tmp_path):
    import duckdb

    run(job_config(corpus, tmp_path / "out"), log=lambda *_: None)
    con = duckdb.connect()
    got = con.execute(
        f"SELECT media_type, count(*), min(visual_tokens_kept), sum(CASE WHEN status='ok' THEN 1 ELSE 0 END) "
        f"FROM read_parquet('{tmp_path}/out/*.parquet') GROUP BY media_type ORDER BY media_type"
    ).fetchall()
    assert got == [("image", 6, 21, 6), ("video", 3, 84, 3)]


def test_broken_media_one_row_each(ray_local, corpus, tmp_path):
    """Every broken or odd file gives exactly one row, with the expected status and error kind."""
    media = tmp_path / "media"
    cases = write_broken_media(media)
    shutil.copy(corpus / "images" / "img_00000000.png", media / "good.png")
    (media / "oversized.mp4").write_bytes(b"\0" * 3_000_000)  # over media.max_bytes: refused unread
    config = job_config(
        media, tmp_path / "out", "media.timeout_s=20", "input.extensions=null", "media.max_bytes=2000000"
    )
    summary = run(config, log=lambda *_: None)
    rows = {r["item_id"]: r for r in rows_of(tmp_path / "out")}
    files = sorted(p.name for p in media.iterdir() if not p.name.startswith((".", "_")))
    assert sorted(rows) == files  # one row per input file, none lost, none doubled
    assert rows["good.png"]["status"] == "ok"
    assert rows["oversized.mp4"]["error_kind"] == "too_large" and "media.max_bytes" in rows["oversized.mp4"]["error"]
    for case in cases:
        row = rows[case.name]
        assert row["status"] == case.expect_status, (case, row["error"])
        if case.expect_status == "error":
            assert row["error_kind"] == case.expect_kind, (case, row["error"])
            assert row["error"] and row["text"] is None
        else:
            assert row["text"]
    assert summary.duplicates == summary.missing == 0
    assert summary.errors == sum(c.expect_status == "error" for c in cases) + 1


def test_manifest_with_missing_and_remote_media(ray_local, corpus, tmp_path):
    """A manifest row whose file is gone gets a not_found row; the others are answered."""
    manifest = tmp_path / "manifest.jsonl"
    records = [
        {"id": "a", "uri": str(corpus / "images" / "img_00000001.png"), "question": "how many objects are there ?"},
        {"id": "b", "uri": str(tmp_path / "gone.png"), "question": "how many objects are there ?"},
        {"id": "c", "uri": str(corpus / "videos" / "vid_00000000.mp4"), "question": "what colour is the square ?"},
    ]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in records))
    config = job_config(manifest, tmp_path / "out", "task=qa", "input.kind=manifest", "decode.max_new_tokens=4")
    summary = run(config, log=lambda *_: None)
    rows = {r["item_id"]: r for r in rows_of(tmp_path / "out")}
    assert sorted(rows) == ["a", "b", "c"]
    assert (
        rows["b"]["status"] == "error" and rows["b"]["error_kind"] == "not_found" and "gone.png" in rows["b"]["error"]
    )
    assert rows["a"]["status"] == rows["c"]["status"] == "ok"
    assert rows["a"]["question"] == "how many objects are there ?" and rows["c"]["media_type"] == "video"
    assert (summary.ok, summary.errors) == (2, 1)


def test_ssd_captions_equal_greedy_captions(ray_local, corpus, tmp_path):
    """decode.strategy=ssd writes the same captions as greedy (TwigVLM's SSD is lossless), with
    draft counts; the twig here is freshly grown, so equality cannot come from a good twig."""
    from operators.loading import load_vlm
    from operators.twig import grow_twig, save_twig

    model, _ = load_vlm(ROOT / "models" / "shapes-llava")
    save_twig(grow_twig(model, K=2, T=1), tmp_path / "twig", model)
    twig = f"decode.twig='{tmp_path / 'twig'}'"
    out = tmp_path / "out"
    greedy = run(job_config(corpus, out, twig, "decode.max_new_tokens=40"), log=lambda *_: None)
    ssd = run(job_config(corpus, out, twig, "decode.max_new_tokens=40", "decode.strategy=ssd"), log=lambda *_: None)
    rows = rows_of(out)
    by_config = {
        fp: {r["item_id"]: r for r in rows if r["config_fingerprint"] == fp}
        for fp in (greedy.config_fingerprint, ssd.config_fingerprint)
    }
    plain, speculative = by_config[greedy.config_fingerprint], by_config[ssd.config_fingerprint]
    assert len(plain) == len(speculative) == 9
    for item_id, row in plain.items():
        assert speculative[item_id]["text"] == row["text"], item_id
        assert speculative[item_id]["decode_strategy"] == "ssd" and row["drafted_tokens"] is None
        assert 0 <= speculative[item_id]["accepted_tokens"] <= speculative[item_id]["drafted_tokens"]
    # The summary's SSD figures are the rows' counts added up (over the run), absent for greedy.
    ssd_rows = list(speculative.values())
    drafted, accepted = (sum(r[c] for r in ssd_rows) for c in ("drafted_tokens", "accepted_tokens"))
    assert (ssd.drafted_tokens, ssd.accepted_tokens) == (drafted, accepted) and ssd.acceptance == accepted / drafted
    generated, rounds = (sum(r[c] for r in ssd_rows) for c in ("generated_tokens", "draft_rounds"))
    assert ssd.tokens_per_round == generated / rounds
    assert greedy.acceptance is None and not any("speculative" in line for line in greedy.lines())


def test_rerun_skips_done_items_and_new_config_gets_new_rows(ray_local, corpus, tmp_path):
    out = tmp_path / "out"
    first = run(job_config(corpus, out, "input.limit=4"), log=lambda *_: None)
    assert first.items_processed == 4
    second = run(job_config(corpus, out), log=lambda *_: None)
    assert (second.items_skipped, second.items_processed, second.duplicates, second.missing) == (4, 5, 0, 0)
    third = run(job_config(corpus, out), log=lambda *_: None)
    assert (third.items_skipped, third.items_processed) == (9, 0)
    other = run(job_config(corpus, out, "pruning.method=none", "pruning.budget=null"), log=lambda *_: None)
    assert (other.items_skipped, other.items_processed) == (0, 9)
    rows = rows_of(out)
    assert Counter(Counter((r["item_id"], r["config_fingerprint"]) for r in rows).values()) == {1: 18}


def test_qa_task_and_videoqa_scoring(ray_local, corpus, tmp_path, capsys):
    from pipeline.cli import videoqa_main as main

    args = ["--config", str(ROOT / "configs" / "shapes-qa.yaml"), "--input", str(corpus / "qa.json")]
    base = ["--output", str(tmp_path / "out"), "ray.progress_bars=false"]
    assert main([*args, *base, "pruning.method=none", "pruning.budget=null"]) == 0
    assert main([*args, *base, "--baseline", str(tmp_path / "out"), "--predictions", str(tmp_path / "p.jsonl")]) == 0
    printed = capsys.readouterr().out
    report = json.loads(printed.strip().splitlines()[-1])
    questions = len(json.loads((corpus / "qa.json").read_text()))
    assert report["questions"] == questions and report["baseline_questions"] == questions
    assert 0 < report["accuracy"]["all"] <= 1 and report["rel_acc"] > 0
    assert {"colour", "count"} <= set(report["accuracy"])
    assert len((tmp_path / "p.jsonl").read_text().splitlines()) == questions
    rows = rows_of(tmp_path / "out")
    assert len(rows) == 2 * questions and all(r["task"] == "qa" and r["answer"] for r in rows)
    # Each run's summary has its accuracy line, the same figure videoqa prints for that run's rows.
    assert f"  accuracy: {report['accuracy']['all']:.3f} ({round(report['accuracy']['all'] * questions)} of " in printed
    records = [json.loads(p.read_text())["summary"] for p in (tmp_path / "out" / "_runs").glob("*.json")]
    assert sorted(r["answers_scored"] for r in records) == [questions, questions]
    assert report["accuracy"]["all"] in [r["accuracy"] for r in records]


def pids_titled(prefix: str) -> list[int]:
    """Processes whose command line (Ray sets it to the actor's title) starts with ``prefix``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                title = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if title.startswith(prefix):
                pids.append(int(entry.name))
    return pids


def test_inference_actor_killed_mid_run(ray_local, corpus, tmp_path):
    """SIGKILL the inference actor after its first batch: Ray restarts it, retries the batch,
    and the output still holds exactly one row per item."""
    out = tmp_path / "out"
    items = tmp_path / "items"
    (items / "images").mkdir(parents=True)
    for k in range(4):  # 24 images: enough batches that the kill lands mid-run
        for p in (corpus / "images").iterdir():
            shutil.copy(p, items / "images" / f"{k}_{p.name}")
    config = job_config(
        items,
        out,
        "compute.batch_size=2",
        "compute.decode_batch_size=2",
        "output.rows_per_file=2",
        "decode.max_new_tokens=48",
    )
    killed: list[int] = []

    def killer():
        deadline = time.time() + 300
        while time.time() < deadline and not killed:
            if part_files(str(out)):  # the actor has finished at least one batch
                # Ray titles actor processes "ray::<class>"; decode and write stages are tasks.
                for pid in pids_titled("ray::MapWorker(MapBatches(InferenceStage))"):
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                    return
            time.sleep(0.2)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    summary = run(config, log=lambda *_: None)
    thread.join(timeout=5)
    assert killed, "the actor was never killed: the test did not exercise a restart"
    rows = rows_of(out)
    assert len(rows) == 24 == len({r["item_id"] for r in rows})
    assert all(r["status"] == "ok" for r in rows)
    assert summary.duplicates == summary.missing == 0


def test_stale_local_cluster_record_is_ignored(tmp_path, monkeypatch):
    """Ray's record of the last `ray start` cluster outlives a killed cluster; following it blindly
    hangs ray.init(). Only a record whose GCS answers is joined."""
    import socket

    from pipeline.run import live_local_cluster

    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    (tmp_path / "ray").mkdir()
    record = tmp_path / "ray" / "ray_current_cluster"
    assert live_local_cluster() is None  # no record
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        record.write_text(f"127.0.0.1:{port}\n")
        assert live_local_cluster() == f"127.0.0.1:{port}"
    assert live_local_cluster() is None  # the port is closed now: a dead cluster


def test_python_api_stages_on_a_users_dataset(ray_local, corpus):
    """``pipeline.api.caption_dataset``: the job's decode + inference stages on a Dataset the user
    built, ids from their column, rows in the output schema, nothing written."""
    import ray

    from pipeline.api import caption_dataset
    from pipeline.config import ConfigError

    media = [corpus / "images" / "img_00000000.png", corpus / "videos" / "vid_00000000.mp4"]
    ds = ray.data.from_items([{"id": f"mine-{i}", "uri": str(p), "extra": i} for i, p in enumerate(media)])
    overrides = ["decode.max_new_tokens=8", "ray.progress_bars=false"]
    rows = sorted(caption_dataset(ds, DEMO, overrides).take_all(), key=lambda r: r["item_id"])
    assert [r["item_id"] for r in rows] == ["mine-0", "mine-1"]
    assert set(rows[0]) == set(SCHEMA.names)
    assert all(r["status"] == "ok" and r["text"] for r in rows)
    assert [r["visual_tokens_kept"] for r in rows] == [21, 21 * 4]
    assert rows[0]["config_fingerprint"] == load_config(DEMO, overrides).fingerprint()
    with pytest.raises(ConfigError, match="no 'url' column"):
        caption_dataset(ds, DEMO, overrides, uri_column="url")
