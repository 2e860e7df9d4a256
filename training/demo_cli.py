"""Train the demo VLM on the shapes world and write a Hugging Face checkpoint.

    python jobs/train_demo_model.py --out models/shapes-llava          # the committed model (~25 min on 2 cores)
    python jobs/train_demo_model.py --out /tmp/m --quick               # a few steps, for tests

Writes model.safetensors, config.json, generation_config.json, tokenizer and processor files,
and training_report.json (configs, losses, held-out QA accuracy with real and with blank media).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from evaluation.shapes_qa import accuracy_by_type, answer_questions
from operators.engine import Engine, EngineConfig
from synthetic.world import WorldConfig, iter_items
from training.demo_model import DemoModelConfig, build_processor, build_tokenizer
from training.train_demo import TrainConfig, train_stage1, train_stage2

QUICK = TrainConfig(
    stage1_images=64,
    stage1_steps=3,
    stage1_batch=16,
    stage2_images=48,
    stage2_videos=8,
    stage2_steps=4,
    stage2_image_batch=8,
    stage2_video_batch=2,
    stage2_image_items=2,
    stage2_video_items=1,
    warmup=2,
    log_every=1,
)


def log(message: str) -> None:
    print(f"[train] {message}", file=sys.stderr, flush=True)


def held_out_report(model, processor, model_cfg: DemoModelConfig, world: WorldConfig, seed: int, n: dict) -> dict:
    """QA accuracy per type on items from ``seed``, with the real media and with blank media."""
    engine = Engine(model, processor, EngineConfig(max_new_tokens=4))
    report = {}
    for kind, count in n.items():
        items = list(iter_items(seed, count, kind, world))
        report[kind] = {
            "items": count,
            "questions": sum(len(it.qa) for it in items),
            "real": accuracy_by_type(answer_questions(engine, items, model_cfg.frames_per_video)),
            "blank": accuracy_by_type(answer_questions(engine, items, model_cfg.frames_per_video, blank=True)),
        }
    return report


def write_model_card(out: Path) -> None:
    """README.md for the checkpoint, from its training_report.json (command, sizes, held-out accuracy)."""
    report = json.loads((out / "training_report.json").read_text())
    size_mb = sum(f.stat().st_size for f in out.iterdir() if f.is_file()) / 2**20
    lines = [
        "# shapes-llava: the demo VLM",
        "",
        "A `LlavaForConditionalGeneration` trained from scratch on the synthetic shapes world (`synthetic/world.py`)",
        "by `jobs/train_demo_model.py`; see the repository README for the architecture and the world.",
        "",
        f"* command: `{report['command']}`",
        f"* training time: {report['train_seconds']:.0f} s on {report['threads']} CPU threads "
        f"(stage 1: {report['stage1_seconds']:.0f} s), torch {report['torch']}",
        f"* parameters: {report['parameters'] / 1e6:.2f} M; files: {size_mb:.1f} MB",
        f"* videos are fed as {report['model']['frames_per_video']} uniformly sampled frames, one `<image>` each",
        "",
        f"Held-out QA accuracy (normalised exact match; items of seed {report['eval_seed']}, never trained on),",
        "with the real media and with blank media (the same background, no objects):",
        "",
    ]
    for kind, r in report["held_out"].items():
        types = list(r["real"])
        lines += [
            f"**{kind}s** ({r['items']} items, {r['questions']} questions)",
            "",
            "| media | " + " | ".join(types) + " |",
            "|---|" + "---|" * len(types),
            "| real | " + " | ".join(f"{r['real'][t]:.3f}" for t in types) + " |",
            "| blank | " + " | ".join(f"{r['blank'].get(t, float('nan')):.3f}" for t in types) + " |",
            "",
        ]
    (out / "README.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-seed", type=int, default=777, help="seed of the held-out evaluation items")
    parser.add_argument("--eval-images", type=int, default=300)
    parser.add_argument("--eval-videos", type=int, default=150)
    parser.add_argument("--quick", action="store_true", help="a few steps of each stage (smoke test)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--stage1-region-steps", type=int, help="stage 1 steps of the region (object shape) loss alone; default 0"
    )
    parser.add_argument(
        "--stage1-region-loss", type=float, help="weight of the region loss beside the contrastive one; default 0"
    )
    parser.add_argument(
        "--stage2-pack",
        action="store_const",
        const=True,
        help="stage 2 batches whole items, each packed into one row sharing its image tokens; default off",
    )
    parser.add_argument("--stage2-steps", type=int, help=f"stage 2 steps; default {TrainConfig.stage2_steps}")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    world, model_cfg = WorldConfig(), DemoModelConfig()
    cfg = dataclasses.replace(QUICK, seed=args.seed) if args.quick else TrainConfig(seed=args.seed)
    for key in ("stage1_region_steps", "stage1_region_loss", "stage2_pack", "stage2_steps"):
        if getattr(args, key) is not None:
            cfg = dataclasses.replace(cfg, **{key: getattr(args, key)})
    tokenizer = build_tokenizer(world)
    processor = build_processor(tokenizer, world, model_cfg)
    started = time.perf_counter()
    vision = train_stage1(tokenizer, processor.image_processor, world, model_cfg, cfg, log)
    stage1_s = time.perf_counter() - started
    model = train_stage2(tokenizer, processor.image_processor, vision, world, model_cfg, cfg, log)
    train_s = time.perf_counter() - started

    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    processor.save_pretrained(args.out)
    log(f"saved checkpoint to {args.out} after {train_s:.0f}s of training")

    counts = {"image": 8, "video": 4} if args.quick else {"image": args.eval_images, "video": args.eval_videos}
    evaluation = held_out_report(model, processor, model_cfg, world, args.eval_seed, counts)
    report = {
        "command": "python jobs/train_demo_model.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "train_seconds": round(train_s, 1),
        "stage1_seconds": round(stage1_s, 1),
        "threads": args.threads,
        "torch": torch.__version__,
        "world": dataclasses.asdict(world),
        "model": dataclasses.asdict(model_cfg),
        "train": dataclasses.asdict(cfg),
        "eval_seed": args.eval_seed,
        "held_out": evaluation,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    (args.out / "training_report.json").write_text(json.dumps(report, indent=2))
    write_model_card(args.out)
    for kind, r in evaluation.items():
        log(f"held-out {kind}: {r['questions']} questions")
        for qtype in r["real"]:
            log(f"  {qtype:<9} real {r['real'][qtype]:.3f}  blank {r['blank'][qtype]:.3f}")
    print(args.out)


if __name__ == "__main__":
    main()
