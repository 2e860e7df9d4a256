"""pipeline.console: the fd-level filter drops the known Ray line only, whoever writes it."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = r"""
import os, sys
from pipeline.console import without_known_noise
noise = (b"[2026-12-02 18:53:43,066 E 10641 10641] core_worker.cc:2465: Actor with class name: "
         b"'MapWorker(MapBatches(InferenceStage))' and ID: '43b9' has constructor arguments in the object store "
         b"and max_restarts > 0. If the arguments ...\n")
os.write(2, b"before\n")
with without_known_noise():
    os.write(2, b"a real error\n" + noise)       # as C++ code writes: straight to fd 2
    print("a warning from python", file=sys.stderr)
    os.write(2, noise[:40])                       # a line arriving in two writes is still one line
    os.write(2, noise[40:] + b"no newline at the end")
os.write(2, b"\nafter\n" + noise)                 # outside the block nothing is filtered
"""


def test_only_the_known_line_is_dropped_and_order_is_kept():
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, timeout=60, env={"PYTHONPATH": str(ROOT)}
    )
    assert done.returncode == 0, done.stderr
    lines = done.stderr.decode().splitlines()
    assert lines[:5] == ["before", "a real error", "a warning from python", "no newline at the end", "after"]
    assert len(lines) == 6 and "core_worker.cc" in lines[5]
