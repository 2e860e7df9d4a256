"""End-to-end throughput of the pipeline (read, decode, infer, write) for each pruning/decoding setup.

    python jobs/benchmark.py --out reports/benchmark              # demo model, CPU, ~15 min
    python jobs/benchmark.py --images 8 --videos 8 --setups none vispruner-1/9   # a quick look

Entry point only: the job is ``evaluation.benchmark.main`` (console script ``vlm-benchmark``).
"""

import sys

from evaluation.benchmark import main

if __name__ == "__main__":
    sys.exit(main())
