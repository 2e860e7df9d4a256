"""Quality table: QA accuracy and RelAcc of each pruning method at 1/3, 2/9 and 1/9 of the visual tokens.

Runs the engine on held-out shapes-world items (a seed the model was not trained on), for
images and for videos, with `none` and every registered pruning method (``operators.registry``:
`vispruner`, `fastv`, `random`, `pool` and TwigVLM's twig-guided pruning `ttp`, which needs a twig:
``--twig``, default ``<model>/twig``), and with blank media as a floor. Writes quality.json,
quality.md and quality.png (accuracy against tokens kept).

    python jobs/eval_quality.py --model models/shapes-llava --seed 2026 --out reports/quality

Budgets. R is the visual tokens per frame the language model keeps: in every layer for the
pre-LLM methods (vispruner, random, pool), after layer K for the in-LLM ones (FastV: K=2; TTP:
the twig's K, and FinalWipe drops every visual token from layer K_f on). R-bar is the measured
layer mean per frame (``Result.visual_tokens_layer_mean`` / frames), TwigVLM's budget unit.
The in-LLM methods run at R = the pre-LLM counts (21/14/7 of 64) and also, where they can reach
it, at R-bar = those counts (``pruning.budget_unit=layer_mean``; R from TwigVLM's formula,
``operators.budgets``), FastV then at the twig's K: the comparison TwigVLM's paper makes.

Recomputing only some methods (results are deterministic, so the rows equal a full run's):

    python jobs/eval_quality.py --model models/shapes-llava --seed 2026 --out reports/quality \\
        --methods ttp --merge

runs `none` and the listed methods, replaces those methods' rows in <out>/quality.json (other
rows, blank media included, are kept), checks the recomputed `none` row against the stored one,
and rewrites quality.md and quality.png from the merged json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from evaluation.shapes_qa import accuracy_by_type, answer_questions, relative_accuracy
from operators import registry
from operators.budgets import kept_for_layer_mean, layer_mean
from operators.engine import Engine, EngineConfig
from operators.language_model import text_model
from operators.loading import load_vlm
from operators.twig import load_twig
from synthetic.world import WorldConfig, iter_items

FRACTIONS = {"1/3": 1 / 3, "2/9": 2 / 9, "1/9": 1 / 9}
LAYER_MEAN = "R̄"  # a row budgeted by the layer mean R-bar (pruning.budget_unit=layer_mean)
NO_TWIG = "none"  # --twig none: no twig, no TTP rows


def compared_methods() -> tuple[str, ...]:
    """Every registered pruning method with a budget, in registry order: the table's rows besides `none`."""
    return tuple(name for name in registry.pruning_names() if registry.pruning_spec(name).needs_budget)


@dataclass(frozen=True)
class Run:
    """One row of the table: a method at a budget."""

    method: str
    fraction: str  # "all" or a key of FRACTIONS
    config: EngineConfig
    r_per_frame: int  # R: visual tokens per frame kept (after layer K for in-LLM methods)
    basis: str | None  # in-LLM methods: "R" (budget = R) or "R̄" (budget = the layer mean); else None


def run_engine(engine: Engine, items: list, frames_per_video: int, batch_size: int, blank: bool = False):
    """answer_questions, also keeping the engine's Results (for the measured visual-token counts)."""
    results = []
    generate = engine.generate

    def recording(requests):
        out = generate(requests)
        results.extend(out)
        return out

    engine.generate = recording
    records = answer_questions(engine, items, frames_per_video, blank=blank, batch_size=batch_size)
    return records, results


