"""Where an engine batch's time goes, per item: preprocess, vision tower, pruning, prefill, generation.

    python jobs/engine_stages.py --kind video --items 64 --threads 2

Entry point only: the job is ``evaluation.engine_stages.main`` (console script ``vlm-engine-stages``).
"""

import sys

from evaluation.engine_stages import main

if __name__ == "__main__":
    sys.exit(main())
