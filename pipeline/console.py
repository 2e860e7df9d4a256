"""Known third-party noise kept off the driver's console, at the file-descriptor level.

One line cannot be silenced by any logging setting: Ray core's C++ ``core_worker`` logs, at ERROR,
"Actor with class name: 'MapWorker(MapBatches(InferenceStage))' ... has constructor arguments in
the object store and max_restarts > 0" when Ray Data creates its actor pool. Ray Data passes its
own object refs (its DataContext and map transformer, ``ray.put`` by Ray Data) to every pool actor
and holds them for the whole run, so restarts work (tested by killing the actor); the line is a
false alarm (ray-project/ray#53727, #57733). Lowering Ray's C++ log level would hide real errors.

So, while the plan runs, the driver's fd 2 goes through a pipe that drops lines matching
``NOISE`` and passes everything else on at once. It is installed after ``ray.init`` (the cluster
processes a local run starts keep the real stderr) and removed before the driver goes on.
"""

from __future__ import annotations

import os
import re
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

NOISE = (
    re.compile(rb"core_worker\.cc:\d+: Actor with class name: '[^']*MapWorker[^']*' .*has constructor arguments "),
)


def is_noise(line: bytes) -> bool:
    return any(pattern.search(line) for pattern in NOISE)


@contextmanager
def without_known_noise() -> Iterator[None]:
    """Within the block, lines written to fd 2 that match ``NOISE`` are dropped; the rest pass."""
    try:
        sys.stderr.flush()
        original = os.dup(2)
    except (OSError, ValueError):  # no usable fd 2 (a closed or replaced stderr): nothing to filter
        yield
        return
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    pump = threading.Thread(target=_pump, args=(read_end, original), name="stderr-filter", daemon=True)
    pump.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(original, 2)  # the pipe's last write end closes: the pump reads EOF and ends
        pump.join(timeout=5)
        os.close(original)


def _pump(read_end: int, target: int) -> None:
    """Copy the pipe to ``target`` line by line, minus noise. Keeps draining even if ``target``
    fails (a closed terminal), so writers to fd 2 never block on a full pipe."""
    pending = b""
    with os.fdopen(read_end, "rb", buffering=0) as pipe:
        while chunk := pipe.read(65536):
            pending += chunk
            *lines, pending = pending.split(b"\n")
            target = _write_all(target, b"".join(line + b"\n" for line in lines if not is_noise(line)))
    if pending and not is_noise(pending):
        _write_all(target, pending)


def _write_all(fd: int, data: bytes) -> int:
    """Write all of ``data``; returns ``fd``, or -1 once writing failed (later data is dropped)."""
    try:
        while data and fd >= 0:
            data = data[os.write(fd, data) :]
    except OSError:
        return -1
    return fd
