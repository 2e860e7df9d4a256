"""The driver's progress line, for runs where Ray Data's progress bars are off (no terminal).

``progress: 120/300 items (ok 118, error 2), 3.4 items/s, ETA 53 s``, printed every N seconds by
a :class:`ProgressReporter` while the driver adds up the per-part summaries. Items count when
their part is written, so the line moves in steps of ``output.rows_per_file`` at most; the timer
runs in its own thread so that a line still comes while the driver waits for a slow part (model
loading, a large part), which is when a user most wants to know the job is alive.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable


def format_duration(seconds: float) -> str:
    """A short duration: ``53 s``, ``4 min 10 s``, ``2 h 05 min``."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def format_rate(rate: float) -> str:
    """Items per second, to about two significant digits: ``0.28``, ``3.4``, ``150``."""
    if rate >= 100:
        return f"{rate:.0f}"
    return f"{rate:.1f}" if rate >= 1 else f"{rate:.2f}"


def progress_line(done: int, total: int, ok: int, errors: int, elapsed_s: float) -> str:
    """One progress line; the rate is the average since the start, the ETA what is left at that rate."""
    rate = done / elapsed_s if elapsed_s > 0 else 0.0
    if done >= total:
        eta = "0 s"
    elif rate > 0:
        eta = format_duration((total - done) / rate)
    else:
        eta = "n/a"  # nothing finished yet: no rate to extrapolate from
    return f"progress: {done}/{total} items (ok {ok}, error {errors}), {format_rate(rate)} items/s, ETA {eta}"


class ProgressReporter:
    """Counts finished items and emits :func:`progress_line` every ``interval_s`` seconds.

    Use as a context manager around the loop that calls :meth:`add`; with ``interval_s`` None it
    counts but never prints. ``emit`` receives each line (``print`` by default).
    """

    def __init__(
        self,
        total: int,
        interval_s: float | None,
        emit: Callable[[str], object] = print,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.total = total
        self.interval_s = interval_s
        self.emit = emit
        self.clock = clock
        self.ok = 0
        self.errors = 0
        self.start = clock()
        self._lock = threading.Lock()  # add() runs on the driver's loop, line() on the timer thread
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, ok: int, errors: int) -> None:
        """Record one written part's items."""
        with self._lock:
            self.ok += ok
            self.errors += errors

    def line(self) -> str:
        with self._lock:
            ok, errors = self.ok, self.errors
        return progress_line(ok + errors, self.total, ok, errors, self.clock() - self.start)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.emit(self.line())
            # Piped or redirected, stdout is block-buffered: unflushed, the lines would all appear at exit.
            sys.stdout.flush()

    def __enter__(self) -> ProgressReporter:
        self.start = self.clock()
        if self.interval_s is not None:
            self._thread = threading.Thread(target=self._run, name="progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
