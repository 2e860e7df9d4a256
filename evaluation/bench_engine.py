"""Engine benchmark: prefill time, FLOPs and KV-cache size of `none` against pruning methods.

Runs the engine (no Ray) on a random-weight model with LLaVA-1.5's geometry: 336 px images,
14 px patches -> 576 visual tokens, vision feature layer -2. Every method runs on the same
images in the same process, interleaved over repeats, and is printed as a ratio to `none`.

    python jobs/bench_engine.py                       # CPU preset (reduced widths, see --help)
    python jobs/bench_engine.py --preset llava-1.5-7b --device cuda --dtype bfloat16
    python jobs/bench_engine.py --preset qwen2.5-vl-7b --device cuda --dtype bfloat16   # 576 merged tokens
    python jobs/bench_engine.py --preset qwen2.5-vl-7b-cpu                               # widths x 1/8
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import CLIPVisionConfig

from operators.engine import Engine, EngineConfig, Request, format_prompt
from training.builders import basic_tokenizer, llama_config, random_llava

# Widths reduced for a 2-core CPU; geometry (576 tokens, layer -2) is LLaVA-1.5's.
PRESETS = {
    "cpu": dict(
        vision=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=8),
        text=dict(
            hidden_size=1024,
            intermediate_size=2752,
            num_hidden_layers=8,
            num_attention_heads=16,
            num_key_value_heads=16,
        ),
    ),
    "llava-1.5-7b": dict(
        vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16),
        text=dict(
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
        ),
    ),
}
# Random-weight models with a real model's geometry (evaluation.geometry): preset -> (geometry, width scale).
GEOMETRY_PRESETS = {"qwen2.5-vl-7b": ("qwen2.5-vl-7b", 1.0), "qwen2.5-vl-7b-cpu": ("qwen2.5-vl-7b", 0.125)}
METHODS = [("none", None), ("vispruner", 192), ("vispruner", 128), ("vispruner", 64), ("fastv", 64)]


def synthetic_images(count: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray((rng.random((336, 336, 3)) * 255).astype("uint8")) for _ in range(count)]


def build_model(preset: str, device: str, dtype: torch.dtype):
    if preset in GEOMETRY_PRESETS:
        from evaluation.geometry import build_model as build_geometry

        name, scale = GEOMETRY_PRESETS[preset]
        with torch.device(device):
            model, processor = build_geometry(name, scale)
        return model.to(device=device, dtype=dtype).eval(), processor
    spec = PRESETS[preset]
    with torch.device(device):
        tokenizer = basic_tokenizer()
        vision = CLIPVisionConfig(image_size=336, patch_size=14, projection_dim=32, **spec["vision"])
        text = llama_config(tokenizer, max_position_embeddings=2048, **spec["text"])
        model, processor = random_llava(tokenizer, vision, text, seed=0)
    return model.to(device=device, dtype=dtype).eval(), processor


def run(args) -> dict:
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    model, processor = build_model(args.preset, args.device, dtype)
    images = synthetic_images(args.batch)
    requests = [Request(format_prompt(processor, "describe the image ."), images=[im]) for im in images]
    engines = {
        (m, b): Engine(model, processor, EngineConfig(m, budget=b, max_new_tokens=args.new_tokens)) for m, b in METHODS
    }
    for engine in engines.values():  # warm-up
        engine.generate(requests)
    samples: dict[tuple, list] = {key: [] for key in engines}
    for _ in range(args.repeats):  # interleave methods so drift hits all alike
        for key, engine in engines.items():
            t0 = time.perf_counter()
            results = engine.generate(requests)
            wall = time.perf_counter() - t0
            samples[key].append((wall, results))
    rows = []
    for (method, budget), runs in samples.items():
        results = runs[0][1]
        prefill_ms = statistics.median(r[1][0].stage_ms["prefill"] * args.batch for r in runs)
        to_first_ms = statistics.median(
            sum(v for k, v in r[1][0].stage_ms.items() if k != "decode") * args.batch for r in runs
        )
        rows.append(
            dict(
                method=method,
                budget=budget or 576,
                kept=results[0].visual_tokens_kept,
                prefill_ms=prefill_ms,
                first_token_ms=to_first_ms,
                decode_ms=statistics.median(r[1][0].stage_ms["decode"] * args.batch for r in runs),
                prefill_tflops=sum(r.prefill_flops for r in results) / 1e12,
                kv_mb=sum(r.kv_cache_bytes for r in results) / 2**20,
            )
        )
    base = rows[0]
    for row in rows:
        for key in ("prefill_ms", "first_token_ms", "decode_ms", "prefill_tflops", "kv_mb"):
            row[key + "_ratio"] = row[key] / base[key] if base[key] else float("nan")
    return dict(
        preset=args.preset,
        device=torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
        threads=torch.get_num_threads(),
        dtype=args.dtype,
        batch=args.batch,
        new_tokens=args.new_tokens,
        repeats=args.repeats,
        **sizes(args.preset),
        rows=rows,
    )


def sizes(preset: str) -> dict:
    """The preset's text and vision sizes, for the report."""
    if preset in GEOMETRY_PRESETS:
        from evaluation.geometry import GEOMETRIES

        name, scale = GEOMETRY_PRESETS[preset]
        return dict(geometry=name, width_scale=scale, sizes=GEOMETRIES[name].scaled(scale))
    return dict(text=PRESETS[preset]["text"], vision=PRESETS[preset]["vision"])


def markdown(report: dict) -> str:
    lines = [
        f"preset `{report['preset']}` on {report['device']} ({report['threads']} threads), {report['dtype']}, "
        f"batch {report['batch']}, {report['new_tokens']} new tokens, median of {report['repeats']}",
        "",
        "| method | kept | prefill ms | × none | to first token ms | × none | decode ms | × none "
        "| prefill TFLOPs | × none | prompt KV MB | × none |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        name = r["method"] if r["method"] == "none" else f"{r['method']} {r['budget']}"
        lines.append(
            f"| {name} | {r['kept']} | {r['prefill_ms']:.1f} | {r['prefill_ms_ratio']:.3f} | "
            f"{r['first_token_ms']:.1f} | {r['first_token_ms_ratio']:.3f} | {r['decode_ms']:.1f} | "
            f"{r['decode_ms_ratio']:.3f} | {r['prefill_tflops']:.4f} | {r['prefill_tflops_ratio']:.3f} | "
            f"{r['kv_mb']:.2f} | {r['kv_mb_ratio']:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted([*PRESETS, *GEOMETRY_PRESETS]), default="cpu")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args(argv)
    report = run(args)
    print(markdown(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
