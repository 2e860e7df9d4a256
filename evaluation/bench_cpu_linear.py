"""What packing the linears for oneDNN (``compute.cpu_linear``) changes: a forward of W new tokens over a
cached context, PyTorch's own linear (aten) against oneDNN-packed, side by side in one process.

W = 1 is a greedy decoding step; W = 2..6 is what a self-speculative verification pays for the pending
token and its drafts. A SmolLM2-135M-shaped Llama (random weights, fp32; only shapes matter for time)
holds ``--context`` tokens in its cache; each forward is rolled back, so the context stays the same.
The two models share weights (the packed one holds a reordered copy) and calls alternate, so load on
the machine hits both alike; every figure is a median over ``--repeats``.

    python jobs/bench_cpu_linear.py [--widths 1 2 3 4 6] [--context 200] [--repeats 15] [--json FILE]

Prints per width: ms with each kernel, their ratio, and each kernel's cost of W tokens relative to its
own one-token step (what decides whether verifying drafts is cheap).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time

import torch

from evaluation.bench_draft_vocab import SMOLLM2
from operators.cpu_linear import pack_linears, packing_available
from operators.settings import CPU_LINEAR_KERNELS
from pipeline.config import ComputeConfig


def add_cpu_linear_option(parser: argparse.ArgumentParser) -> None:
    """``--cpu-linear``, as every engine benchmark offers it: the caption job's default on CPU actors."""
    parser.add_argument(
        "--cpu-linear",
        choices=CPU_LINEAR_KERNELS,
        default=ComputeConfig.model_fields["cpu_linear"].default,
        help="linear layers: oneDNN with packed weights (the caption job's default on CPU), or PyTorch's own (aten)",
    )


def smollm2_shaped(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**SMOLLM2)
    return LlamaForCausalLM(config).eval()


@torch.no_grad()
def measure(models: dict, widths: list[int], context: int, repeats: int, seed: int = 0) -> dict:
    """Median ms of a forward of each width over a ``context``-token cache, per model, calls alternating."""
    from transformers import DynamicCache

    generator = torch.Generator().manual_seed(seed)
    vocab = SMOLLM2["vocab_size"]
    prompt = torch.randint(0, vocab, (1, context), generator=generator)
    caches = {}
    for name, model in models.items():
        caches[name] = DynamicCache()
        model(prompt, cache=caches[name], use_cache=True)
    times = {name: {w: [] for w in widths} for name in models}
    for _ in range(repeats + 2):  # the first two rounds warm up
        for w in widths:
            ids = torch.randint(0, vocab, (1, w), generator=generator)
            for name, model in models.items():
                t0 = time.perf_counter()
                model(ids, cache=caches[name], use_cache=True)
                times[name][w].append(time.perf_counter() - t0)
                caches[name].crop(-w)
    return {name: {w: statistics.median(ts[2:]) * 1e3 for w, ts in per.items()} for name, per in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", type=int, nargs="+", default=[1, 2, 3, 4, 6])
    parser.add_argument("--context", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=str, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    if min(args.widths) < 1 or args.context < 1 or args.repeats < 1:
        parser.error("--widths, --context and --repeats must be >= 1")
    if not packing_available():
        print("this torch build has no oneDNN packed linear: compute.cpu_linear=onednn does nothing", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    aten = smollm2_shaped()
    onednn = copy.deepcopy(aten)
    pack_linears(onednn)  # whatever its size: this measures the kernel
    ms = measure({"aten": aten, "onednn": onednn}, args.widths, args.context, args.repeats)
    widths = sorted(args.widths)
    one = widths[0]
    rows = []
    print(f"| W | aten ms | onednn ms | aten / onednn | aten W / aten {one} | onednn W / onednn {one} |")
    print("|---|---|---|---|---|---|")
    for w in widths:
        row = {
            "width": w,
            "aten_ms": round(ms["aten"][w], 2),
            "onednn_ms": round(ms["onednn"][w], 2),
            "speedup": round(ms["aten"][w] / ms["onednn"][w], 3),
            "aten_vs_step": round(ms["aten"][w] / ms["aten"][one], 3),
            "onednn_vs_step": round(ms["onednn"][w] / ms["onednn"][one], 3),
        }
        rows.append(row)
        print("| " + " | ".join(str(v) for v in row.values()) + " |", flush=True)
    if args.json:
        settings = {"context": args.context, "repeats": args.repeats, "threads": args.threads}
        with open(args.json, "w") as f:
            json.dump({"settings": settings, "torch": torch.__version__, "rows": rows}, f, indent=2)
    return 0
