"""Quality table: QA accuracy and RelAcc of each pruning method at 1/3, 2/9 and 1/9 of the visual tokens.

Runs the engine on held-out shapes-world items (a seed the model was not trained on), for
images and for videos, with `none`, `vispruner`, `fastv`, `random` and `pool`, and with blank
media as a floor. Writes quality.json, quality.md and quality.png (accuracy against tokens kept).

    python jobs/eval_quality.py --model models/shapes-llava --seed 2026 --out reports/quality
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from operators.engine import Engine, EngineConfig  # noqa: E402
from operators.loading import load_vlm  # noqa: E402
from synthetic.evaluate import accuracy_by_type, answer_questions, relative_accuracy  # noqa: E402
from synthetic.world import WorldConfig, iter_items  # noqa: E402

FRACTIONS = {"1/3": 1 / 3, "2/9": 2 / 9, "1/9": 1 / 9}
METHODS = ("vispruner", "fastv", "random", "pool")


def evaluate(model, processor, items: list, frames_per_video: int, batch_size: int) -> list[dict]:
    patches = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2
    runs = [("none", None, "all")] + [
        (m, max(1, round(patches * f)), name) for m in METHODS for name, f in FRACTIONS.items()
    ]
    rows = []
    baseline = None
    for method, budget, fraction in runs:
        engine = Engine(model, processor, EngineConfig(method, budget=budget, max_new_tokens=4))
        t0 = time.perf_counter()
        records = answer_questions(engine, items, frames_per_video, batch_size=batch_size)
        accuracy = accuracy_by_type(records)
        baseline = baseline or accuracy
        rows.append(
            {
                "method": method,
                "fraction": fraction,
                "budget_per_frame": budget or patches,
                "accuracy": accuracy,
                "rel_acc": relative_accuracy(accuracy, baseline),
                "questions": len(records),
                "seconds": round(time.perf_counter() - t0, 1),
            }
        )
        print(
            f"  {method:<9} {fraction:>4} acc {accuracy['all']:.3f} relacc {rows[-1]['rel_acc']:.3f}", file=sys.stderr
        )
    blank = accuracy_by_type(
        answer_questions(
            Engine(model, processor, EngineConfig(max_new_tokens=4)),
            items,
            frames_per_video,
            blank=True,
            batch_size=batch_size,
        )
    )
    rows.append(
        {
            "method": "blank media",
            "fraction": "-",
            "budget_per_frame": patches,
            "accuracy": blank,
            "rel_acc": relative_accuracy(blank, baseline),
            "questions": len(records),
            "seconds": 0,
        }
    )
    return rows


def markdown(report: dict) -> str:
    out = []
    for kind, rows in report["results"].items():
        types = [t for t in rows[0]["accuracy"] if t != "all"]
        out.append(f"**{kind}s** ({rows[0]['questions']} questions, seed {report['seed']})\n")
        out.append("| method | kept | per frame | acc | RelAcc | " + " | ".join(types) + " |")
        out.append("|---|---|---|---|---|" + "---|" * len(types))
        for r in rows:
            per_type = " | ".join(f"{r['accuracy'].get(t, float('nan')):.3f}" for t in types)
            out.append(
                f"| {r['method']} | {r['fraction']} | {r['budget_per_frame']} | {r['accuracy']['all']:.3f} | "
                f"{r['rel_acc']:.3f} | {per_type} |"
            )
        out.append("")
    return "\n".join(out)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(report["results"]), figsize=(6 * len(report["results"]), 4.2), squeeze=False)
    for ax, (kind, rows) in zip(axes[0], report["results"].items(), strict=True):
        none = next(r for r in rows if r["method"] == "none")
        patches = none["budget_per_frame"]
        for method in METHODS:
            pts = sorted((r["budget_per_frame"], r["accuracy"]["all"]) for r in rows if r["method"] == method)
            pts.append((patches, none["accuracy"]["all"]))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
        blank = next(r for r in rows if r["method"] == "blank media")
        ax.axhline(blank["accuracy"]["all"], color="grey", linestyle="--", label="blank media")
        ax.set_title(f"{kind}s: QA accuracy vs visual tokens kept per frame")
        ax.set_xlabel(f"visual tokens kept per frame (of {patches})")
        ax.set_ylabel("accuracy (normalised exact match)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/shapes-llava")
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--images", type=int, default=220, help="held-out images (about 5 questions each)")
    parser.add_argument("--videos", type=int, default=150, help="held-out videos (about 7 questions each)")
    parser.add_argument("--frames", type=int, default=None, help="frames per video (default: the model's)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("reports/quality"))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    model, processor = load_vlm(args.model)
    card = json.loads((Path(args.model) / "training_report.json").read_text()) if Path(args.model).is_dir() else {}
    frames = args.frames or card.get("model", {}).get("frames_per_video", 4)
    world = WorldConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in card.get("world", {}).items()})
    report = {"model": str(args.model), "seed": args.seed, "frames_per_video": frames, "results": {}}
    for kind, count in (("image", args.images), ("video", args.videos)):
        print(f"{kind}s:", file=sys.stderr)
        items = list(iter_items(args.seed, count, kind, world))
        report["results"][kind] = evaluate(model, processor, items, frames, args.batch_size)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quality.json").write_text(json.dumps(report, indent=2))
    (args.out / "quality.md").write_text(markdown(report))
    plot(report, args.out / "quality.png")
    print(markdown(report))
    print(f"wrote {args.out}/quality.json, quality.md, quality.png")


if __name__ == "__main__":
    main()
