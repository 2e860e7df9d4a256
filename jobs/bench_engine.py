"""Engine benchmark: prefill time, FLOPs and KV-cache size of `none` against pruning methods.

    python jobs/bench_engine.py                       # CPU preset (reduced widths, see --help)
    python jobs/bench_engine.py --preset llava-1.5-7b --device cuda --dtype bfloat16

Entry point only: the job is ``evaluation.bench_engine.main`` (console script ``vlm-bench-engine``).
"""

import sys

from evaluation.bench_engine import main

if __name__ == "__main__":
    sys.exit(main())
