"""pipeline.cluster: what a killed driver's Ray cluster leaves is stopped by the next run, and only that;
SIGTERM / SIGINT take the CLI's interrupted path."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pipeline import cli, cluster, procinfo

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")

ROOT = Path(__file__).resolve().parents[1]


def sleeper(*extra: str) -> subprocess.Popen:
    return subprocess.Popen(["sleep", "300", *extra])


def entry(proc_or_pid, name: str = "dummy", start_shift: int = 0) -> dict:
    pid = getattr(proc_or_pid, "pid", proc_or_pid)
    return {"pid": pid, "start": procinfo.start_time(pid) + start_shift, "name": name}


def write_record(directory: Path, driver, processes: list[dict], **changes) -> Path:
    record = {
        "version": 1,
        "host": socket.gethostname(),
        "machine": procinfo.machine_identity(),
        "driver": {"pid": driver.pid, "start": procinfo.start_time(driver.pid)},
        "session_dir": "/nowhere",
        "node_id": None,
        "raylet": None,
        "processes": processes,
    } | changes
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{socket.gethostname()}-{driver.pid}.json"
    path.write_text(json.dumps(record))
    return path


def kill_driver(driver: subprocess.Popen) -> None:
    driver.send_signal(signal.SIGKILL)
    driver.wait()


def reap(*procs: subprocess.Popen) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()


def test_a_dead_drivers_processes_and_their_descendants_are_stopped(tmp_path):
    driver, a, b = sleeper(), sleeper(), sleeper()
    parent = subprocess.Popen(["sh", "-c", "sleep 300 & wait"])  # its child is recorded nowhere
    time.sleep(0.2)
    (child,) = procinfo.descendants([parent.pid])
    path = write_record(tmp_path, driver, [entry(a), entry(b), entry(parent)])
    kill_driver(driver)
    logs: list[str] = []
    try:
        assert cluster.cleanup_leftovers(tmp_path, grace_s=2, log=logs.append) == 4
        for p in (a, b, parent):
            assert p.wait(timeout=5) is not None
        assert procinfo.start_time(child) is None
        assert not path.exists()
        assert logs == [f"cleaned up 4 Ray processes left by an earlier run (pid {driver.pid})"]
    finally:
        reap(a, b, parent)


def test_a_live_drivers_record_and_processes_are_left_alone(tmp_path):
    driver, a = sleeper(), sleeper()
    path = write_record(tmp_path, driver, [entry(a)])
    other_host = write_record(tmp_path / "shared", sleeper(), [entry(a)], host="another-host")
    try:
        assert cluster.cleanup_leftovers(tmp_path, grace_s=1, log=None) == 0
        assert path.exists() and a.poll() is None
        # another machine's record (a home folder shared over NFS): its pids are not this machine's
        record = json.loads(other_host.read_text())
        os.kill(record["driver"]["pid"], signal.SIGKILL)
        time.sleep(0.2)
        assert cluster.cleanup_leftovers(tmp_path / "shared", grace_s=1, log=None) == 0
        assert other_host.exists() and a.poll() is None
    finally:
        reap(driver, a)
        try:
            os.waitpid(json.loads(other_host.read_text())["driver"]["pid"], 0)
        except ChildProcessError:
            pass


def test_a_reused_pid_is_not_killed(tmp_path):
    driver, bystander = sleeper(), sleeper()
    # The record names the bystander's pid with another start time: the process it named is gone and
    # the pid now belongs to someone else.
    path = write_record(tmp_path, driver, [entry(bystander, start_shift=-5)])
    kill_driver(driver)
    try:
        assert cluster.cleanup_leftovers(tmp_path, grace_s=1, log=None) == 0
        assert bystander.poll() is None
        assert not path.exists()
    finally:
        reap(bystander)


def test_orphans_of_a_dead_raylet_are_found_by_their_environment(tmp_path):
    raylet = subprocess.Popen(["true"])  # died with the driver
    raylet.wait()
    env = dict(os.environ, RAY_RAYLET_PID=str(raylet.pid))
    before = subprocess.Popen(["sleep", "300"], env=env)  # names that pid, but started before the raylet
    time.sleep(0.05)  # start times count in clock ticks (10 ms)
    orphan = subprocess.Popen(["sleep", "300"], env=env)  # a worker whose raylet died: nobody's descendant
    driver = sleeper()
    raylet_entry = {"pid": raylet.pid, "start": procinfo.start_time(before.pid) + 1, "name": "raylet"}
    path = write_record(tmp_path, driver, [raylet_entry], raylet=raylet_entry)
    kill_driver(driver)
    try:
        assert cluster.cleanup_leftovers(tmp_path, grace_s=1, log=None) == 1
        assert orphan.wait(timeout=5) is not None
        assert before.poll() is None
        assert not path.exists()
    finally:
        reap(orphan, before)


def test_shutdown_stops_stragglers_and_removes_the_record(tmp_path, monkeypatch):
    me = subprocess.Popen(["true"])  # stands in for the record's driver; this process is the one shutting down
    me.wait()
    straggler = sleeper()
    path = write_record(tmp_path, me, [entry(straggler)])
    monkeypatch.setattr(cluster, "_record_path", path)
    monkeypatch.delitem(sys.modules, "ray", raising=False)  # no Ray to shut down here
    logs: list[str] = []
    try:
        assert cluster.shutdown_started_cluster(grace_s=0.5, log=logs.append) == 1
        assert straggler.wait(timeout=5) is not None
        assert not path.exists() and cluster._record_path is None
        assert logs == ["stopped 1 Ray processes that outlived ray.shutdown()"]
        assert cluster.shutdown_started_cluster() == 0  # nothing recorded (a joined cluster): nothing done
    finally:
        reap(straggler)


RAY_CHILD = textwrap.dedent(
    """
    import signal, time
    import ray
    from pipeline import cluster

    cluster.install_signal_handlers()
    ray.init(address="local", num_cpus=1, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    path = cluster.after_init(True)
    print(path, signal.getsignal(signal.SIGTERM) is cluster._on_signal, flush=True)
    time.sleep(300)
    """
)


@pytest.mark.timeout(90)
def test_a_sigkilled_drivers_ray_cluster_is_cleaned_up_by_the_next_run(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(
        VLM_RAY_SESSIONS_DIR=str(tmp_path / "sessions"),
        PYTHONPATH=str(ROOT),
        RAY_USAGE_STATS_ENABLED="0",
        RAY_AUTH_MODE="disabled",
    )
    child = subprocess.Popen([sys.executable, "-c", RAY_CHILD], stdout=subprocess.PIPE, text=True, env=env)
    try:
        path, ours = child.stdout.readline().split()
        assert ours == "True"  # ray.init's own SIGTERM handler replaced by ours again
        path = Path(path)
        processes = json.loads(path.read_text())["processes"]
        assert {"gcs_server", "raylet", "descendant"} <= {p["name"] for p in processes}  # agents, a worker
        child.send_signal(signal.SIGKILL)
        child.wait()
        logs: list[str] = []
        cluster.cleanup_leftovers(path.parent, grace_s=1, log=logs.append)
        assert not path.exists()
        alive = [p for p in processes if procinfo.alive(p["pid"], p["start"])]
        assert alive == [], f"still running: {alive}; {logs}"
    finally:
        reap(child)


SIGNAL_CHILD = textwrap.dedent(
    """
    import time
    from pipeline import cli, cluster

    def job():
        cluster.install_signal_handlers()
        try:
            print("ready", flush=True)
            time.sleep(30)
        finally:
            print("finally ran", flush=True)
        return 0

    raise SystemExit(cli.guarded(job))
    """
)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_sigint_take_the_interrupted_path(signum):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    child = subprocess.Popen(
        [sys.executable, "-c", SIGNAL_CHILD], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        assert child.stdout.readline().strip() == "ready"
        child.send_signal(signum)
        out, err = child.communicate(timeout=20)
    finally:
        reap(child)
    assert "finally ran" in out
    assert re.search(r"^error: interrupted( by SIGTERM)?; parts already written are kept", err, re.M), err
    # Today's CLI answers every KeyboardInterrupt with 130; wired as proposed, SIGTERM gives 143.
    expected = getattr(cli, "EXIT_TERMINATED", cli.EXIT_INTERRUPTED) if signum == signal.SIGTERM else 130
    assert child.returncode == expected
    assert cluster.Interrupted(signum).exit_status == 128 + signum
