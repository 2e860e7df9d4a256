"""The driver's progress line (pipeline.progress): formatting, and the timer that prints it."""

from __future__ import annotations

import time

from pipeline.progress import ProgressReporter, format_duration, progress_line


def test_progress_line_reads_as_documented():
    line = progress_line(done=120, total=300, ok=118, errors=2, elapsed_s=120 / 3.4)
    assert line == "progress: 120/300 items (ok 118, error 2), 3.4 items/s, ETA 53 s"


def test_progress_line_before_anything_finished_and_at_the_end():
    assert progress_line(0, 6, 0, 0, 10.0) == "progress: 0/6 items (ok 0, error 0), 0.00 items/s, ETA n/a"
    assert progress_line(6, 6, 5, 1, 20.0) == "progress: 6/6 items (ok 5, error 1), 0.30 items/s, ETA 0 s"
    assert progress_line(0, 6, 0, 0, 0.0).endswith("0.00 items/s, ETA n/a")  # no division by zero


def test_durations_and_rates():
    assert [format_duration(s) for s in (0, 59.4, 60, 250, 3600, 7500)] == [
        "0 s",
        "59 s",
        "1 min 0 s",
        "4 min 10 s",
        "1 h 00 min",
        "2 h 05 min",
    ]
    assert progress_line(1500, 3000, 1500, 0, 10.0).split(", ")[2] == "150 items/s"


class FakeClock:
    """Time that moves only when the test moves it."""

    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_reporter_counts_parts_and_prints_on_its_timer():
    clock = FakeClock()
    lines: list[str] = []
    expected = "progress: 4/10 items (ok 3, error 1), 2.0 items/s, ETA 3 s"
    with ProgressReporter(10, interval_s=0.01, emit=lines.append, clock=clock) as progress:
        progress.add(3, 1)
        clock.now += 2.0
        deadline = time.monotonic() + 5
        while expected not in lines and time.monotonic() < deadline:
            time.sleep(0.01)
    assert expected in lines
    count = len(lines)
    time.sleep(0.05)
    assert len(lines) == count  # the timer stopped with the block


def test_reporter_without_interval_counts_but_never_prints():
    lines: list[str] = []
    with ProgressReporter(2, interval_s=None, emit=lines.append) as progress:
        progress.add(2, 0)
        assert progress.line().startswith("progress: 2/2 items (ok 2, error 0)")
    assert lines == []
