"""Clean shutdown of the local Ray cluster a run starts for itself, and of what a killed run left.

A driver that starts its own cluster (``ray.init(address="local")``) owns its processes: GCS,
raylet, dashboard, monitors, and below the raylet the agents (DashboardAgent, RuntimeEnvAgent) and
the workers. Killed with SIGKILL (or timed out) it cannot stop them, and some outlive it. So:

* :func:`after_init` records them, once Ray is up, in ``<sessions dir>/<host>-<driver pid>.json``
  (``$VLM_RAY_SESSIONS_DIR``, default ``~/.cache/vlm-batch/ray-sessions``): the driver's pid and
  start time, and each process's pid and start time (from /proc, so a reused pid is never mistaken
  for it). It also re-installs this module's signal handlers, which ``ray.init`` replaces.
* :func:`cleanup_leftovers`, at the next run's start, stops (SIGTERM, then SIGKILL) what is left
  of every recorded cluster whose driver is gone: the recorded processes, their descendants, and
  the raylet's orphans (processes whose environment names that raylet: ``RAY_RAYLET_PID``).
* :func:`shutdown_started_cluster`, in the driver's ``finally`` (and at exit), shuts the cluster
  down, stops any straggler and removes the record.
* :func:`install_signal_handlers` turns SIGTERM / SIGINT into :class:`Interrupted` (a
  KeyboardInterrupt), so ``ray job stop``, ``kill`` and ``timeout`` take the same way out as Ctrl-C.

A cluster the job only joined (``RAY_ADDRESS``, ``ray.address``, one ``ray start`` left running)
is never recorded and never touched. Linux only (/proc); elsewhere nothing is recorded or killed.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from pipeline import procinfo

GRACE_S = 5.0  # SIGTERM, then this long to exit before SIGKILL


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGINT, as an exception, so that ``finally`` blocks and the CLI's interrupted path run."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum

    @property
    def exit_status(self) -> int:
        """The shell's convention for death by a signal: 130 for SIGINT, 143 for SIGTERM."""
        return 128 + self.signum

    def __str__(self) -> str:
        return signal.Signals(self.signum).name


def sessions_dir() -> Path:
    return Path(os.environ.get("VLM_RAY_SESSIONS_DIR") or Path.home() / ".cache" / "vlm-batch" / "ray-sessions")


# --- signals

_our_signals: tuple[int, ...] = ()
_previous: dict[int, object] = {}
_stopping = False


def _on_signal(signum: int, frame) -> None:
    global _stopping
    if _stopping:
        # A second signal while the first one's cleanup runs: the user insists. Die the default way;
        # whatever Ray processes remain, the next run's cleanup_leftovers stops.
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    _stopping = True
    raise Interrupted(signum)


