"""Write a shapes-world corpus (images, videos, QA, captions) to a local dir or any fsspec URI.

    python jobs/make_corpus.py --out /tmp/shapes --seed 1 --images 500 --videos 100
    python jobs/make_corpus.py --out s3://bucket/shapes --images 100000 --videos 20000 \\
        --storage-options '{"anon": false}'

Progress goes to stderr every --progress-every items; the summary (counts, bytes, seconds, paths) is
printed to stdout as JSON, after a one-line human summary on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from synthetic.corpus import write_corpus
from synthetic.world import WorldConfig


def make_corpus(argv: list[str] | None = None) -> dict:
    defaults = WorldConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="local dir or fsspec URI (s3://..., memory://...)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--images", type=int, default=1000, help="number of image items")
    parser.add_argument("--videos", type=int, default=200, help="number of video items")
    parser.add_argument("--image-size", type=int, default=defaults.image_size)
    parser.add_argument("--min-frames", type=int, default=defaults.video_frames[0])
    parser.add_argument("--max-frames", type=int, default=defaults.video_frames[1])
    parser.add_argument("--fps", type=int, default=defaults.fps)
    parser.add_argument("--min-objects", type=int, default=defaults.min_objects)
    parser.add_argument("--max-objects", type=int, default=defaults.max_objects)
    parser.add_argument("--progress-every", type=int, default=500, help="items between progress lines")
    parser.add_argument("--storage-options", type=json.loads, default=None, help="JSON dict for fsspec")
    args = parser.parse_args(argv)

    config = WorldConfig(
        image_size=args.image_size,
        video_frames=(args.min_frames, args.max_frames),
        fps=args.fps,
        min_objects=args.min_objects,
        max_objects=args.max_objects,
    )
    start = time.perf_counter()

    def progress(done: int, total: int) -> None:
        if done % args.progress_every == 0 or done == total:
            rate = done / (time.perf_counter() - start)
            print(f"[make_corpus] {done}/{total} items, {rate:.0f} items/s", file=sys.stderr, flush=True)

    summary = write_corpus(args.out, args.seed, args.images, args.videos, config, args.storage_options, progress)
    print(
        f"[make_corpus] wrote {summary['images']} images, {summary['videos']} videos, {summary['qa']} QA pairs "
        f"({summary['bytes'] / 1e6:.1f} MB) to {summary['out']} in {summary['seconds']:.1f} s",
        file=sys.stderr,
    )
    print(json.dumps(summary, indent=2))
    return summary


def main(argv: list[str] | None = None) -> int:
    make_corpus(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
