"""Process facts from Linux's /proc, no dependencies: start times (to tell a live process from a
reused pid), parents, environments, and which pid namespace this process sees.

Every function answers None / empty where /proc is missing (macOS) or a process is gone or not
ours to read; callers then treat the process as unknown and leave it alone.
"""

from __future__ import annotations

import os


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/<pid>/stat from field 3 (state) on; the command name before it may hold spaces and ')'."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read().decode(errors="replace")
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()


def start_time(pid: int) -> int | None:
    """When ``pid`` started, in clock ticks since boot (field 22); None when it does not exist.

    (pid, start time) names one process for the life of the machine: a pid reused later has a later start.
    A zombie (exited, not yet reaped) counts as gone.
    """
    fields = _stat_fields(pid)
    if fields is None or fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def parent(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return None if fields is None else int(fields[1])


def alive(pid: int, start: int | None) -> bool:
    """Whether the process ``pid`` that started at ``start`` still runs (not a later one with its pid)."""
    now = start_time(pid)
    return now is not None and (start is None or now == start)


def owned_by_me(pid: int) -> bool:
    try:
        return os.stat(f"/proc/{pid}").st_uid == os.getuid()
    except OSError:
        return False


def all_pids() -> list[int]:
    try:
        return [int(name) for name in os.listdir("/proc") if name.isdigit()]
    except OSError:
        return []


def children_map() -> dict[int, list[int]]:
    """parent pid -> child pids, for every process visible now."""
    children: dict[int, list[int]] = {}
    for pid in all_pids():
        ppid = parent(pid)
        if ppid is not None:
            children.setdefault(ppid, []).append(pid)
    return children


def descendants(pids: list[int], children: dict[int, list[int]] | None = None) -> list[int]:
    """Every process below ``pids`` (children, their children, ...), not ``pids`` themselves."""
    children = children_map() if children is None else children
    found: list[int] = []
    stack = list(pids)
    seen = set(pids)
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in seen:
                seen.add(child)
                found.append(child)
                stack.append(child)
    return found


def environment(pid: int) -> dict[str, str]:
    """A process's environment as it was started; empty if unreadable (another user's, gone)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            raw = f.read()
    except OSError:
        return {}
    pairs = (item.decode(errors="replace").partition("=") for item in raw.split(b"\0") if item)
    return {key: value for key, _, value in pairs}


def machine_identity() -> str | None:
    """Boot id and pid namespace: two processes with the same identity see the same pids, so one may
    judge whether the other's pid is alive. None off Linux.

    The hostname alone is not enough: containers on one kernel may share a hostname and see
    different pids; a reboot reuses every pid.
    """
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        return f"{boot}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return None
