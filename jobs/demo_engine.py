"""Engine demo: every pruning method on a few generated images, with tokens kept and timings.

Until the trained demo model and the Ray job land, this runs the engine directly on a small
random-weight LLaVA-1.5-layout checkpoint (saved and reloaded through the real loader), so its
captions are noise; the token counts, FLOPs and timings are real.

    python jobs/demo_engine.py [--out demo_out] [--budget-fraction 0.111]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from operators.engine import Engine, EngineConfig, Request, format_prompt  # noqa: E402
from operators.loading import load_vlm  # noqa: E402
from operators.pruning import METHODS  # noqa: E402
from operators.tiny_models import save_tiny  # noqa: E402

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40)}


def shapes_image(seed: int, size: int = 96) -> Image.Image:
    """Small coloured shapes on a noisy background."""
    rng = np.random.default_rng(seed)
    background = (rng.normal(128, 20, (size, size, 3))).clip(0, 255).astype("uint8")
    image = Image.fromarray(background)
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(2, 5)):
        colour = list(COLOURS.values())[rng.integers(len(COLOURS))]
        x, y = rng.integers(4, size - 20, 2)
        s = int(rng.integers(8, 18))
        if rng.random() < 0.5:
            draw.ellipse([x, y, x + s, y + s], fill=colour)
        else:
            draw.rectangle([x, y, x + s, y + s], fill=colour)
    return image


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("demo_out"))
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--budget-fraction", type=float, default=1 / 9, help="share of visual tokens kept")
    parser.add_argument("--max-new-tokens", type=int, default=12)
    args = parser.parse_args(argv)

    torch.set_num_threads(max(1, torch.get_num_threads()))
    image_dir = args.out / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    images = []
    for i in range(args.images):
        image = shapes_image(i)
        image.save(image_dir / f"shapes_{i:03d}.png")
        images.append(image)
    checkpoint = save_tiny("llava", args.out / "tiny-llava", seed=0, image_size=96, patch_size=8)
    model, processor = load_vlm(checkpoint)
    requests = [Request(format_prompt(processor, "describe the image ."), images=[im]) for im in images]
    patches = (96 // 8) ** 2
    budget = max(1, round(patches * args.budget_fraction))
    print(f"model: {checkpoint} (random weights: captions are noise until the demo model lands)")
    print(f"images: {image_dir} ({len(images)}), {patches} visual tokens each, budget {budget} per image\n")
    header = (
        f"{'method':<10} {'kept/total':>10} {'prefill ms':>10} {'total ms':>9} {'GFLOPs':>8} {'KV KiB':>7}"
        "  first output"
    )
    print(header)
    print("-" * len(header))
    for method in METHODS:
        config = EngineConfig(method, budget=None if method == "none" else budget, max_new_tokens=args.max_new_tokens)
        engine = Engine(model, processor, config)
        engine.generate(requests[:1])  # warm-up
        t0 = time.perf_counter()
        results = engine.generate(requests)
        total_ms = 1000 * (time.perf_counter() - t0) / len(requests)
        r = results[0]
        prefill = sum(x.stage_ms["prefill"] for x in results) / len(results)
        flops = sum(x.prefill_flops for x in results) / len(results) / 1e9
        kv = sum(x.kv_cache_bytes for x in results) / len(results) / 1024
        print(
            f"{method:<10} {r.visual_tokens_kept:>4}/{r.visual_tokens_total:<5} {prefill:>10.1f} {total_ms:>9.1f} "
            f"{flops:>8.3f} {kv:>7.1f}  {r.text[:40]!r}"
        )
    print(f"\nper-item averages over {len(requests)} images; images and checkpoint are under {args.out}/")


if __name__ == "__main__":
    main()
