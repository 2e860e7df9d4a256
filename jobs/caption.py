"""Caption images and videos, or answer questions about them, into Parquet.

    python jobs/caption.py --config configs/demo.yaml [--input URI] [--output URI] [key=value ...]
    ray job submit --working-dir . -- python jobs/caption.py --config configs/X.yaml ...

Entry point only: the job is ``pipeline.cli.caption_main`` (console script ``vlm-caption``).
"""

import sys

from pipeline.cli import caption_main

if __name__ == "__main__":
    sys.exit(caption_main())
