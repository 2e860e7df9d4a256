"""A job killed midway (driver and its local Ray, SIGKILL) and rerun ends with one row per item.

Its own module: the job starts its own local Ray in a child process, apart from the in-process
Ray of test_pipeline.py. The rerun is also the suite's check of what a user sees from the command
line without a terminal: a quiet stderr, the driver's progress line and the SSD summary line.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.output import part_files, read_output
from synthetic.corpus import write_corpus

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "configs" / "demo.yaml"
pytestmark = pytest.mark.timeout(900)


def rows_of(output):
    return read_output(str(output)).to_pylist()


def test_killed_job_rerun_ends_with_one_row_per_item(tmp_path):
    """Kill the whole job (driver and its local Ray) after the first part lands; the rerun of the
    same command fills in the rest, and no item is lost or doubled."""
    out = tmp_path / "out"
    items = tmp_path / "items"
    write_corpus(str(tmp_path / "corpus"), seed=515, n_images=24, n_videos=0)
    shutil.copytree(tmp_path / "corpus" / "images", items / "images")
    cmd = [
        sys.executable,
        str(ROOT / "jobs" / "caption.py"),
        "--config",
        str(DEMO),
        "--input",
        str(items),
        "--output",
        str(out),
        "compute.batch_size=2",
        "compute.decode_batch_size=2",
        "output.rows_per_file=2",
        "decode.max_new_tokens=48",
        "decode.strategy=ssd",  # the committed twig: the summary then has its acceptance line
        f"decode.twig={ROOT / 'models' / 'shapes-llava' / 'twig'}",
        "ray.progress_interval_s=1",  # ray.progress_bars keeps its default: no terminal here, so no bars
    ]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.time() + 240
    while time.time() < deadline and not part_files(str(out)) and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, "the job finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)  # driver and everything it started
    proc.wait()
    partial = rows_of(out)
    assert 0 < len(partial) < 24
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = rows_of(out)
    assert sorted(r["item_id"] for r in rows) == sorted(f"images/{p.name}" for p in (items / "images").iterdir())
    assert f"{len(partial)} already done, skipped" in done.stdout
    assert_quiet_no_terminal_run(done.stdout, done.stderr)


def assert_quiet_no_terminal_run(stdout: str, stderr: str) -> None:
    """What a user sees from a run whose stdout and stderr are not a terminal."""
    assert re.search(r"^progress: \d+/\d+ items \(ok \d+, error \d+\), [\d.]+ items/s, ETA ", stdout, re.M), stdout
    assert re.search(r"^  speculative decoding: acceptance [\d.]+% \(\d+ of \d+ drafted tokens\)", stdout, re.M), stdout
    noises = ("FutureWarning", "Total Progress", "Loading weights", "it/s]", "Token auth", "Starting execution")
    for noise in noises:
        assert noise not in stderr, f"{noise!r} in stderr:\n{stderr[-3000:]}"
    # Ray core's false alarm about Ray Data's actor pool is dropped by pipeline.console; nothing else is.
    core = [line for line in stderr.splitlines() if "core_worker" in line]
    assert not core, "\n".join(core)
