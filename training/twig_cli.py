"""Train a TwigVLM twig on a frozen base VLM and write it next to the model (or anywhere).

    # the committed demo twig (shapes world generated in memory; held-out: items of the same seed after the
    # training ones); about 5 minutes on 2 CPU cores
    python jobs/train_twig.py --model models/shapes-llava --out models/shapes-llava/twig --K 1 --T 1 \
        --seed 1111 --images 4000 --videos 1000 --steps 600 --batch-size 16 --lr 1e-3 --distill 10
    # a corpus written by jobs/make_corpus.py
    python jobs/train_twig.py --model models/shapes-llava --corpus /tmp/shapes --out /tmp/twig
    # LLaVA-665K on a cluster: Ray Train, 8 GPU workers, DDP on the twig
    python jobs/train_twig.py --model s3://bucket/llava-1.5-7b-hf/ --llava-json llava_v1_5_mix665k.json \\
        --image-folder s3://bucket/llava-data/ --out s3://bucket/twigs/llava-1.5-7b-K2-T3 \\
        --K 2 --T 3 --lr 1e-4 --batch-size 16 --steps 5200 --ray-workers 8 --use-gpu

The base is frozen; the twig (base layers K+1..K+T, norm and head copied) learns next-token
prediction on the assistant's tokens of every turn (all visual tokens kept), plus, with --distill W,
W times KL(base || twig) on those tokens. On a base of L layers K + T must stay below L: with
K + T == L the twig starts as the rest of the base (agreement 1.0, no saving). Writes twig.safetensors
and twig.json (``operators.twig.save_twig``) under --out, and training_report.json beside them:
command, seconds, steps, losses, and the held-out twig/base argmax agreement on answer tokens
(reference answers, and the base's own greedy captions) before and after training: the expected
per-token draft acceptance of self-speculative decoding.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

from training.train_twig import REPORT_NAME, TwigTrainConfig, frames_per_video_of, read_text, run_job, write_text

ROOT = Path(__file__).resolve().parent.parent  # the repository


def log(message: str) -> None:
    print(f"[train_twig] {message}", file=sys.stderr, flush=True)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/shapes-llava", help="base checkpoint directory or URI")
    parser.add_argument("--out", help="twig directory or URI (default: <model>/twig)")
    parser.add_argument("--K", type=int, default=2, help="base layer (1-indexed) the twig grows on")
    parser.add_argument("--T", type=int, default=None, help="twig layers (default: min(3, layers - K - 1), at least 1)")
    data = parser.add_argument_group("data (one source)")
    data.add_argument("--corpus", help="a shapes-world corpus from jobs/make_corpus.py (dir or URI)")
    data.add_argument("--llava-json", help="LLaVA-665K-style conversation JSON")
    data.add_argument("--image-folder", help="where --llava-json's image paths are relative to (dir or URI)")
    data.add_argument("--seed", type=int, default=1111, help="seed of the generated shapes world (and of training)")
    data.add_argument("--images", type=int, default=4000, help="generated image items")
    data.add_argument("--videos", type=int, default=1000, help="generated video items")
    data.add_argument(
        "--qa-per-item", type=int, default=1, help="QA pairs per shapes item besides its caption (-1: all)"
    )
    data.add_argument("--frames-per-video", type=int, help="default: the model's training_report.json, else 8")
    data.add_argument("--pad-to-square", action="store_true", help="LLaVA-1.5's pad-to-square preprocessing")
    ev = parser.add_argument_group("held-out evaluation")
    ev.add_argument("--eval-images", type=int, default=48, help="generated data: held-out image items")
    ev.add_argument("--eval-videos", type=int, default=16, help="generated data: held-out video items")
    ev.add_argument("--eval-percent", type=float, default=2.0, help="corpus / JSON: share of items held out")
    ev.add_argument("--eval-max", type=int, default=2000, help="at most this many held-out conversations")
    ev.add_argument("--eval-generated", type=int, default=32, help="held-out captions the base generates for agreement")
    ev.add_argument("--max-new-tokens", type=int, default=160, help="limit of those greedy captions")
    parser.add_argument(
        "--draft-vocab",
        type=int,
        default=0,
        help="restrict the twig's head to the N tokens the base outputs most often on the training data "
        "(FR-Spec / EAGLE-3 draft vocabulary; EOS always kept); 0: the full vocabulary",
    )
    parser.add_argument(
        "--base-features",
        action="store_true",
        help="the twig also reads the base's final state at the previous token (EAGLE's feature input): SSD gives "
        "it for the first draft of each round",
    )
    parser.add_argument(
        "--feature-drop",
        type=float,
        default=TwigTrainConfig.feature_drop,
        help="--base-features: the fraction of positions trained without them, as SSD's later drafts run",
    )
    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--steps", type=int, default=300)
    opt.add_argument("--batch-size", type=int, default=16, help="conversations per step and worker")
    opt.add_argument("--lr", type=float, default=1e-3)
    opt.add_argument("--warmup", type=int, default=20)
    opt.add_argument("--log-every", type=int, default=10)
    opt.add_argument(
        "--distill",
        type=float,
        default=0.0,
        help="add this weight times KL(base || twig) to the answer cross-entropy (TwigVLM++'s PredKL uses 0.1; "
        "TwigVLM 0); costs a whole base forward per step",
    )
    run = parser.add_argument_group("compute")
    run.add_argument("--threads", type=int, default=2, help="torch CPU threads (per worker)")
    run.add_argument("--device", default=None, help="cpu / cuda (default: cuda if available)")
    run.add_argument("--dtype", default="auto", help="base dtype: auto / float32 / bfloat16")
    run.add_argument("--ray-workers", type=int, default=0, help="train through Ray Train with this many DDP workers")
    run.add_argument("--use-gpu", action="store_true", help="one GPU per Ray worker")
    run.add_argument(
        "--ray-address",
        default=None,
        help="Ray cluster to join; 'local' starts a fresh one (default: RAY_ADDRESS, a live `ray start` cluster, "
        "else a fresh local one)",
    )
    run.add_argument("--ray-storage", default=None, help="Ray Train storage_path (default: a temporary directory)")
    args = parser.parse_args(argv)
    if args.corpus and args.llava_json:
        parser.error("give one of --corpus and --llava-json")
    if args.draft_vocab < 0:
        parser.error("--draft-vocab must be >= 0")
    if args.ray_workers < 0:
        parser.error("--ray-workers must be >= 0")
    if not 0.0 <= args.feature_drop < 1.0:
        parser.error("--feature-drop must be in [0, 1)")
    return args


def options_from(args: argparse.Namespace, command: str) -> dict:
    model = args.model
    options = {k: v for k, v in vars(args).items() if not k.startswith("ray_") and k != "use_gpu"}
    options["out"] = args.out or f"{model.rstrip('/')}/twig"
    options["frames_per_video"] = args.frames_per_video or frames_per_video_of(model)
    options["device"] = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    options["command"] = command
    return options


def run_ray(args: argparse.Namespace, options: dict) -> dict:
    """The same job through ray.train.torch.TorchTrainer: N workers, DDP on the twig, data sharded by rank."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from training.train_twig import ray_worker_loop

    if not ray.is_initialized():
        # As the caption job does: --ray-address, RAY_ADDRESS (`ray job submit`), a live `ray start` cluster,
        # else a fresh local one (plain ray.init() would follow a stale record of a dead cluster). A fresh
        # local cluster gets the repository on its workers' path; a joined one has the job's working_dir.
        from pipeline.run import live_local_cluster

        address = args.ray_address or os.environ.get("RAY_ADDRESS") or live_local_cluster() or "local"
        runtime_env = {"env_vars": {"PYTHONPATH": str(ROOT)}} if address == "local" else None
        ray.init(address=address, runtime_env=runtime_env, include_dashboard=False, log_to_driver=True)
    if not args.use_gpu:
        options = {**options, "device": "cpu"}
    storage = args.ray_storage or tempfile.mkdtemp(prefix="train_twig-ray-")
    trainer = TorchTrainer(
        ray_worker_loop,
        train_loop_config=options,
        scaling_config=ScalingConfig(
            num_workers=args.ray_workers,
            use_gpu=args.use_gpu,
            resources_per_worker=None if args.use_gpu else {"CPU": 1},
        ),
        run_config=RunConfig(name=f"train_twig-{int(time.time())}", storage_path=storage),
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    return json.loads(read_text(f"{options['out'].rstrip('/')}/{REPORT_NAME}"))  # rank 0 wrote it


def train(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    command = "python jobs/train_twig.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    options = options_from(args, command)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    if args.ray_workers:
        report = run_ray(args, options)
    else:
        report = run_job(options, log)
    report = {
        "command": command,
        "seconds": round(time.perf_counter() - started, 1),
        "threads": args.threads,
        "torch": torch.__version__,
        "ray_workers": args.ray_workers,
        **report,
    }
    out = options["out"].rstrip("/")
    write_text(f"{out}/{REPORT_NAME}", json.dumps(report, indent=2) + "\n")
    held = report["held_out"]["all"]
    before = report["held_out_before"]["all"]["twig_base_agreement"]
    log(
        f"done in {report['seconds']:.0f}s: final loss {report['train']['final_loss']:.4f}, held-out twig/base "
        f"agreement {held['twig_base_agreement']:.4f} (at init {before:.4f}); twig written to {out}"
    )
    return report


def main(argv: list[str] | None = None) -> int:
    train(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
