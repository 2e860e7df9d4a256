"""Fault drills through the real command line and a real local Ray: each asserts rows per item, the
exit status and the message. (Actor SIGKILL and driver SIGKILL + rerun: tests/test_pipeline.py and
tests/test_pipeline_kill.py.)"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from evaluation.s3_server import relaunch_s3_server, start_s3_server, stop_s3_server
from pipeline import exit_status
from pipeline.output import part_files, read_output
from synthetic.corpus import write_corpus

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(600)

# Small, slow enough to strike mid-run: one item per engine batch and per part.
JOB = ["--config", "configs/demo.yaml", "decode.max_new_tokens=12", "compute.batch_size=1", "ray.address=local",
       "compute.batch_tokens=null", "output.rows_per_file=1", "ray.progress_interval_s=null"]  # fmt: skip


class Job(subprocess.Popen):
    """``python jobs/caption.py`` running; its stdout lines collected as they come."""

    def __init__(self, *args: str, env: dict | None = None):
        environment = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
        environment.pop("RAY_ADDRESS", None)
        super().__init__(
            [sys.executable, "jobs/caption.py", *JOB, *args],
            cwd=ROOT,
            env=environment,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(iter(self.stdout.readline, "")), daemon=True)
        self.reader.start()

    def wait_for_line(self, fragment: str) -> None:
        deadline = time.time() + 120
        while not any(fragment in line for line in self.lines):
            assert self.poll() is None, f"the job ended first: {finish(self)}"
            assert time.time() < deadline, f"no line with {fragment!r}"
            time.sleep(0.05)


def start_job(*args: str, env: dict | None = None) -> Job:
    return Job(*args, env=env)


def finish(job: Job) -> tuple[int, str, str]:
    err = job.stderr.read()
    job.wait(timeout=300)
    job.reader.join(timeout=10)
    return job.returncode, "".join(job.lines), err


def wait_for_parts(output: str, count: int, job: subprocess.Popen, options: dict | None = None) -> None:
    deadline = time.time() + 120
    while len(part_files(output, options)) < count:
        assert job.poll() is None, f"the job ended first: {finish(job)}"
        assert time.time() < deadline, "no part appeared"
        time.sleep(0.05)


def down_until_tried(endpoint_url: str, tries: int, at_least_s: float, at_most_s: float = 120) -> int:
    """Storage down: connections to the stopped server's S3 port are accepted and reset at once (as a
    server going away does: a transient error) until ``tries`` of them came and ``at_least_s`` passed.
    Returns how many came. The port is free again when this returns."""
    import socket
    import struct
    from urllib.parse import urlsplit

    address = urlsplit(endpoint_url)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((address.hostname, address.port))
    listener.listen(64)
    listener.settimeout(0.2)
    started, came = time.time(), 0
    try:
        while time.time() - started < at_most_s and (came < tries or time.time() - started < at_least_s):
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST on close
            connection.close()
            came += 1
    finally:
        listener.close()
    return came


def one_ok_row_per_item(output: str, items: int, options: dict | None = None) -> None:
    rows = read_output(output, options).to_pylist()
    counts = Counter(r["item_id"] for r in rows)
    assert len(counts) == items and set(counts.values()) == {1}, counts
    assert all(r["status"] == "ok" for r in rows), [(r["item_id"], r["error"]) for r in rows if r["status"] != "ok"]


def stopped_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MB tmpfs of our own: it can be filled and remounted read-only (root only; else skipped)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


@pytest.mark.slow  # ~80 s, three runs of the job on a tmpfs (make test-all); ENOSPC/EROFS unit tests in test_faults.py
def test_output_disk_read_only_then_full_then_fixed(small_disk, tmp_path):
    """The output disk goes read-only, then full, as a run starts its work: each run stops with status
    6 and one line naming the disk; after the fix the same command completes the output. (Parts
    committed before a stop staying intact: the kill tests.)"""
    corpus = tmp_path / "corpus"
    write_corpus(str(corpus), seed=77, n_images=8, n_videos=0)
    output = str(small_disk / "captions")
    args = ("--input", str(corpus), "--output", output)
    job = start_job(*args)
    job.wait_for_line("to do")  # checks passed, the plan not started: the disk fails under the run
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    status, _, err = finish(job)
    assert status == exit_status.INFRASTRUCTURE, err[-3000:]
    line = stopped_line(err)
    assert "the disk failed" in line and "Read-only file system" in line and "rerun the same command" in line
    assert read_output(output).num_rows == 0

    subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=True)
    job = start_job(*args)
    job.wait_for_line("to do")
    with (small_disk / "filler").open(
        "wb", buffering=0
    ) as filler:  # take every byte left (unbuffered: close has nothing to flush)
        try:
            while True:
                filler.write(b"\0" * 65536)

        except OSError:
            pass
    status, _, err = finish(job)
    assert status == exit_status.INFRASTRUCTURE, err[-3000:]
    assert "the disk failed" in stopped_line(err) and "No space left on device" in stopped_line(err)

    (small_disk / "filler").unlink()
    status, out, err = finish(start_job(*args))
    assert status == exit_status.OK, err[-3000:]
    assert "8 items from" in out
    one_ok_row_per_item(output, 8)


def test_storage_outage_mid_run_costs_no_data(tmp_path):
    """SeaweedFS stopped as the run starts reading, back once the workers have met the outage (8 s at
    least), then stopped again once the first part is written, back 5 s later: reads and part writes
    ride it out; every item has one current row, and every row is ok."""
    server, proc = start_s3_server(tmp_path / "s3")
    try:
        options = server.options()
        corpus, output = server.uri("drill", "corpus"), server.uri("drill", "captions")
        write_corpus(corpus, seed=78, n_images=6, n_videos=0, storage_options=options)
        env = {**server.env(), "AWS_MAX_ATTEMPTS": "1"}  # botocore's own retries off: ours ride the outage
        args = ("--input", corpus, "--output", output, "storage.retry_base_s=0.3", "storage.retry_max_wait_s=2")
        job = start_job(*args, "storage.retry_attempts=30", env=env)
        job.wait_for_line("to do")  # the driver has listed the input and the output: now the workers read
        stop_s3_server(proc)
        # Down until the workers have met the outage (Ray's start-up may outlast any fixed wait on a busy
        # machine, and reads that begin after the outage would prove nothing), and for 8 s at least.
        assert down_until_tried(server.endpoint_url, tries=3, at_least_s=8) >= 3
        proc = relaunch_s3_server(server)
        wait_for_parts(output, 1, job, options)
        stop_s3_server(proc)  # the remaining parts are written into the outage
        time.sleep(5)
        proc = relaunch_s3_server(server)
        status, out, err = finish(job)
        # 29 jittered waits of up to 2 s (about 29 s in all, rarely under 20) outlast each ~10 s outage, so
        # the run rides both out itself. (Past its retries it would exit 6 "rerun"; the disk drill tests that.)
        assert status == exit_status.OK, err[-3000:]
        one_ok_row_per_item(output, 6, options)
        assert max(r["attempts"] for r in read_output(output, options).to_pylist()) > 1  # reads were retried
    finally:
        stop_s3_server(proc)
