"""Answer the questions of a VideoQA annotation file and score them.

    python jobs/videoqa.py --config configs/shapes-qa.yaml [--input ANNOTATIONS] [--output URI] \\
        [--baseline URI] [--predictions FILE.jsonl] [key=value ...]

Entry point only: the job is ``pipeline.cli.videoqa_main`` (console script ``vlm-videoqa``).
"""

import sys

from pipeline.cli import videoqa_main

if __name__ == "__main__":
    sys.exit(videoqa_main())