def measured_per_frame(results: list, patches: int) -> dict[str, float]:
    """Means over questions, per frame: visual tokens kept (after layer K for FastV/TTP) and their layer mean."""
    frames = [max(1, r.visual_tokens_total // patches) for r in results]
    kept = sum(r.visual_tokens_kept / f for r, f in zip(results, frames, strict=True)) / len(results)
    mean = sum(r.visual_tokens_layer_mean / f for r, f in zip(results, frames, strict=True)) / len(results)
    return {"kept_per_frame": round(kept, 3), "layer_mean_per_frame": round(mean, 3)}


def plan_runs(methods, patches: int, model, processor, twig) -> list[Run]:
    """The rows to run, `none` first. Every method at R = each fraction of the patches; the methods that
    prune inside the language model also at R̄ = those counts (pruning.budget_unit=layer_mean), where
    they can reach it: layers 1..K keep every token. FastV's R̄ rows prune at the twig's K when there is
    a twig (TwigVLM compares FastV and TTP at the same K and R̄)."""
    runs = [Run("none", "all", EngineConfig(max_new_tokens=4), patches, None)]
    n_layers = len(text_model(model).layers)
    for method in methods:
        spec = registry.pruning_spec(method)
        if spec.needs_twig and twig is None:
            print(f"  {method}: skipped, no twig (pass --twig DIR; default <model>/twig)", file=sys.stderr)
            continue
        in_llm = spec.acts == registry.IN_LLM
        for name, f in FRACTIONS.items():
            r = max(1, round(patches * f))
            runs.append(Run(method, name, EngineConfig(method, budget=r, max_new_tokens=4), r, "R" if in_llm else None))
        if not in_llm:
            continue
        k = {"fastv_layer": twig.K} if twig is not None and method == "fastv" else {}
        for name, f in FRACTIONS.items():
            target = max(1, round(patches * f))
            config = EngineConfig(method, budget=target, budget_unit="layer_mean", max_new_tokens=4, **k)
            plan = Engine(model, processor, config, twig=twig).layer_plan
            k_end = plan.wipe_layer or n_layers
            r = kept_for_layer_mean(n_layers, plan.prune_layer, k_end, patches, target)
            if r < 1:
                floor = layer_mean(n_layers, plan.prune_layer, k_end, patches, 1)
                print(
                    f"  {method}: R̄ = {target}/frame ({name}) is out of reach: layers 1..K={plan.prune_layer} of "
                    f"{n_layers} keep all {patches} tokens, so R̄ >= {floor:g} with R >= 1",
                    file=sys.stderr,
                )
                continue
            runs.append(Run(method, name, config, r, LAYER_MEAN))
    return runs


def evaluate(
    model,
    processor,
    items: list,
    frames_per_video: int,
    batch_size: int,
    methods=None,
    twig=None,
    blank: bool = True,
) -> list[dict]:
    """Rows for `none`, each method at each budget (in-LLM methods: at R and at R̄, see plan_runs)
    and, with ``blank``, the blank-media floor. RelAcc is against this call's `none` row."""
    patches = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2
    rows = []
    baseline = None
    methods = compared_methods() if methods is None else methods
    for run in plan_runs(methods, patches, model, processor, twig):
        engine = Engine(model, processor, run.config, twig=twig if run.config.needs_twig else None)
        t0 = time.perf_counter()
        records, results = run_engine(engine, items, frames_per_video, batch_size)
        accuracy = accuracy_by_type(records)
        baseline = baseline or accuracy
        row = {
            "method": run.method,
            "fraction": run.fraction,
            "budget_per_frame": run.r_per_frame,
            **measured_per_frame(results, patches),
            "accuracy": accuracy,
            "rel_acc": relative_accuracy(accuracy, baseline),
            "questions": len(records),
            "seconds": round(time.perf_counter() - t0, 1),
        }
        if run.basis is not None:
            row["basis"] = run.basis
        if run.config.needs_twig:
            row.update(twig_K=twig.K, finalwipe_layer=engine.layer_plan.wipe_layer)
        elif run.basis is not None:
            row["prune_layer"] = engine.layer_plan.prune_layer
        rows.append(row)
        label = f"{run.method}{' (R̄)' if run.basis == LAYER_MEAN else ''}"
        print(
            f"  {label:<9} {run.fraction:>4} R {row['budget_per_frame']:>2} R̄ {row['layer_mean_per_frame']:6.2f} "
            f"acc {accuracy['all']:.3f} relacc {row['rel_acc']:.3f}",
            file=sys.stderr,
        )
    if blank:
        records, results = run_engine(
            Engine(model, processor, EngineConfig(max_new_tokens=4)), items, frames_per_video, batch_size, blank=True
        )
        accuracy = accuracy_by_type(records)
        rows.append(
            {
                "method": "blank media",
                "fraction": "-",
                "budget_per_frame": patches,
                **measured_per_frame(results, patches),
                "accuracy": accuracy,
                "rel_acc": relative_accuracy(accuracy, baseline),
                "questions": len(records),
                "seconds": 0,
            }
        )
    return rows


def merge_rows(stored: list[dict], fresh: list[dict], kind: str) -> list[dict]:
    """Stored rows with every method in ``fresh`` replaced by its fresh rows (in place of the old
    ones; a new method goes before blank media). Warns when the fresh `none` differs from the stored."""
    fresh_methods = {r["method"] for r in fresh}
    old_none = next((r for r in stored if r["method"] == "none"), None)
    new_none = next(r for r in fresh if r["method"] == "none")
    if old_none is not None and old_none["questions"] != new_none["questions"]:
        raise SystemExit(
            f"--merge: the stored {kind} rows are over {old_none['questions']} questions, this run's over "
            f"{new_none['questions']}: use the stored run's --images/--videos"
        )
    if old_none is None:
        print(f"{kind}s: no stored `none` row", file=sys.stderr)
    elif old_none["accuracy"] == new_none["accuracy"]:
        print(f"{kind}s: recomputed `none` row equals the stored one", file=sys.stderr)
    else:
        print(
            f"WARNING {kind}s: recomputed `none` differs from the stored one (stored {old_none['accuracy']}, now "
            f"{new_none['accuracy']}): the kept rows' RelAcc is against the stored baseline",
            file=sys.stderr,
        )
    merged, placed = [], set()
    for row in stored:
        method = row["method"]
        if method in fresh_methods:
            if method not in placed:
                merged += [r for r in fresh if r["method"] == method]
                placed.add(method)
            continue
        if method == "blank media":
            merged += [r for r in fresh if r["method"] not in placed]
            placed |= fresh_methods
        merged.append(row)
    merged += [r for r in fresh if r["method"] not in placed]
    return merged


def merge_report(stored: dict, fresh: dict) -> dict:
    """``stored`` (a quality.json) with ``fresh``'s methods replaced kind by kind; refuses another setup."""
    for key in ("model", "seed", "frames_per_video"):
        if stored.get(key) != fresh.get(key):
            raise SystemExit(f"--merge: stored {key}={stored.get(key)!r} but this run has {fresh.get(key)!r}")
    merged = dict(stored)
    merged["results"] = dict(stored["results"])
    for kind, rows in fresh["results"].items():
        merged["results"][kind] = merge_rows(stored["results"].get(kind, []), rows, kind)
    if "twig" in fresh:
        merged["twig"] = fresh["twig"]
    methods = sorted({r["method"] for rows in fresh["results"].values() for r in rows})
    merged["merges"] = [*stored.get("merges", []), {"methods": methods, "command": fresh["command"]}]
    return merged


def _fmt_mean(row: dict) -> str:
    value = row.get("layer_mean_per_frame")
    return "–" if value is None else f"{value:g}"


def markdown(report: dict) -> str:
    out = [
        "Columns: **R/frame** = the budget, visual tokens per frame the language model keeps: in every layer "
        "for `none`, `vispruner`, `random`, `pool` (`pool` keeps at most R: the largest pooled grid that fits); "
        "after layer K for `fastv` (K=2) and `ttp` (the twig's K; FinalWipe drops all visual tokens from "
        "layer K_f on). **R̄/frame** = the measured mean over the language-model layers of the visual tokens "
        "per frame (TwigVLM's budget unit; – where the row predates the column). Rows with kept `x (R̄)` "
        "are budgeted so that R̄ = x of the tokens (`pruning.budget_unit=layer_mean`, R from TwigVLM's formula; "
        "FastV then prunes at the twig's K, as TwigVLM compares the two); the other in-LLM rows keep R = x.",
        "",
    ]
    for kind, rows in report["results"].items():
        types = [t for t in rows[0]["accuracy"] if t != "all"]
        out.append(f"**{kind}s** ({rows[0]['questions']} questions, seed {report['seed']})\n")
        out.append("| method | kept | R/frame | R̄/frame | acc | RelAcc | " + " | ".join(types) + " |")
        out.append("|---|---|---|---|---|---|" + "---|" * len(types))
        for r in rows:
            per_type = " | ".join(f"{r['accuracy'].get(t, float('nan')):.3f}" for t in types)
            kept = f"{r['fraction']} (R̄)" if r.get("basis") == LAYER_MEAN else r["fraction"]
            out.append(
                f"| {r['method']} | {kept} | {r['budget_per_frame']} | {_fmt_mean(r)} | "
                f"{r['accuracy']['all']:.3f} | {r['rel_acc']:.3f} | {per_type} |"
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
        series: dict[str, list[dict]] = {}
        for r in rows:
            if r["method"] not in ("none", "blank media"):
                label = f"{r['method']} at R̄" if r.get("basis") == LAYER_MEAN else r["method"]
                series.setdefault(label, []).append(r)
        for label, method_rows in series.items():
            pts = sorted(((r["budget_per_frame"], r["accuracy"]["all"], r) for r in method_rows), key=lambda p: p[0])
            # At R = all the unpruned model is the line's end, unless some layers still see no visual tokens
            # (FinalWipe) or the budget is a layer mean.
            if not any(r.get("finalwipe_layer") or r.get("basis") == LAYER_MEAN for r in method_rows):
                pts.append((patches, none["accuracy"]["all"], none))
            in_llm = any("basis" in r for r in method_rows)
            name = f"{label} (labels: " + r"$\bar{R}$ per frame)" if in_llm else label
            (line,) = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
            if in_llm:
                for x, y, r in pts:
                    ax.annotate(
                        rf"$\bar{{R}}$ {r['layer_mean_per_frame']:g}",
                        (x, y),
                        textcoords="offset points",
                        xytext=(2, 6),
                        rotation=60,
                        fontsize=7,
                        color=line.get_color(),
                    )
        blank = next((r for r in rows if r["method"] == "blank media"), None)
        if blank is not None:
            ax.axhline(blank["accuracy"]["all"], color="grey", linestyle="--", label="blank media")
        ax.set_title(f"{kind}s: QA accuracy vs visual tokens kept per frame")
        ax.set_xlabel(f"visual tokens kept per frame, R (of {patches}; FastV/TTP: after layer K)")
        ax.set_ylabel("accuracy (normalised exact match)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def resolve_twig(model_source: str, twig_arg: str | None, model):
    """The twig to run TTP with, or None: --twig DIR, else <model>/twig when it exists; --twig none: none."""
    if twig_arg == NO_TWIG:
        return None, None
    path = twig_arg or str(Path(model_source) / "twig")
    if twig_arg is None and not Path(path).is_dir():
        return None, None
    return load_twig(path, model), path


def parse_methods(values: list[str]) -> tuple[str, ...]:
    methods = [m for value in values for m in value.split(",") if m]
    allowed = compared_methods()
    unknown = sorted(set(methods) - set(allowed))
    if unknown:
        raise SystemExit(f"--methods: unknown {', '.join(unknown)}; allowed: {', '.join(allowed)}")
    return tuple(m for m in allowed if m in methods)


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
    parser.add_argument(
        "--twig",
        default=None,
        help="twig directory or URI for ttp (default: <model>/twig if it exists; 'none': no ttp)",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        default=list(compared_methods()),
        help=f"methods to run besides none (default: every registered one: {' '.join(compared_methods())})",
    )
    parser.add_argument(
        "--merge",
        action="store_true",
        help="run none + --methods only and merge their rows into <out>/quality.json (other rows kept)",
    )
    args = parser.parse_args(argv)
    methods = parse_methods(args.methods)
    stored_path = args.out / "quality.json"
    if args.merge and not stored_path.exists():
        raise SystemExit(f"--merge: {stored_path} does not exist (run without --merge first)")

    torch.set_num_threads(args.threads)
    model, processor = load_vlm(args.model)
    needs_twig = any(registry.pruning_spec(m).needs_twig for m in methods)
    twig, twig_path = resolve_twig(args.model, args.twig, model) if needs_twig else (None, None)
    card = json.loads((Path(args.model) / "training_report.json").read_text()) if Path(args.model).is_dir() else {}
    frames = args.frames or card.get("model", {}).get("frames_per_video", 4)
    world = WorldConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in card.get("world", {}).items()})
    report = {"model": str(args.model), "seed": args.seed, "frames_per_video": frames, "results": {}}
    if twig is not None:
        report["twig"] = str(twig_path)
    for kind, count in (("image", args.images), ("video", args.videos)):
        print(f"{kind}s:", file=sys.stderr)
        items = list(iter_items(args.seed, count, kind, world))
        report["results"][kind] = evaluate(
            model, processor, items, frames, args.batch_size, methods, twig, blank=not args.merge
        )
    if args.merge:
        report["command"] = "python jobs/eval_quality.py " + " ".join(argv if argv is not None else sys.argv[1:])
        report = merge_report(json.loads(stored_path.read_text()), report)
    args.out.mkdir(parents=True, exist_ok=True)
    stored_path.write_text(json.dumps(report, indent=2, ensure_ascii=False))
    (args.out / "quality.md").write_text(markdown(report))
    plot(report, args.out / "quality.png")
    print(markdown(report))
    print(f"wrote {args.out}/quality.json, quality.md, quality.png")


if __name__ == "__main__":
    main()
