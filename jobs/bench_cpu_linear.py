"""A forward of W new tokens on a SmolLM2-135M-shaped model, PyTorch's own linear against oneDNN-packed
(``compute.cpu_linear``), side by side: ms per width, their ratio, and each kernel's W-token cost
relative to its one-token step.

    python jobs/bench_cpu_linear.py [--widths 1 2 3 4 6] [--context 200] [--repeats 15] [--json FILE]

Entry point only: the job is ``evaluation.bench_cpu_linear.main`` (console script ``vlm-bench-cpu-linear``).
"""

import sys

from evaluation.bench_cpu_linear import main

if __name__ == "__main__":
    sys.exit(main())
