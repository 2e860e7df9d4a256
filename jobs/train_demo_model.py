"""Train the demo VLM on the shapes world and write a Hugging Face checkpoint.

    python jobs/train_demo_model.py --out models/shapes-llava          # the committed model (~25 min on 2 cores)
    python jobs/train_demo_model.py --out /tmp/m --quick               # a few steps, for tests

Entry point only: the job is ``training.demo_cli.main`` (console script ``vlm-train-demo``).
"""

import sys

from training.demo_cli import main

if __name__ == "__main__":
    sys.exit(main())
