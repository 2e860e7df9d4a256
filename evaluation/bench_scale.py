"""Scale checks on one machine: a large corpus streamed from a local S3 server, and a local multi-node Ray cluster.

    python jobs/bench_scale.py corpus --videos 10000 --out reports/scale      # ~15 min on 2 cores
    python jobs/bench_scale.py nodes --videos 2000 --out reports/scale         # ~5 min

``corpus``: starts SeaweedFS (``weed mini``, from the dev extra) on 127.0.0.1, writes a synthetic
VideoQA corpus of N videos into it, and runs the caption job over the bucket with Ray's object
store capped, sampling the summed RSS of the driver and every Ray process. Reports items/s, peak
RSS (and how it moved between the first and second half of the run: flat means bounded), object
store spilling as Ray reports it, and the exactly-once check of the output.

``nodes``: ``ray start`` a head and two worker nodes on 127.0.0.1 (one CPU each), then submits the
same job with 1 and with 2 inference actors, and reports items/s for each.

Both write JSON and Markdown under --out. Needs the dev extra (SeaweedFS binary).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from evaluation.measure import PeakMemory
from pipeline.config import load_config

ROOT = Path(__file__).resolve().parent.parent  # the repository

# Short captions keep a 10k-video run within minutes on 2 CPU cores; what is measured here is the
# pipeline's streaming and memory, not caption length.
JOB = [
    "task=caption",
    "pruning.method=vispruner",
    "pruning.budget=7",
    "decode.max_new_tokens=24",
    "compute.batch_size=64",
    "compute.batch_tokens=24576",
    "output.rows_per_file=512",
    "ray.progress_bars=false",
]


def spilled_bytes() -> tuple[int, str]:
    """Bytes Ray spilled from the object store to disk in this session, and its own summary line.

    Ray has no public API for this; ``memory_summary(stats_only=True)`` prints "Spilled N MiB, ..."
    once anything was spilled (nothing printed: nothing spilled).
    """
    import ray
    from ray._private.internal_api import memory_summary

    # The address explicitly: left out, Ray resolves it from its record of the last `ray start`
    # cluster, which may be another, dead one.
    text = memory_summary(address=ray.get_runtime_context().gcs_address, stats_only=True)
    match = re.search(r"Spilled (\d+) MiB", text)
    line = next((ln.strip() for ln in text.splitlines() if "Spilled" in ln), "no spilling reported")
    return (int(match.group(1)) * 2**20 if match else 0), line


def corpus_check(args) -> dict:
    import ray

    from evaluation.s3_server import start_s3_server, stop_s3_server
    from synthetic.corpus import write_corpus

    work = Path(tempfile.mkdtemp(prefix="bench_scale_"))
    server, proc = start_s3_server(work, bucket="scale")
    try:
        options = server.options()
        corpus = server.uri(f"shapes-{args.videos}")
        t = time.perf_counter()
        made = write_corpus(corpus, args.seed, 0, args.videos, storage_options=options, progress=_progress("corpus"))
        print(
            f"[scale] wrote {made['videos']} videos, {made['qa']} QA pairs to {corpus} in {made['seconds']:.0f} s",
            file=sys.stderr,
        )
        storage = [
            f"storage.endpoint_url={server.endpoint_url}",
            f"storage.key={server.key}",
            f"storage.secret={server.secret}",
        ]
        config = load_config(
            args.config,
            [
                *JOB,
                f"input.uri='{corpus}/videos/'",
                "input.kind=prefix",
                f"output.uri='{server.uri('captions')}'",
                *storage,
                *args.overrides,
            ],
        )
        from pipeline.run import run

        ray.init(address="local", object_store_memory=args.object_store_mb * 2**20, logging_level="WARNING")
        with PeakMemory(interval=0.5, exclude=(proc.pid,)) as memory:
            t = time.perf_counter()
            summary = run(config, log=lambda line: print(f"[scale] {line}", file=sys.stderr, flush=True))
            seconds = time.perf_counter() - t
        spilled, spill_line = spilled_bytes()
        ray.shutdown()
        samples = memory.samples
        half = samples[0][0] + (samples[-1][0] - samples[0][0]) / 2 if samples else 0
        first = max((b for s, b in samples if s <= half), default=0)
        second = max((b for s, b in samples if s > half), default=0)
        return {
            "videos": args.videos,
            "corpus_seconds": made["seconds"],
            "corpus_mb": round(made["bytes"] / 1e6, 1),
            "items": summary.items_processed,
            "ok": summary.ok,
            "errors": summary.errors,
            "duplicates": summary.duplicates,
            "missing": summary.missing,
            "seconds": round(seconds, 1),
            "items_per_s": round(summary.items_processed / seconds, 2),
            "stage_seconds": summary.stage_seconds,
            "object_store_mb": args.object_store_mb,
            "peak_rss_mb": round(memory.peak / 2**20),
            "peak_rss_first_half_mb": round(first / 2**20),
            "peak_rss_second_half_mb": round(second / 2**20),
            "spilled_mb": round(spilled / 2**20, 1),
            "spill_report": spill_line,
            "config": " ".join([*JOB, *args.overrides]),
        }
    finally:
        stop_s3_server(proc)
        shutil.rmtree(work, ignore_errors=True)


def _progress(label: str):
    start = time.perf_counter()

    def report(done: int, total: int) -> None:
        if done % 1000 == 0 or done == total:
            print(
                f"[scale] {label}: {done}/{total} ({done / (time.perf_counter() - start):.0f}/s)",
                file=sys.stderr,
                flush=True,
            )

    return report


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def nodes_check(args) -> dict:
    from synthetic.corpus import write_corpus

    work = Path(tempfile.mkdtemp(prefix="bench_nodes_"))
    ray_bin = str(Path(sys.executable).parent / "ray")
    port = _free_port()
    address = f"127.0.0.1:{port}"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    started = []
    try:
        corpus = str(work / "corpus")
        write_corpus(corpus, args.seed, 0, args.videos)
        head = [
            ray_bin,
            "start",
            "--head",
            f"--port={port}",
            "--node-ip-address=127.0.0.1",
            "--num-cpus=1",
            "--num-gpus=0",
            "--include-dashboard=false",
            "--disable-usage-stats",
        ]
        subprocess.run(head, check=True, env=env, capture_output=True, timeout=120)
        started.append("head")
        for _ in range(2):  # two more raylets on this machine: two more "nodes" as far as Ray knows
            worker = [
                ray_bin,
                "start",
                f"--address={address}",
                "--node-ip-address=127.0.0.1",
                "--num-cpus=1",
                "--num-gpus=0",
            ]
            subprocess.run(worker, check=True, env=env, capture_output=True, timeout=120)
            started.append("worker")
        nodes = _alive_nodes(address, env)
        print(f"[scale] local cluster at {address}: {nodes} nodes", file=sys.stderr, flush=True)
        results = []
        for actors in (1, 2):
            out = str(work / f"out-{actors}")
            cmd = [
                sys.executable,
                str(ROOT / "jobs" / "caption.py"),
                "--config",
                args.config,
                "--input",
                f"{corpus}/videos",
                "--output",
                out,
                *JOB,
                f"ray.address={address}",
                f"compute.actors={actors}",
                "compute.cpus_per_actor=1",
                "compute.decode_cpus=0.25",
                "compute.decode_tasks=2",
                "compute.torch_threads=1",  # one thread per actor: two actors share this machine's 2 cores
                *args.overrides,
            ]
            t = time.perf_counter()
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
            if done.returncode != 0:
                raise RuntimeError(f"job with {actors} actor(s) failed ({done.returncode}):\n{done.stderr[-3000:]}")
            record = json.loads(next(Path(out, "_runs").glob("*.json")).read_text())["summary"]
            results.append(
                {
                    "actors": actors,
                    "items": record["items_processed"],
                    "duplicates": record["duplicates"],
                    "missing": record["missing"],
                    "job_seconds": round(record["seconds"], 1),
                    "items_per_s": round(record["items_per_second"], 2),
                    "inference_seconds": record["stage_seconds"].get("inference"),
                    "wall_with_submit_s": round(time.perf_counter() - t, 1),
                }
            )
            print(f"[scale] {actors} actor(s): {results[-1]}", file=sys.stderr, flush=True)
        return {
            "nodes": nodes,
            "address": address,
            "videos": args.videos,
            "results": results,
            "scaling_2_over_1": round(results[1]["items_per_s"] / results[0]["items_per_s"], 2),
        }
    finally:
        if started:
            subprocess.run([ray_bin, "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(work, ignore_errors=True)


def _alive_nodes(address: str, env: dict) -> int:
    code = (
        f"import ray; ray.init(address={address!r}, logging_level='ERROR'); print(sum(n['Alive'] for n in ray.nodes()))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    return int(out.stdout.strip().splitlines()[-1])


def run_check(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("check", choices=["corpus", "nodes"])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--videos", type=int, default=None, help="corpus size (default: 10000 corpus, 2000 nodes)")
    parser.add_argument("--seed", type=int, default=31415)
    parser.add_argument("--object-store-mb", type=int, default=512, help="corpus: Ray object store cap")
    parser.add_argument("--out", type=Path, default=Path("reports/scale"))
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_intermixed_args(argv)
    args.videos = args.videos or (10_000 if args.check == "corpus" else 2000)
    result = corpus_check(args) if args.check == "corpus" else nodes_check(args)
    result.update(
        command="python jobs/bench_scale.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        date=time.strftime("%Y-%m-%d"),
        machine=f"{os.cpu_count()} CPUs",
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.check}.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    bad = (
        result.get("duplicates")
        or result.get("missing")
        or any(r["duplicates"] or r["missing"] for r in result.get("results", []))
    )
    return sys.exit(1) if bad else result


def main(argv: list[str] | None = None) -> int:
    run_check(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
