"""TwigVLM benchmark on this machine: tokens/s of plain greedy decoding against self-speculative
decoding (SSD), alone and with twig-guided pruning (TTP) or VisPruner, on long captions.

    python jobs/bench_ssd.py [--model models/shapes-llava] [--twig models/shapes-llava/twig] \
        [--seed 555] [--items 16] [--batch 1 8] [--budget 21] [--max-new-tokens 160] [--out FILE.json]

Every configuration runs on the same generated shapes-world items (images and videos, seed not
used for training or tuning) and prompts for detailed captions. For each it prints generated
tokens/s (all stages: preprocessing, vision, prefill, decode), the ratio to plain greedy at the
same batch size, draft acceptance, mean accepted length per round, and whether the text equals
greedy decoding with the same pruning (SSD must be lossless). The shapes world's templated
captions make drafting easier than natural language does.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from evaluation.bench_cpu_linear import add_cpu_linear_option
from evaluation.shapes_qa import media_for
from operators.cpu_linear import apply_cpu_linear
from operators.engine import Engine, EngineConfig, Request, format_prompt
from operators.loading import load_vlm
from operators.twig import load_twig
from synthetic.world import iter_items
from training.demo_model import CAPTION_PROMPT

# (name, pruning method, decode strategy); pruned ones use --budget tokens per frame.
CONFIGS = [
    ("greedy", "none", "greedy"),
    ("ssd", "none", "ssd"),
    ("ttp", "ttp", "greedy"),
    ("ttp+ssd", "ttp", "ssd"),
    ("vispruner", "vispruner", "greedy"),
    ("vispruner+ssd", "vispruner", "ssd"),
]


def caption_requests(processor, seed: int, count: int, frames: int) -> list[Request]:
    items = list(iter_items(seed, count - count // 4, "image")) + list(iter_items(seed, count // 4, "video"))
    return [
        Request(format_prompt(processor, CAPTION_PROMPT[item.kind], item.kind), **media_for(item, frames))
        for item in items
    ]


def run_config(engine: Engine, requests: list[Request], batch: int, repeats: int) -> dict:
    best, results = None, None
    for _ in range(repeats):
        start = time.perf_counter()
        out = []
        for i in range(0, len(requests), batch):
            out += engine.generate(requests[i : i + batch])
        seconds = time.perf_counter() - start
        if best is None or seconds < best:
            best, results = seconds, out
    tokens = sum(len(r.token_ids) for r in results)
    drafted = sum(r.drafted or 0 for r in results)
    accepted = sum(r.accepted or 0 for r in results)
    rounds = sum(r.rounds or 0 for r in results)
    return {
        "seconds": best,
        "tokens": tokens,
        "tokens_per_s": tokens / best,
        "acceptance": accepted / drafted if drafted else None,
        "accepted_per_round": accepted / rounds if rounds else None,
        "visual_tokens_kept": sum(r.visual_tokens_kept for r in results) / len(results),
        "visual_tokens_layer_mean": sum(r.visual_tokens_layer_mean for r in results) / len(results),
        "texts": [r.token_ids for r in results],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/shapes-llava")
    parser.add_argument("--twig", default="models/shapes-llava/twig")
    parser.add_argument("--seed", type=int, default=555)
    parser.add_argument("--items", type=int, default=16)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--budget", type=int, default=21, help="visual tokens kept per frame (TTP: R at layer K)")
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument("--max-draft", type=int, default=5)
    parser.add_argument("--threshold", type=float, default=0.6)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    add_cpu_linear_option(parser)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    model, processor = load_vlm(args.model)
    twig = load_twig(args.twig, model)
    apply_cpu_linear(args.cpu_linear, model, twig)
    frames = json.loads((Path(args.model) / "training_report.json").read_text())["model"]["frames_per_video"]
    requests = caption_requests(processor, args.seed, args.items, frames)
    report = {
        "command": " ".join(["python", "jobs/bench_ssd.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "cpu_linear": args.cpu_linear,
        "twig": {"K": twig.K, "T": twig.T},
        "items": len(requests),
        "results": {},
    }
    print(
        f"{len(requests)} caption requests (seed {args.seed}), max {args.max_new_tokens} new tokens, "
        f"budget {args.budget}/frame, twig K={twig.K} T={twig.T}, delta={args.max_draft} theta={args.threshold}"
    )
    header = (
        f"{'batch':>5} {'config':<14} {'tok/s':>8} {'× greedy':>9} {'accept':>7} {'acc/rnd':>7} "
        f"{'R':>6} {'R̄':>6} {'same text':>9}"
    )
    print(header)
    print("-" * len(header))
    for batch in args.batch:
        rows = {}
        for name, method, strategy in CONFIGS:
            config = EngineConfig(
                pruning_method=method,
                budget=None if method == "none" else args.budget,
                max_new_tokens=args.max_new_tokens,
                decode_strategy=strategy,
                max_draft=args.max_draft,
                draft_threshold=args.threshold,
            )
            rows[name] = run_config(Engine(model, processor, config, twig=twig), requests, batch, args.repeats)
        for name, method, _ in CONFIGS:
            row = rows[name]
            reference = rows[{"none": "greedy", "ttp": "ttp", "vispruner": "vispruner"}[method]]
            row["same_text_as_greedy"] = row["texts"] == reference["texts"]
            row["speedup"] = row["tokens_per_s"] / rows["greedy"]["tokens_per_s"]
            acc = "" if row["acceptance"] is None else f"{row['acceptance']:.3f}"
            per_round = "" if row["accepted_per_round"] is None else f"{row['accepted_per_round']:.2f}"
            print(
                f"{batch:>5} {name:<14} {row['tokens_per_s']:>8.1f} {row['speedup']:>9.2f} {acc:>7} "
                f"{per_round:>7} {row['visual_tokens_kept']:>6.1f} {row['visual_tokens_layer_mean']:>6.1f} "
                f"{str(row['same_text_as_greedy']):>9}"
            )
        report["results"][str(batch)] = {
            name: {k: v for k, v in row.items() if k != "texts"} for name, row in rows.items()
        }
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