def install_signal_handlers(signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> Callable[[], None]:
    """Raise :class:`Interrupted` in the main thread on the first of ``signals``; returns a function
    that puts the previous handlers back. Off the main thread (where Python cannot set handlers)
    nothing is installed. ``ray.init`` sets its own SIGTERM handler: :func:`after_init` re-installs ours.
    """
    global _our_signals, _stopping
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    _stopping = False
    for signum in signals:
        previous = signal.signal(signum, _on_signal)
        _previous.setdefault(signum, previous)
    _our_signals = tuple(signals)
    return restore_signal_handlers


def restore_signal_handlers() -> None:
    global _our_signals
    if threading.current_thread() is not threading.main_thread():
        return
    for signum, previous in _previous.items():
        signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
    _previous.clear()
    _our_signals = ()


# --- the record of a cluster this process started

_record_path: Path | None = None  # set once this process has recorded a cluster it started


def after_init(started_local: bool, directory: Path | None = None) -> Path | None:
    """Call right after ``ray.init``: records the cluster when this process started it
    (``started_local``: the address was ``"local"``), and puts back this module's signal handlers,
    which ``ray.init`` replaced with its own SIGTERM handler. Returns the record's path, if any."""
    path = record_started_cluster(directory) if started_local else None
    if _our_signals:
        install_signal_handlers(_our_signals)
    return path


def _process(pid: int, name: str) -> dict | None:
    start = procinfo.start_time(pid)
    return None if start is None else {"pid": pid, "start": start, "name": name}


def record_started_cluster(directory: Path | None = None) -> Path | None:
    """Record the processes of the Ray cluster this process started (see the module docstring).

    Call only for a cluster this driver started itself; ``ray.init`` must have run. Returns the
    record's path (None off Linux or without a Ray node in this process). Written again on each
    call, so a later call also catches workers started since.
    """
    global _record_path
    import ray

    node = getattr(ray._private.worker, "_global_node", None)
    me = procinfo.start_time(os.getpid())
    if node is None or me is None:
        return None
    processes, raylet = [], None
    for kind, infos in node.all_processes.items():
        for info in infos:
            entry = _process(info.process.pid, kind)
            if entry:
                processes.append(entry)
                if kind == "raylet":
                    raylet = entry
    below = procinfo.descendants([p["pid"] for p in processes])
    processes += [p for p in (_process(pid, "descendant") for pid in below) if p]
    record = {
        "version": 1,
        "host": socket.gethostname(),
        "machine": procinfo.machine_identity(),
        "driver": {"pid": os.getpid(), "start": me, "argv": sys.argv[:4]},
        "session_dir": node.get_session_dir_path(),
        "node_id": node.node_id,
        "raylet": raylet,
        "processes": processes,
        "recorded": time.time(),
    }
    directory = Path(directory) if directory else sessions_dir()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{socket.gethostname()}-{os.getpid()}.json"
    tmp = directory / f".{path.name}.{uuid.uuid4().hex}.tmp"
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, path)  # a reader never sees half a record
    if _record_path is None:
        atexit.register(_at_exit)
    _record_path = path
    return path


def _at_exit() -> None:
    try:
        shutdown_started_cluster(log=None)
    except Exception:  # noqa: BLE001, S110 - at exit there is no one left to tell; the next run cleans up
        pass


def shutdown_started_cluster(grace_s: float = GRACE_S, log: Callable[[str], None] | None = print) -> int:
    """Shut down the cluster this process started (``ray.shutdown()``), stop any of its processes
    still running after that, and remove the record. Returns how many had to be stopped by signal.
    A cluster this process only joined is left alone: nothing is done."""
    global _record_path
    path = _record_path
    if path is None:
        return 0
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
    record = _load(path)
    stopped = 0
    if record is not None:
        # ray.shutdown() stops the node's processes; the agents and workers follow their raylet
        # within a moment. Only what is still there after that is signalled.
        targets = _wait_gone(_targets(record), min(2.0, grace_s))
        stopped = _terminate(targets, grace_s)
        if stopped and log is not None:
            log(f"stopped {stopped} Ray processes that outlived ray.shutdown()")
    _remove(path)
    _record_path = None
    return stopped


# --- cleaning up after a driver that died


def cleanup_leftovers(
    directory: Path | None = None, grace_s: float = GRACE_S, log: Callable[[str], None] | None = print
) -> int:
    """Stop what is left of every recorded cluster whose driver is gone; remove those records.

    A record whose driver still runs (another run on this machine) is left alone, as is one made on
    another machine (a home folder shared over NFS). One ``log`` line per earlier run that left
    processes behind; returns how many processes were stopped in all.
    """
    directory = Path(directory) if directory else sessions_dir()
    try:
        paths = sorted(directory.glob("*.json"))
    except OSError:
        return 0
    here, machine = socket.gethostname(), procinfo.machine_identity()
    total = 0
    for path in paths:
        record = _load(path)
        if record is None:
            continue
        if record.get("host") != here:
            continue  # another machine's: its pids mean nothing here
        if record.get("machine") != machine:
            if machine and str(record.get("machine", "")).split("/")[0] != machine.split("/")[0]:
                _remove(path)  # this machine rebooted since: every process of the record is long gone
            continue  # another pid namespace (a container with our hostname): not ours to judge
        driver = record["driver"]
        if procinfo.alive(driver["pid"], driver["start"]):
            continue
        stopped = _terminate(_targets(record), grace_s)
        _remove(path)
        if stopped and log is not None:
            log(f"cleaned up {stopped} Ray processes left by an earlier run (pid {driver['pid']})")
        total += stopped
    return total


