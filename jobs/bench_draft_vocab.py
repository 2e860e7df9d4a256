"""Draft step cost against the twig's draft vocabulary size N, on a SmolLM2-135M-shaped model (random
weights, fp32): draft step time / base step time at each batch size, printed as a table.

    python jobs/bench_draft_vocab.py [--batch 1 8] [--sizes 1024 2048 4096 8192 16384 0] [--json FILE]

Entry point only: the job is ``evaluation.bench_draft_vocab.main`` (console script ``vlm-bench-draft-vocab``).
"""

import sys

from evaluation.bench_draft_vocab import main

if __name__ == "__main__":
    sys.exit(main())
