"""Measuring a local run: peak resident memory of a process tree, sampled from /proc (Linux)."""

from __future__ import annotations

import os
import threading
import time


class PeakMemory:
    """Peak summed RSS of this process and all its descendants (the local Ray cluster: GCS, raylet,
    workers, actors), sampled from /proc every `interval` seconds. Linux only; 0 elsewhere."""

    def __init__(self, interval: float = 0.2, exclude: tuple[int, ...] = ()):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self.exclude = exclude  # subtrees left out (e.g. a local S3 server started by the same driver)
        self.samples: list[tuple[float, int]] = []  # (monotonic seconds, bytes)
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = tree_rss(os.getpid(), self.exclude)
            self.samples.append((time.monotonic(), rss))
            self.peak = max(self.peak, rss)
            self._stop.wait(self.interval)


def tree_rss(root: int, exclude: tuple[int, ...] = ()) -> int:
    """Bytes of resident memory of `root` and its descendants, less the subtrees of `exclude` (Linux /proc)."""
    parents: dict[int, int] = {}
    rss: dict[int, int] = {}
    page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/statm") as f:
                rss[int(entry)] = int(f.read().split()[1]) * page
            parents[int(entry)] = int(fields[1])
        except (OSError, IndexError, ValueError):
            continue  # the process ended while we looked
    total, stack = 0, [root]
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    while stack:
        pid = stack.pop()
        if pid in exclude:
            continue
        total += rss.get(pid, 0)
        stack.extend(children.get(pid, []))
    return total