def _targets(record: dict) -> list[tuple[int, int]]:
    """(pid, start time) of every live process of the record's cluster: the recorded ones still
    running as themselves, their descendants, and the orphans of its raylet."""
    me = os.getpid()
    spared = {me, *_ancestors(me)}
    found: dict[int, int] = {}
    for entry in record.get("processes", []):
        if procinfo.alive(entry["pid"], entry["start"]):
            found[entry["pid"]] = entry["start"]
    for pid in procinfo.descendants(list(found)):
        start = procinfo.start_time(pid)
        if start is not None:
            found[pid] = start
    raylet = record.get("raylet")
    if raylet:
        for pid, start in _raylet_orphans(raylet, record.get("node_id")):
            found.setdefault(pid, start)
    return [(pid, start) for pid, start in found.items() if pid not in spared and procinfo.owned_by_me(pid)]


def _raylet_orphans(raylet: dict, node_id: str | None) -> list[tuple[int, int]]:
    """Agents and workers of a raylet, found by the ``RAY_RAYLET_PID`` Ray puts in their environment:
    once their raylet is dead they are nobody's descendants.

    A process counts only if it started after that raylet, carries its node id when it carries one,
    and the raylet's pid has not been taken since by a process that started before it.
    """
    pid, start = raylet["pid"], raylet["start"]
    now_at_pid = procinfo.start_time(pid)
    found = []
    for candidate in procinfo.all_pids():
        if not procinfo.owned_by_me(candidate):
            continue
        env = procinfo.environment(candidate)
        if env.get("RAY_RAYLET_PID") != str(pid):
            continue
        began = procinfo.start_time(candidate)
        if began is None or began < start:
            continue
        if node_id and env.get("RAY_NODE_ID") not in (None, node_id):
            continue
        if now_at_pid is not None and now_at_pid != start and began >= now_at_pid:
            continue  # a worker of a newer raylet that reuses the pid
        found.append((candidate, began))
    return found


def _ancestors(pid: int) -> list[int]:
    chain = []
    while pid > 1:
        parent = procinfo.parent(pid)
        if parent is None or parent in chain:
            break
        chain.append(parent)
        pid = parent
    return chain


def _wait_gone(targets: list[tuple[int, int]], seconds: float) -> list[tuple[int, int]]:
    """The ``targets`` still alive after up to ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        alive = [(pid, start) for pid, start in targets if procinfo.alive(pid, start)]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.1)


def _signal(targets: list[tuple[int, int]], signum: int) -> None:
    for pid, start in targets:
        if procinfo.alive(pid, start):  # checked right before: a pid reused since is not ours
            try:
                os.kill(pid, signum)
            except (ProcessLookupError, PermissionError):
                pass


def _terminate(targets: list[tuple[int, int]], grace_s: float) -> int:
    """SIGTERM ``targets``, SIGKILL those alive after ``grace_s``; returns how many were alive."""
    targets = [(pid, start) for pid, start in targets if procinfo.alive(pid, start)]
    if not targets:
        return 0
    _signal(targets, signal.SIGTERM)
    left = _wait_gone(targets, grace_s)
    if left:
        _signal(left, signal.SIGKILL)
        _wait_gone(left, 5.0)
    return len(targets)


def _load(path: Path) -> dict | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and "driver" in record else None


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
