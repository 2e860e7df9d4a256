"""Quality table: QA accuracy and RelAcc of each pruning method at 1/3, 2/9 and 1/9 of the visual tokens.

    python jobs/eval_quality.py --model models/shapes-llava --seed 2026 --out reports/quality
    # recompute only some methods and merge their rows into the stored quality.json
    python jobs/eval_quality.py --model models/shapes-llava --seed 2026 --out reports/quality \\
        --methods ttp --merge

Entry point only: the job is ``evaluation.quality.main`` (console script ``vlm-eval-quality``).
"""

import sys

from evaluation.quality import main

if __name__ == "__main__":
    sys.exit(main())
