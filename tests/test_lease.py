"""pipeline.lease: one run per (output, config) on a local folder, on S3 (SeaweedFS, conditional
writes) and on a store without conditions (fsspec's memory store: write, settle, read back)."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from pipeline import cli, procinfo, storage
from pipeline.config import load_config
from pipeline.lease import LeaseHeld, LeaseLost, LeaseRecord, acquire, lease_uri, read_lease

ROOT = Path(__file__).resolve().parent.parent
SETTLE_S = 0.1  # the memory store's read-back wait; small, the writers are threads of one process


@pytest.fixture(params=["local", "s3", "memory"])
def where(request, tmp_path) -> tuple[str, dict]:
    """(output URI, storage options): a fresh output on each kind of store."""
    if request.param == "local":
        return str(tmp_path / "out"), {}
    if request.param == "memory":
        return f"memory://lease-test-{uuid.uuid4().hex}/out", {}
    server = request.getfixturevalue("s3_server")
    return server.uri(f"lease-{uuid.uuid4().hex}", "out"), server.options()


def take(where, run_id: str, fingerprint: str = "fp1", **kwargs):
    uri, options = where
    kwargs.setdefault("settle_s", SETTLE_S)
    return acquire(uri, fingerprint, options, run_id, **kwargs)


def write_by_hand(where, record: LeaseRecord, fingerprint: str = "fp1") -> None:
    """A lease as a killed run leaves it (local: the next generation of the lease's folder)."""
    uri, options = where
    target = lease_uri(uri, fingerprint)
    if storage._protocol(uri) in ("file", "local"):
        names = os.listdir(target) if os.path.isdir(target) else []
        newest = max((int(n[:12]) for n in names if n.endswith(".json")), default=0)
        target = os.path.join(target, f"{newest + 1:012d}.json")
    storage.write_bytes_atomic(target, record.to_bytes(), options)


def stale(run_id: str = "dead-run", **changes) -> LeaseRecord:
    now = time.time()
    fields = dict(
        run_id=run_id,
        fingerprint="fp1",
        host="other-host",
        pid=4242,
        started=now - 600,
        renewed=now - 300,
        expires=now - 240,
        ttl_s=60.0,
        nonce=uuid.uuid4().hex,
    )
    return LeaseRecord(**(fields | changes))


def test_a_held_lease_refuses_the_second_run_in_one_line(where):
    uri, _ = where
    with take(where, "run-a", ttl_s=30) as first:
        with pytest.raises(LeaseHeld) as refused:
            take(where, "run-b", ttl_s=30)
        message = str(refused.value)
        assert "\n" not in message
        assert re.fullmatch(
            rf"output {re.escape(uri)} is being written by run run-a \(host \S+, pid {os.getpid()}, "
            r"started \S+Z\) with the same config; its lease expires at \S+Z unless renewed; "
            r"wait for it to finish, or rerun after that",
            message,
        ), message
        assert refused.value.holder.run_id == "run-a"
        with take(where, "run-c", "fp2", ttl_s=30):  # another config shares the output freely
            pass
    assert first.released
    logs: list[str] = []
    with take(where, "run-b", ttl_s=30, log=logs.append):  # released: free at once, nothing taken over
        assert read_lease(*where[:1], "fp1", where[1]).run_id == "run-b"
    assert logs == []


def test_an_expired_lease_is_taken_over_with_a_log_line(where):
    uri, options = where
    write_by_hand(where, stale())
    logs: list[str] = []
    with take(where, "run-new", ttl_s=30, log=logs.append) as lease:
        assert read_lease(uri, "fp1", options).run_id == "run-new"
        assert lease.previous.run_id == "dead-run"
    assert len(logs) == 1 and "\n" not in logs[0]
    assert logs[0].startswith(f"output {uri}: run run-new takes over the lease of run dead-run (host other-host, ")
    assert "without renewal" in logs[0]


def race(where, names: list[str]) -> tuple[list, list[LeaseHeld]]:
    """``acquire`` from one thread per name, all at once: (leases won, refusals)."""
    barrier = threading.Barrier(len(names))
    won, refused = [], []

    def contend(name: str) -> None:
        barrier.wait()
        try:
            won.append(take(where, name, ttl_s=30, log=lambda line: None))
        except LeaseHeld as e:
            refused.append(e)

    threads = [threading.Thread(target=contend, args=(name,)) for name in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return won, refused


def test_racing_takeovers_of_one_stale_lease_have_one_winner(where):
    for trial in range(3):
        write_by_hand(where, stale(f"dead-{trial}", expires=time.time() - 1))
        won, refused = race(where, [f"run-{trial}-{i}" for i in range(3)])
        assert len(won) == 1 and len(refused) == 2, (won, refused)
        assert {e.holder.run_id for e in refused} == {won[0].run_id}
        assert read_lease(where[0], "fp1", where[1]).run_id == won[0].run_id
        won[0].release()


def test_renewal_pushes_the_expiry_ahead(where):
    uri, options = where
    with take(where, "run-r", ttl_s=1.0) as lease:
        first = read_lease(uri, "fp1", options).expires
        time.sleep(2.1)  # two ttls: unrenewed, the lease would have expired twice over
        assert lease.renewals >= 3
        assert read_lease(uri, "fp1", options).expires > first + 1.0
        with pytest.raises(LeaseHeld):
            take(where, "run-late", ttl_s=1.0)


def test_a_lease_taken_over_is_recorded_as_lost(tmp_path):
    where = (str(tmp_path / "out"), {})
    noticed: list = []
    slow = take(where, "run-slow", ttl_s=1.0, on_lost=noticed.append, log=lambda line: None)
    slow._stop.set()  # a driver stalled past its expiry: no renewals
    slow._thread.join()
    time.sleep(1.1)
    with take(where, "run-next", ttl_s=30, log=lambda line: None):
        assert slow.renew() is False
        assert slow.lost and slow.lost_to.run_id == "run-next" and noticed[0].run_id == "run-next"
        with pytest.raises(LeaseLost, match="run run-slow lost its lease on output .* to run run-next"):
            slow.check()
        slow.release()  # writes nothing: the lease is run-next's
        assert read_lease(where[0], "fp1").run_id == "run-next"


def test_a_lease_whose_process_is_gone_on_this_machine_is_free_at_once(tmp_path):
    where = (str(tmp_path / "out"), {})
    dead = subprocess.Popen(["true"])
    dead.wait()
    mine = stale("killed-run", pid=dead.pid, expires=time.time() + 600, machine=procinfo.machine_identity())
    write_by_hand(where, mine)
    logs: list[str] = []
    with take(where, "run-after", log=logs.append):
        pass
    assert f"whose process (pid {dead.pid}) is no longer running" in logs[0]
    # The same on another machine: its pid means nothing here, so only the expiry counts.
    elsewhere = (str(tmp_path / "out2"), {})
    write_by_hand(elsewhere, stale("remote-run", pid=dead.pid, expires=time.time() + 600, machine="other/pid:[1]"))
    with pytest.raises(LeaseHeld, match="run remote-run"):
        take(elsewhere, "run-after")


def test_s3_conditional_writes_are_used_and_a_store_ignoring_them_is_caught(s3_server, monkeypatch):
    uri = s3_server.uri(f"lease-{uuid.uuid4().hex}", "out")
    with acquire(uri, "fp1", s3_server.options(), "run-c", ttl_s=30) as lease:
        assert lease._store.conditional and lease._store.probed  # SeaweedFS answers 412
    # A store that drops If-None-Match / If-Match: found out on the first write, then write-and-read-back.
    import s3fs

    original = s3fs.S3FileSystem.call_s3

    def ignoring(self, method, *args, **kwargs):
        kwargs.pop("IfNoneMatch", None)
        kwargs.pop("IfMatch", None)
        return original(self, method, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "call_s3", ignoring)
    uri = s3_server.uri(f"lease-{uuid.uuid4().hex}", "out")
    with acquire(uri, "fp1", s3_server.options(), "run-d", ttl_s=30, settle_s=0.1) as lease:
        assert lease._store.conditional is False
        with pytest.raises(LeaseHeld):
            acquire(uri, "fp1", s3_server.options(), "run-e", ttl_s=30, settle_s=0.1)


def test_the_command_line_exits_busy_while_a_run_of_the_same_config_holds_the_output(tmp_path):
    from synthetic.corpus import write_corpus

    corpus, out = tmp_path / "corpus", tmp_path / "out"
    write_corpus(str(corpus), seed=5, n_images=2, n_videos=0)
    fingerprint = load_config(str(ROOT / "configs" / "demo.yaml"), [f"output.uri={out}"]).fingerprint()
    # A live holder: this test process, on this machine, its lease good for ten minutes.
    me = os.getpid()
    holder = stale("run-busy", pid=me, pid_start=procinfo.start_time(me), expires=time.time() + 600)
    write_by_hand((str(out), {}), dataclasses.replace(holder, machine=procinfo.machine_identity()), fingerprint)
    command = [sys.executable, "jobs/caption.py", "--config", "configs/demo.yaml", "--input", str(corpus)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [*command, "--output", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == cli.EXIT_BUSY, done.stderr
    assert done.stderr.splitlines() == [f"error: {LeaseHeld(str(out), holder)}"]  # before Ray, nothing else
    assert not list(out.glob("part-*"))
