"""What the demo model's vision tower encodes about each object: linear probes on its patch features.

    python jobs/probe_tower.py --model models/shapes-llava

Entry point only: the job is ``evaluation.probe_tower.main`` (console script ``vlm-probe-tower``).
"""

import sys

from evaluation.probe_tower import main

if __name__ == "__main__":
    sys.exit(main())
