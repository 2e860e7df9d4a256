"""Write a shapes-world corpus (images, videos, QA, captions) to a local dir or any fsspec URI.

    python jobs/make_corpus.py --out /tmp/shapes --seed 1 --images 500 --videos 100
    python jobs/make_corpus.py --out s3://bucket/shapes --images 100000 --videos 20000 \\
        --storage-options '{"anon": false}'

Entry point only: the job is ``synthetic.cli.main`` (console script ``vlm-make-corpus``).
"""

import sys

from synthetic.cli import main

if __name__ == "__main__":
    sys.exit(main())
