"""Where an engine batch's time goes, per item: preprocess, vision tower, pruning, prefill, generation.

The engine alone (no Ray) on generated shapes-world items with the demo model, one batch per method,
methods interleaved over repeats (medians). Explains the end-to-end ratios of jobs/benchmark.py: what
pruning shrinks (prefill) and what it cannot (the vision tower, generating the caption).

    python jobs/engine_stages.py --kind video --items 64 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from operators.engine import Engine, EngineConfig, Request, format_prompt
from operators.loading import load_vlm
from synthetic.world import WorldConfig, iter_items

STAGES = ("preprocess", "vision", "prune", "prefill", "decode")


def requests_for(processor, kind: str, items: int, seed: int, frames: int) -> list[Request]:
    out = []
    for item in iter_items(seed, items, kind, WorldConfig()):
        media = np.asarray(item.frames)
        if kind == "video":
            pick = np.linspace(0, len(media) - 1, frames).round().astype(int)
            out.append(Request(format_prompt(processor, "describe the video .", "video"), video=media[pick]))
        else:
            from PIL import Image

            out.append(Request(format_prompt(processor, "describe the image ."), images=[Image.fromarray(media[0])]))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/shapes-llava")
    parser.add_argument("--kind", choices=["image", "video"], default="video")
    parser.add_argument("--items", type=int, default=64, help="one batch of this many items")
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--seed", type=int, default=9001)
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", nargs="*", default=["none", "vispruner:7"], help="method[:budget per frame]")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    model, processor = load_vlm(args.model)
    requests = requests_for(processor, args.kind, args.items, args.seed, args.frames)
    engines = {}
    for spec in args.methods:
        method, _, budget = spec.partition(":")
        config = EngineConfig(method, budget=int(budget) if budget else None, max_new_tokens=args.max_new_tokens)
        engines[spec] = Engine(model, processor, config)
        engines[spec].generate(requests[:2])  # warm-up
    runs: dict[str, list[dict]] = {spec: [] for spec in engines}
    for _ in range(args.repeats):
        for spec, engine in engines.items():
            start = time.perf_counter()
            results = engine.generate(requests)
            wall = 1000.0 * (time.perf_counter() - start) / len(requests)
            stages = {k: results[0].stage_ms.get(k, 0.0) for k in STAGES}  # per-item shares of the batch
            stages["total"] = wall
            stages["tokens"] = statistics.mean(len(r.token_ids) for r in results)
            runs[spec].append(stages)
    print(
        f"{args.items} {args.kind}s in one batch, {args.frames} frames per video, "
        f"max_new_tokens {args.max_new_tokens}, "
        f"{args.threads} threads, median of {args.repeats}; ms per item"
    )
    print("| method | " + " | ".join(STAGES) + " | total | × none | generated tokens |")
    print("|---|" + "---|" * (len(STAGES) + 3))
    base = None
    for spec, stage_runs in runs.items():
        med = {k: statistics.median(r[k] for r in stage_runs) for k in (*STAGES, "total", "tokens")}
        base = base or med["total"]
        cells = " | ".join(f"{med[k]:.1f}" for k in STAGES)
        print(f"| {spec} | {cells} | {med['total']:.1f} | {base / med['total']:.2f} | {med['tokens']:.0f} |")


if __name__ == "__main__":
    main()
