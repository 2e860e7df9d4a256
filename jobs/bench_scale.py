"""Scale checks on one machine: a large corpus streamed from a local S3 server, and a local multi-node Ray cluster.

    python jobs/bench_scale.py corpus --videos 10000 --out reports/scale      # ~15 min on 2 cores
    python jobs/bench_scale.py nodes --videos 2000 --out reports/scale         # ~5 min

Entry point only: the job is ``evaluation.bench_scale.main`` (console script ``vlm-bench-scale``).
"""

import sys

from evaluation.bench_scale import main

if __name__ == "__main__":
    sys.exit(main())
