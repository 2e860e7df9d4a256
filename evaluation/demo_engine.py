"""Engine demo: the shipped demo model on a few generated shapes-world images and videos.

For each pruning method at 1/9 of the visual tokens (plus `none`), prints the caption of the
first image, QA accuracy over the sample, visual tokens kept, and time per item. Until the Ray
job lands (issue 5) this runs the engine directly.

    python jobs/demo_engine.py [--model models/shapes-llava] [--out demo_out] [--seed 4242]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from PIL import Image

from evaluation.shapes_qa import accuracy_by_type, answer_questions, media_for
from operators import registry
from operators.engine import Engine, EngineConfig, Request, format_prompt
from operators.loading import load_vlm
from operators.twig import load_twig
from synthetic.world import iter_items
from training.demo_model import CAPTION_PROMPT


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/shapes-llava")
    parser.add_argument("--out", type=Path, default=Path("demo_out"))
    parser.add_argument("--seed", type=int, default=4242, help="seed of the generated sample (not a training seed)")
    parser.add_argument("--images", type=int, default=12)
    parser.add_argument("--videos", type=int, default=6)
    parser.add_argument("--budget-fraction", type=float, default=1 / 9, help="share of visual tokens kept")
    args = parser.parse_args(argv)

    torch.set_num_threads(2)
    model, processor = load_vlm(args.model)
    card = json.loads((Path(args.model) / "training_report.json").read_text())
    frames = card["model"]["frames_per_video"]
    items = list(iter_items(args.seed, args.images, "image")) + list(iter_items(args.seed, args.videos, "video"))
    sample_dir = args.out / "sample"
    sample_dir.mkdir(parents=True, exist_ok=True)
    for item in items:
        Image.fromarray(item.frames[0]).save(sample_dir / f"{item.item_id}.png")
    patches = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2
    budget = max(1, round(patches * args.budget_fraction))
    first = items[0]
    print(f"model: {args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters)")
    print(f"sample: {args.images} images + {args.videos} videos (seed {args.seed}), first frames in {sample_dir}/")
    print(f"budget: {budget} of {patches} visual tokens per frame for the pruning methods\n")
    print(f"truth ({first.item_id}): {first.caption}\n")
    header = f"{'method':<10} {'kept/total':>10} {'QA acc':>7} {'ms/question':>11}  caption of {first.item_id}"
    print(header)
    print("-" * len(header))
    twig_dir = Path(args.model) / "twig"
    twig = load_twig(twig_dir, model) if (twig_dir / "twig.json").exists() else None
    for method in registry.pruning_names():
        spec = registry.pruning_spec(method)
        if spec.needs_twig and twig is None:
            print(f"{method:<10} skipped: needs a trained twig ({twig_dir} has none)")
            continue
        method_budget = budget if spec.needs_budget else None
        engine = Engine(model, processor, EngineConfig(method, budget=method_budget, max_new_tokens=96), twig=twig)
        caption = engine.generate(
            [Request(format_prompt(processor, CAPTION_PROMPT["image"]), **media_for(first, frames))]
        )[0]
        engine = Engine(model, processor, EngineConfig(method, budget=method_budget, max_new_tokens=4), twig=twig)
        t0 = time.perf_counter()
        records = answer_questions(engine, items, frames)
        per_question = 1000 * (time.perf_counter() - t0) / len(records)
        accuracy = accuracy_by_type(records)["all"]
        kept = f"{caption.visual_tokens_kept}/{caption.visual_tokens_total}"
        print(f"{method:<10} {kept:>10} {accuracy:>7.3f} {per_question:>11.1f}  {caption.text}")
    print(f"\n{len(records)} questions per method; normalised exact match against the generator's answers")


if __name__ == "__main__":
    main()
