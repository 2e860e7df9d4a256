"""TwigVLM benchmark on this machine: tokens/s of plain greedy decoding against self-speculative
decoding (SSD), alone and with twig-guided pruning (TTP) or VisPruner, on long captions.

    python jobs/bench_ssd.py [--model models/shapes-llava] [--twig models/shapes-llava/twig] \\
        [--seed 555] [--items 16] [--batch 1 8] [--budget 21] [--max-new-tokens 160] [--out FILE.json]

Entry point only: the job is ``evaluation.bench_ssd.main`` (console script ``vlm-bench-ssd``).
"""

import sys

from evaluation.bench_ssd import main

if __name__ == "__main__":
    sys.exit(main())
