"""End-to-end throughput of the pipeline (read, decode, infer, write) for each pruning/decoding setup.

One run, one corpus, one Ray instance, the setups one after another: unpruned greedy; `vispruner`
and `fastv` at 1/3, 2/9 and 1/9 of the visual tokens; TTP; TTP+SSD; `vispruner`+SSD. Each setup is
the real caption job (pipeline.run.run) writing its own Parquet. Per setup: items/s, videos/s,
generated tokens/s, actor busy fraction, time per stage, peak memory, FLOPs per item, the ratio to
the unpruned setup, and the RelAcc of the method from the quality table (reports/quality). SSD
setups are checked to write exactly the captions of their greedy twins.

    python jobs/benchmark.py --out reports/benchmark              # demo model, CPU, ~15 min
    python jobs/benchmark.py --images 8 --videos 8 --setups none vispruner-1/9   # a quick look
    # a random-weight model with LLaVA-1.5-7B's proportions (evaluation.geometry), fixed output lengths
    python jobs/benchmark.py --geometry llava-1.5-7b --images 24 --videos 0 --max-new-tokens 4 \
        --setups none vispruner-1/9
    python jobs/benchmark.py --geometry qwen2.5-vl-7b ...   # Qwen2.5-VL-7B's proportions, 576 merged tokens

Writes benchmark.json, benchmark.md and benchmark.png (items/s against RelAcc, Pareto front).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from evaluation.geometry import GEOMETRIES, build_checkpoint
from evaluation.measure import PeakMemory
from operators import registry
from pipeline.config import Config, load_config

FRACTIONS = {"1/3": 1 / 3, "2/9": 2 / 9, "1/9": 1 / 9}


@dataclass
class Setup:
    name: str
    method: str  # pruning method as in the quality table
    fraction: str  # "all" or a key of FRACTIONS
    strategy: str = "greedy"
    greedy_twin: str | None = None  # SSD setups: the greedy setup whose captions they must equal
    overrides: list[str] = field(default_factory=list)


# What runs without --setups: the figures BENCHMARKS.md reports.
DEFAULT_SETUPS = (
    "none",
    *(f"{method}-{fraction}" for method in ("vispruner", "fastv") for fraction in FRACTIONS),
    "ttp-1/9",
    "ttp+ssd-1/9",
    "vispruner+ssd-1/9",
)


def setups(patches: int, twig: str | None) -> list[Setup]:
    """Every setup the benchmark can run (``--list``): `none`; each registered pruning method
    (``operators.registry``) at each fraction of ``patches`` (the model's visual tokens per frame);
    with a twig, each method with SSD at 1/9. Methods that need a twig are left out without one."""
    budget = {name: max(1, round(patches * f)) for name, f in FRACTIONS.items()}
    out = [Setup("none", "none", "all", overrides=["pruning.method=none", "pruning.budget=null"])]
    speculative = []
    for method in registry.pruning_names():
        spec = registry.pruning_spec(method)
        if not spec.needs_budget or (spec.needs_twig and not twig):
            continue
        twig_keys = [f"decode.twig={twig}"] if twig else []
        for name in FRACTIONS:
            keys = [f"pruning.method={method}", f"pruning.budget={budget[name]}"]
            keys += twig_keys if spec.needs_twig else []
            out.append(Setup(f"{method}-{name}", method, name, overrides=keys))
        if twig:
            keys = [f"pruning.method={method}", f"pruning.budget={budget['1/9']}", *twig_keys, "decode.strategy=ssd"]
            speculative.append(Setup(f"{method}+ssd-1/9", method, "1/9", "ssd", f"{method}-1/9", keys))
    return out + speculative


def quality_lookup(path: Path) -> dict[tuple[str, str], dict[str, float]]:
    """(method, fraction) -> {"image": RelAcc, "video": RelAcc} from the quality table's JSON."""
    if not path.exists():
        return {}
    report = json.loads(path.read_text())
    table: dict[tuple[str, str], dict[str, float]] = {}
    for kind, rows in report["results"].items():
        for row in rows:
            table.setdefault((row["method"], row["fraction"]), {})[kind] = row["rel_acc"]
    return table


def model_config(path: str):
    """The checkpoint's Hugging Face config (fetched and cached first when `path` is a URI)."""
    from transformers import AutoConfig

    from operators.loading import fetch_checkpoint, is_remote

    return AutoConfig.from_pretrained(fetch_checkpoint(path) if is_remote(path) else path.removeprefix("file://"))


def measure(setup: Setup, config: Config, log) -> dict:
    """Run one setup end to end; its metrics from the run summary and the Parquet it wrote."""
    import pyarrow.compute as pc

    from operators.accounting import generated_token_flops
    from pipeline.output import read_output
    from pipeline.run import options_for, run

    started = time.time()
    with PeakMemory() as memory:
        summary = run(config, log=lambda line: log(f"    {line}"))
    table = read_output(config.output.uri, options_for(config.output.uri, config))
    table = table.filter(pc.equal(table["config_fingerprint"], config.fingerprint()))
    rows = table.to_pylist()
    ok = [r for r in rows if r["status"] == "ok"]
    videos = sum(1 for r in ok if r["media_type"] == "video")
    seconds = summary.seconds
    text_config = model_config(config.model.path).text_config
    token_flops = generated_token_flops(text_config)
    actors = config.compute.actors
    mean = lambda values: sum(values) / len(values) if values else float("nan")  # noqa: E731
    drafted = sum(r["drafted_tokens"] or 0 for r in ok)
    # Start-up: from the job's start to the first engine call (actor process start, imports, model
    # load, first decoded batch). Paid once per job; the steady rate is what a large corpus sees.
    first_call = min(r["created_at"] for r in rows).timestamp()
    startup = min(seconds, max(0.0, first_call - started))
    return {
        "setup": setup.name,
        "method": setup.method,
        "fraction": setup.fraction,
        "strategy": setup.strategy,
        "items": len(rows),
        "ok": len(ok),
        "errors": len(rows) - len(ok),
        "duplicates": summary.duplicates,
        "missing": summary.missing,
        "seconds": round(seconds, 2),
        "items_per_s": len(rows) / seconds,
        "startup_s": round(startup, 2),
        "steady_items_per_s": len(rows) / (seconds - startup) if seconds > startup else float("nan"),
        "videos_per_s": videos / seconds,
        "generated_tokens_per_s": summary.generated_tokens / seconds,
        "generated_tokens_per_item": mean([r["generated_tokens"] for r in ok]),
        "actor_busy": summary.stage_seconds.get("inference", 0.0) / (seconds * actors),
        "steady_actor_busy": summary.stage_seconds.get("inference", 0.0) / ((seconds - startup) * actors)
        if seconds > startup
        else float("nan"),
        "stage_ms_per_item": {k: 1000.0 * v / max(1, len(rows)) for k, v in summary.stage_seconds.items()},
        "peak_rss_mb": memory.peak / 2**20,
        "visual_tokens_kept": mean([r["visual_tokens_kept"] for r in ok]),
        "visual_tokens_layer_mean": mean([r["visual_tokens_layer_mean"] for r in ok]),
        "visual_tokens_total": mean([r["visual_tokens_total"] for r in ok]),
        "prefill_gflops_per_item": mean([r["prefill_flops"] for r in ok]) / 1e9,
        "generation_gflops_per_item": mean([r["generated_tokens"] * token_flops for r in ok]) / 1e9,
        "acceptance": (sum(r["accepted_tokens"] or 0 for r in ok) / drafted) if drafted else None,
        "texts": {r["item_id"]: r["text"] for r in ok},
    }


RATES = ("items_per_s", "steady_items_per_s", "videos_per_s", "generated_tokens_per_s")


def combine(runs: list[dict]) -> dict:
    """One setup's rounds: the last round's record with each rate replaced by its median over rounds
    (the rounds' values kept beside it, so the noise is visible)."""
    out = dict(runs[-1])
    for key in RATES:
        values = [r[key] for r in runs]
        out[key] = statistics.median(values)
        out[f"{key}_rounds"] = [round(v, 3) for v in values]
    out["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
    out["same_text_across_rounds"] = all(r["texts"] == runs[0]["texts"] for r in runs)
    return out


def markdown(report: dict) -> str:
    lines = [
        f"{report['items']} items ({report['images']} images, {report['videos']} videos; seed {report['seed']}), "
        f"task {report['task']}, max_new_tokens {report['max_new_tokens']}, model {report['model']}, "
        f"{report['actors']} actor(s) x {report['cpus_per_actor']} CPU, batch_size {report['batch_size']}, "
        f"batch_tokens {report['batch_tokens']}; {report['machine']}; median of {report['repeats']} round(s)",
        "",
        "| setup | items/s | × none | steady items/s | × none | start-up s | videos/s | gen tok/s | tok/item "
        "| busy (steady) "
        "| decode / prefill / generate ms per item "
        "| peak RSS MB | visual kept (R̄) of total | GFLOPs/item prefill + gen | × none by FLOPs "
        "| acceptance | same text as greedy "
        "| RelAcc img / vid |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        st = r["stage_ms_per_item"]
        rel = r.get("rel_acc") or {}
        rel_text = " / ".join(f"{rel[k]:.3f}" if k in rel else "–" for k in ("image", "video"))
        same = {True: "yes", False: "**no**", None: "–"}[r.get("same_text_as_greedy")]
        acceptance = "–" if r["acceptance"] is None else f"{r['acceptance']:.3f}"
        lines.append(
            f"| {r['setup']} | {r['items_per_s']:.2f} | {r['speedup']:.2f} | {r['steady_items_per_s']:.2f} | "
            f"{r['steady_speedup']:.2f} | {r['startup_s']:.1f} | {r['videos_per_s']:.2f} | "
            f"{r['generated_tokens_per_s']:.0f} | {r['generated_tokens_per_item']:.0f} | "
            f"{r['actor_busy']:.2f} ({r['steady_actor_busy']:.2f}) | "
            f"{st.get('decode', 0):.0f} / {st.get('prefill', 0):.0f} / {st.get('generate', 0):.0f} | "
            f"{r['peak_rss_mb']:.0f} | {r['visual_tokens_kept']:.0f} ({r['visual_tokens_layer_mean']:.0f}) of "
            f"{r['visual_tokens_total']:.0f} | {r['prefill_gflops_per_item']:.3f} + "
            f"{r['generation_gflops_per_item']:.3f} | {r.get('flops_ratio', float('nan')):.2f} | "
            f"{acceptance} | {same} | {rel_text} |"
        )
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = []
    for r in report["results"]:
        rel = r.get("rel_acc") or {}
        if rel:
            points.append((sum(rel.values()) / len(rel), r["items_per_s"], r["setup"]))
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for acc, rate, name in points:
        ax.scatter(acc, rate, color="tab:blue")
        ax.annotate(name, (acc, rate), textcoords="offset points", xytext=(4, 4), fontsize=8)
    front = pareto_front([(a, r) for a, r, _ in points])
    if front:
        ax.step(
            [p[0] for p in front], [p[1] for p in front], where="post", color="tab:red", alpha=0.6, label="Pareto front"
        )
        ax.legend()
    ax.set_xlabel("RelAcc (mean of images and videos, from the quality table)")
    ax.set_ylabel("items/s end to end")
    ax.set_title("throughput against retained accuracy")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points (accuracy, throughput) not beaten on both axes by another, by accuracy ascending."""
    front = [p for p in points if not any(q[0] >= p[0] and q[1] >= p[1] and q != p for q in points)]
    return sorted(front)


def parse_args(argv: list[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo.yaml", help="base config; setups override pruning/decode")
    parser.add_argument("--corpus", help="existing corpus to caption (default: generate one under --out)")
    parser.add_argument("--images", type=int, default=192)
    parser.add_argument("--videos", type=int, default=192)
    parser.add_argument("--seed", type=int, default=9001, help="corpus seed (not one the model was trained on)")
    parser.add_argument(
        "--task", choices=["caption", "qa"], default="caption", help="qa: short answers, one row per question"
    )
    parser.add_argument(
        "--max-new-tokens", type=int, default=None, help="default: 160 for captions (the demo's 47-120 words), 4 for qa"
    )
    parser.add_argument(
        "--geometry",
        choices=sorted(GEOMETRIES),
        help="instead of the config's model: a random-weight model with this real model's proportions "
        "(widths x --width-scale; evaluation.geometry), built under --out once, run with decode.ignore_eos",
    )
    parser.add_argument("--width-scale", type=float, default=0.125, help="with --geometry (default 1/8)")
    parser.add_argument("--twig", default=None, help="trained twig (default: <model>/twig when present)")
    parser.add_argument("--quality", type=Path, default=Path("reports/quality/quality.json"))
    parser.add_argument(
        "--setups", nargs="*", help=f"setups to run (default: {' '.join(DEFAULT_SETUPS)}); 'none' always runs"
    )
    parser.add_argument("--list", action="store_true", help="print every setup this model and twig allow, and exit")
    parser.add_argument("--repeats", type=int, default=1, help="rounds over all setups (alternating order); medians")
    parser.add_argument("--out", type=Path, default=Path("reports/benchmark"))
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every setup")
    args = parser.parse_args(argv)
    # argparse hands overrides written after `--setups a b` to --setups; no setup name holds '='.
    args.overrides += [s for s in args.setups or [] if "=" in s]
    args.setups = [s for s in args.setups or [] if "=" not in s] or None
    return parser, args


def run_benchmark(argv: list[str] | None = None) -> dict:
    parser, args = parse_args(argv)
    args.max_new_tokens = args.max_new_tokens or (160 if args.task == "caption" else 4)

    from pipeline.run import init_ray
    from pipeline.run import run as run_pipeline

    if args.geometry:
        model_dir = build_checkpoint(args.geometry, args.out / "models", args.width_scale)
        what = f"{args.geometry} geometry, widths x {args.width_scale:g}"
        print(f"[benchmark] model: {what}: {model_dir}", file=sys.stderr)
        # Random weights stop at random lengths: every setup generates exactly max_new_tokens.
        args.overrides = [f"model.path='{model_dir}'", "decode.ignore_eos=true", *args.overrides]
    base = load_config(args.config, args.overrides)
    if args.geometry:
        patches = GEOMETRIES[args.geometry].tokens_per_image
    else:
        vision = model_config(base.model.path).vision_config
        patches = (vision.image_size // vision.patch_size) ** 2
    twig = args.twig or (
        os.path.join(base.model.path, "twig") if os.path.isdir(os.path.join(base.model.path, "twig")) else None
    )
    available = setups(patches, twig)
    if args.list:
        print("\n".join(s.name for s in available))
        return {}
    if args.setups:
        unknown = set(args.setups) - {s.name for s in available}
        if unknown:
            parser.error(f"unknown setup(s) {sorted(unknown)}; allowed: {[s.name for s in available]}")
    wanted = set(args.setups or DEFAULT_SETUPS)
    chosen = [s for s in available if s.name == "none" or s.name in wanted]

    args.out.mkdir(parents=True, exist_ok=True)
    corpus = args.corpus
    if corpus is None:
        from synthetic.corpus import write_corpus

        corpus = str(args.out / "corpus")
        shutil.rmtree(corpus, ignore_errors=True)
        made = write_corpus(corpus, args.seed, args.images, args.videos)
        print(f"[benchmark] corpus: {made['images']} images, {made['videos']} videos in {corpus}", file=sys.stderr)
    runs_dir = args.out / "runs"
    shutil.rmtree(runs_dir, ignore_errors=True)  # every setup starts from an empty output: nothing resumed

    quality = {} if args.geometry else quality_lookup(args.quality)  # random weights: no quality to look up
    if args.task == "caption":
        source = [f"input.uri='{corpus}'", "input.kind=prefix"]
    else:  # every QA pair of the corpus's MSVD-QA-style annotations is a row
        source = [f"input.uri='{corpus}/qa.json'", "input.kind=annotations", "input.layout=msvd_qa"]
    common = [
        *source,
        f"task={args.task}",
        f"decode.max_new_tokens={args.max_new_tokens}",
        "ray.progress_bars=false",
    ]
    configs = {
        s.name: load_config(
            args.config, [*args.overrides, *common, *s.overrides, f"output.uri='{runs_dir / s.name.replace('/', '_')}'"]
        )
        for s in chosen
    }  # all validated before Ray starts
    init_ray(base)
    import ray

    machine = f"{os.cpu_count()} CPUs, Ray {ray.__version__}"
    results = []
    # Warm-up (not measured): the first job on a fresh Ray instance also starts its worker pool and
    # decoder children, which would otherwise be charged to whichever setup runs first.
    warm = load_config(
        args.config, [*args.overrides, *common, *chosen[0].overrides, f"output.uri='{runs_dir / '_warmup'}'"]
    )
    print("[benchmark] warm-up run", file=sys.stderr, flush=True)
    run_pipeline(warm, log=lambda line: None)
    rounds: dict[str, list[dict]] = {s.name: [] for s in chosen}
    for round_index in range(args.repeats):
        # Alternate the order between rounds, so slow drift of the machine does not favour one end.
        for setup in chosen if round_index % 2 == 0 else chosen[::-1]:
            print(f"[benchmark] round {round_index + 1}/{args.repeats}: {setup.name}", file=sys.stderr, flush=True)
            config = configs[setup.name]
            shutil.rmtree(config.output.uri, ignore_errors=True)  # a fresh output: nothing resumed
            rounds[setup.name].append(measure(setup, config, lambda line: print(line, file=sys.stderr, flush=True)))
    for setup in chosen:
        result = combine(rounds[setup.name])
        result["rel_acc"] = (
            quality.get((setup.method, setup.fraction)) if setup.method != "none" else {"image": 1.0, "video": 1.0}
        )
        results.append(result)
    by_name = {r["setup"]: r for r in results}
    for setup, r in zip(chosen, results, strict=True):
        r["speedup"] = r["items_per_s"] / by_name["none"]["items_per_s"]
        r["steady_speedup"] = r["steady_items_per_s"] / by_name["none"]["steady_items_per_s"]
        # The FLOPs floor: the speedup if time followed the model's FLOPs (prefill + generation) alone.
        flops = lambda x: x["prefill_gflops_per_item"] + x["generation_gflops_per_item"]  # noqa: E731
        r["flops_ratio"] = flops(by_name["none"]) / flops(r)
        twin = by_name.get(setup.greedy_twin or "")
        r["same_text_as_greedy"] = None if twin is None else r["texts"] == twin["texts"]
    cfg = configs["none"]
    report = {
        "command": "python jobs/benchmark.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine,
        "model": cfg.model.path,
        "twig": twig,
        "geometry": None if not args.geometry else {"name": args.geometry, "width_scale": args.width_scale},
        "seed": args.seed,
        "corpus": corpus,
        "items": results[0]["items"],
        "images": args.images if args.corpus is None else None,
        "videos": args.videos if args.corpus is None else None,
        "task": args.task,
        "max_new_tokens": args.max_new_tokens,
        "actors": cfg.compute.actors,
        "cpus_per_actor": cfg.compute.cpus_per_actor,
        "batch_size": cfg.compute.batch_size,
        "batch_tokens": cfg.compute.batch_tokens,
        "repeats": args.repeats,
        "results": [{k: v for k, v in r.items() if k != "texts"} for r in results],
    }
    (args.out / "benchmark.json").write_text(json.dumps(report, indent=2))
    (args.out / "benchmark.md").write_text(markdown(report))
    plot(report, args.out / "benchmark.png")
    print(markdown(report))
    print(f"wrote {args.out}/benchmark.json, benchmark.md, benchmark.png")
    if any(r["duplicates"] or r["missing"] for r in results) or any(r["same_text_as_greedy"] is False for r in results):
        print("error: a setup lost or duplicated rows, or SSD changed the text", file=sys.stderr)
        sys.exit(1)
    return report


def main(argv: list[str] | None = None) -> int:
    run_benchmark(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
