"""Engine demo: the shipped demo model on a few generated shapes-world images and videos.

    python jobs/demo_engine.py [--model models/shapes-llava] [--out demo_out] [--seed 4242]

Entry point only: the job is ``evaluation.demo_engine.main`` (console script ``vlm-demo-engine``).
"""

import sys

from evaluation.demo_engine import main

if __name__ == "__main__":
    sys.exit(main())
