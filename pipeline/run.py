"""The driver: preflight checks, resume, the Ray Data plan, and the final summary.

Plan: work rows (driver) → ``decode_batch`` (CPU tasks) → ``InferenceStage`` (actor pool, GPUs)
→ ``write_batch`` (CPU tasks, one atomic Parquet part per batch) → per-part summaries streamed
back to the driver. Nothing but the summaries returns to the driver, so memory stays bounded.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field, replace

import pyarrow as pa

from pipeline import cluster, exit_status, resume, storage
from pipeline import lease as leases
from pipeline.config import Config, ConfigError
from pipeline.console import without_known_noise
from pipeline.faults import RetryPolicy, StorageUnavailable, with_retries
from pipeline.models import ModelInfo, check_model
from pipeline.progress import ProgressReporter
from pipeline.resume import check_retry_kinds
from pipeline.schema import WORK_FIELDS
from pipeline.sources import check_input, load_work_rows
from pipeline.write import write_batch


@dataclass
class Summary:
    run_id: str
    output: str
    config_fingerprint: str
    items_total: int  # work rows of the input
    items_skipped: int  # already written by an earlier run with this config
    items_processed: int = 0
    ok: int = 0
    errors: int = 0
    error_kinds: dict[str, int] = field(default_factory=dict)
    parts: int = 0
    seconds: float = 0.0
    items_per_second: float = 0.0
    generated_tokens: int = 0
    generated_tokens_per_second: float = 0.0
    mean_visual_tokens_kept: float | None = None
    mean_visual_tokens_total: float | None = None
    # Time summed over items (or parts, for writing) per stage; stages overlap, so these can exceed `seconds`.
    stage_seconds: dict[str, float] = field(default_factory=dict)
    # Speculative decoding (SSD), summed over this run's rows that have draft counts; ratios None without SSD.
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    draft_rounds: int = 0
    ssd_generated_tokens: int = 0  # generated tokens of those rows
    acceptance: float | None = None  # accepted / drafted
    tokens_per_round: float | None = None  # generated / rounds
    # QA rows of this run with a reference answer; accuracy None when there are none.
    answers_scored: int = 0
    answers_correct: int = 0  # normalised exact match (evaluation.scoring.is_correct); errors count as wrong
    accuracy: float | None = None
    rows_for_config: int = 0  # after the run: rows under the output with this fingerprint
    duplicates: int = 0  # item ids written twice for this config (must be 0)
    missing: int = 0  # input items with no row for this config (must be 0)
    items_redone: int = 0  # of the items processed: earlier error rows redone (retryable, or --retry-errors)
    superseded: int = 0  # older rows of redone items removed from their parts (pipeline.resume)
    errors_for_config: int = 0  # input items whose current row is an error, after the run
    retryable_errors: int = 0  # of those: retryable ones (a rerun redoes them)
    error_rate: float = 0.0  # errors_for_config / items_total

    def add_part(self, part: dict) -> None:
        """Add one part summary (schema.PART_SUMMARY) to the counts; ratios come from :meth:`derive`."""
        self.parts += 1
        self.ok += part["ok"]
        self.errors += part["rows"] - part["ok"]
        self.generated_tokens += part["generated_tokens"]
        self.drafted_tokens += part["drafted_tokens"]
        self.accepted_tokens += part["accepted_tokens"]
        self.draft_rounds += part["draft_rounds"]
        self.ssd_generated_tokens += part["ssd_generated_tokens"]
        self.answers_scored += part["answers_scored"]
        self.answers_correct += part["answers_correct"]

    def derive(self) -> None:
        """The ratios, from the summed counts: exact over the run, not an average of per-part ratios."""
        self.items_processed = self.ok + self.errors
        self.acceptance = self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else None
        self.tokens_per_round = self.ssd_generated_tokens / self.draft_rounds if self.draft_rounds else None
        self.accuracy = self.answers_correct / self.answers_scored if self.answers_scored else None

    def lines(self) -> list[str]:
        kept = "n/a" if self.mean_visual_tokens_kept is None else f"{self.mean_visual_tokens_kept:.1f}"
        total = "n/a" if self.mean_visual_tokens_total is None else f"{self.mean_visual_tokens_total:.1f}"
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(self.error_kinds.items())) or "none"
        per_item = {k: 1000.0 * v / max(1, self.items_processed) for k, v in self.stage_seconds.items()}
        stages = (
            f"  per item: decode {per_item.get('decode', 0):.0f} ms, inference {per_item.get('inference', 0):.0f} ms "
            f"(prefill {per_item.get('prefill', 0):.0f}, generate {per_item.get('generate', 0):.0f}), "
            f"write {per_item.get('write', 0):.1f} ms"
        )
        lines = [
            f"run {self.run_id}: {self.items_processed} items in {self.seconds:.1f} s "
            f"({self.items_per_second:.2f} items/s); {self.items_skipped} already done, skipped",
            f"  ok {self.ok}, error {self.errors} ({kinds})",
            f"  visual tokens kept per item: {kept} of {total}",
            f"  generated {self.generated_tokens} tokens ({self.generated_tokens_per_second:.1f} tokens/s)",
        ]
        # Only the lines that apply: SSD ran (rows with draft rounds), QA rows had reference answers.
        if self.acceptance is not None or self.tokens_per_round is not None:
            acceptance = "n/a" if self.acceptance is None else f"{self.acceptance:.1%}"
            per_round = "n/a" if self.tokens_per_round is None else f"{self.tokens_per_round:.2f}"
            lines.append(
                f"  speculative decoding: acceptance {acceptance} ({self.accepted_tokens} of "
                f"{self.drafted_tokens} drafted tokens), {per_round} tokens per round ({self.draft_rounds} rounds)"
            )
        if self.accuracy is not None:
            lines.append(
                f"  accuracy: {self.accuracy:.3f} ({self.answers_correct} of {self.answers_scored} answers match "
                "the reference after normalisation; rows in error count as wrong)"
            )
        if self.items_redone or self.superseded:
            lines.append(
                f"  redone: {self.items_redone} items that had an error row; {self.superseded} older rows replaced"
            )
        return [
            *lines,
            stages,
            f"  output: {self.output} ({self.rows_for_config} rows for config {self.config_fingerprint}, "
            f"{self.duplicates} duplicated, {self.missing} missing; {self.errors_for_config} items in error, "
            f"{self.retryable_errors} of them retryable)",
        ]


def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


def retry_policy(config: Config) -> RetryPolicy:
    """How the driver retries transient storage errors (the ``storage.retry_*`` keys)."""
    return RetryPolicy.from_storage(config.storage.model_dump())


def options_for(uri: str, config: Config) -> dict:
    return storage.fsspec_options(uri, **config.storage.model_dump())


def preflight(config: Config) -> ModelInfo:
    """Fail fast, before Ray starts: paths set, output writable (checked, not created), input
    readable, model runnable. Raises ConfigError, SourceError or OSError with one line naming the
    problem; returns the model's ``ModelInfo``.

    The model check (``pipeline.models.check_model``) may set ``config.decode.twig`` to the model's
    ``twig/`` (object-store and hub models), so it runs before the fingerprint is taken.
    """
    config.require_paths()
    try:
        storage.check_access(config.output.uri, options_for(config.output.uri, config), write=True)
    except (NotADirectoryError, FileExistsError, PermissionError) as e:
        raise ConfigError(f"output.uri: {e}") from None
    check_input(config, options_for(config.input.uri, config))
    return check_model(config)


def init_ray(config: Config) -> None:
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        return
    # Under `ray job submit` RAY_ADDRESS is set and ray.init() joins that cluster. Run directly,
    # it joins ray.address, else a live local cluster started by `ray start`, else starts one.
    address = config.ray.address or os.environ.get("RAY_ADDRESS") or live_local_cluster() or "local"
    if address == "local" and ray is None:
        # A cluster of our own: Ray turns token authentication on by default and warns on every start
        # that it did. Choosing it explicitly gives the same cluster without the warning; a user's own
        # RAY_AUTH_MODE (e.g. disabled) still wins. Ray reads the variable when it is imported, so
        # only before then (set later, the driver and its new cluster would disagree and not connect).
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    import ray

    # log_to_driver stays on: tracebacks and warnings from decode tasks and actors must reach the user.
    ray.init(address=address, logging_level="WARNING", log_to_driver=True)
    # A cluster of our own is recorded, so that a run after a SIGKILL can stop what it left; one we
    # joined (RAY_ADDRESS, ray.address, `ray start`) never is. Also puts back our signal handlers.
    cluster.after_init(started_local=address == "local")


def live_local_cluster() -> str | None:
    """The address of a cluster `ray start` left on this machine, if its GCS still answers.

    ray.init() alone would follow Ray's record of the last such cluster even when that cluster
    is dead (killed without `ray stop`), and wait on it for minutes.
    """
    record = os.path.join(os.environ.get("RAY_TMPDIR", tempfile.gettempdir()), "ray", "ray_current_cluster")
    try:
        address = open(record).read().strip()
        host, port = address.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=1):
            return address
    except (OSError, ValueError):
        return None


def ray_bars_shown(config: Config) -> bool:
    """Whether Ray Data draws its progress bars: asked for, stdout a terminal (Ray's own test) and
    stderr one too (the bars go there; in a log file they are noise)."""
    return config.ray.progress_bars and sys.stdout.isatty() and sys.stderr.isatty()


def driver_progress_interval(config: Config) -> float | None:
    """Seconds between the driver's progress lines; None when Ray Data's bars show progress instead."""
    return None if ray_bars_shown(config) else config.ray.progress_interval_s


def quiet_ray_data_console() -> None:
    """Keep Ray Data's INFO lines (execution plan, "Total Progress", "execution finished") off the
    console; they still go to ray-data.log in the session's logs, and warnings and errors still print.

    Only the handler Ray Data's default logging config names "console" is touched, so a user's own
    RAY_DATA_LOGGING_CONFIG is left as it is.
    """
    if os.environ.get("RAY_DATA_LOGGING_CONFIG"):
        return
    for handler in logging.getLogger("ray.data").handlers:
        if handler.get_name() == "console":
            handler.setLevel(max(handler.level, logging.WARNING))


def build_plan(work: list[dict], config: Config, run_id: str):
    """The Ray Data pipeline over ``work`` (lazy)."""
    import ray

    compute = config.compute
    ctx = ray.data.DataContext.get_current()
    # Ray Data chooses bars or log lines by stdout alone: off a terminal it logs "Total Progress" at INFO
    # every 10 s, which quiet_ray_data_console keeps in ray-data.log. So bars are switched off only where
    # Ray would draw them; switched off elsewhere, Ray warns "Progress bars disabled" on every run.
    ctx.enable_progress_bars = ray_bars_shown(config) or not sys.stdout.isatty()
    ctx.enable_operator_progress_bars = ctx.enable_progress_bars  # one off and the other on: another warning
    quiet_ray_data_console()
    blocks = max(1, math.ceil(len(work) / compute.decode_batch_size))
    table = pa.Table.from_pylist(work, schema=pa.schema(WORK_FIELDS))
    ds = add_model_stages(ray.data.from_arrow(table).repartition(blocks), config, run_id)
    return ds.map_batches(
        write_batch,
        fn_kwargs={"output_uri": config.output.uri, "storage_config": config.storage.model_dump()},
        batch_format="pyarrow",
        batch_size=config.output.rows_per_file,
        num_cpus=0.25,  # I/O-bound; don't hold a whole core away from decode
    )


def add_model_stages(ds, config: Config, run_id: str):
    """``ds`` (work rows, ``schema.WORK_FIELDS``) through the CPU decode tasks and the inference
    actor pool: output rows (``schema.SCHEMA``), not yet written. Lazy."""
    from ray.data import ActorPoolStrategy, TaskPoolStrategy

    from pipeline.decode import decode_batch
    from pipeline.inference import InferenceStage

    compute = config.compute
    storage_config = config.storage.model_dump()
    ds = ds.map_batches(
        decode_batch,
        fn_kwargs={"media": config.media, "storage_config": storage_config},
        batch_format="pyarrow",
        batch_size=compute.decode_batch_size,
        compute=TaskPoolStrategy(size=compute.decode_tasks) if compute.decode_tasks else None,
        num_cpus=compute.decode_cpus,
        # max_calls=0 (unlimited) keeps worker processes, and the decode child each one holds,
        # alive across tasks. Said explicitly, it also makes the stage's remote args differ from
        # the actors', which keeps Ray from fusing decoding into the GPU actors (it fuses a task
        # stage into a following actor stage whenever their requests match).
        max_calls=0,
    )
    return ds.map_batches(
        InferenceStage,
        fn_constructor_kwargs={"config": config, "storage_config": storage_config, "run_id": run_id},
        batch_format="pyarrow",
        batch_size=compute.batch_size,
        num_gpus=compute.gpus_per_actor,
        num_cpus=compute.cpus_per_actor,
        compute=ActorPoolStrategy(
            size=compute.actors, max_tasks_in_flight_per_actor=compute.max_tasks_in_flight_per_actor
        ),
    )


@dataclass
class Prepared:
    """What a run will do, found on the driver before any cluster work (``prepare``)."""

    config: Config
    run_id: str
    fingerprint: str
    work: list[dict]  # every work row of the input
    done: set[str]  # item ids already written for this config
    todo: list[dict]  # work rows still to do, grouped by media type
    model: object | None = None  # what preflight learnt of the model (pipeline.models.ModelInfo)

    @property
    def counts(self) -> dict[str, int]:
        return {"total": len(self.work), "done": len(self.work) - len(self.todo), "todo": len(self.todo)}


def prepare(config: Config) -> Prepared:
    """Preflight checks, the work rows and the resume set: everything a run knows before Ray starts.
    Reads only; nothing is written. Raises ConfigError, SourceError or OSError."""
    policy = retry_policy(config)
    # A storage outage as the run starts is waited out like one during the run (storage.retry_*):
    # only transient errors (connection refused or reset, timeouts, 5xx) are retried; a wrong
    # bucket, key or path fails at once.
    model, _ = with_retries(lambda: preflight(config), policy, "checking the input, output and model")
    fingerprint = config.fingerprint()
    work, _ = with_retries(
        lambda: load_work_rows(config, options_for(config.input.uri, config)), policy, "listing the input"
    )
    retry_kinds = check_retry_kinds(config.output.retry_errors)
    options = options_for(config.output.uri, config)
    done, _ = resume.done_items(config.output.uri, fingerprint, options, retry_kinds, policy)
    # Grouped by media type, so engine batches hold prompts of similar length (images apart from videos).
    todo = sorted((row for row in work if row["item_id"] not in done), key=lambda row: row["media_type"] or "")
    return Prepared(config, new_run_id(), fingerprint, work, {r["item_id"] for r in work} & done, todo, model)


def execute(prepared: Prepared, log=print) -> Summary:
    """Run what ``prepare`` found: Ray starts only when there is work. Returns (and writes under
    _runs/) the summary. With work to do, the output's lease for this config is taken first: a run
    of the same config already writing this output raises ``lease.LeaseHeld`` before anything starts."""
    config = prepared.config
    out_options = options_for(config.output.uri, config)
    if not prepared.todo:
        return _execute(prepared, out_options, None, log)
    with leases.acquire(config.output.uri, prepared.fingerprint, out_options, prepared.run_id, log=log) as lease:
        # prepare() may have read the output while the lease's last holder still wrote to it.
        return _execute(refresh(prepared), out_options, lease, log)


def refresh(prepared: Prepared) -> Prepared:
    """``prepared`` with the items written since ``prepare`` read the output taken off its to-do list."""
    config = prepared.config
    retry_kinds = check_retry_kinds(config.output.retry_errors)
    options = options_for(config.output.uri, config)
    done, _ = resume.done_items(config.output.uri, prepared.fingerprint, options, retry_kinds, retry_policy(config))
    todo = [row for row in prepared.todo if row["item_id"] not in done]
    return replace(prepared, done={row["item_id"] for row in prepared.work} & done, todo=todo)


def _execute(prepared: Prepared, out_options: dict, lease: leases.Lease | None, log) -> Summary:
    config, work, todo, run_id = prepared.config, prepared.work, prepared.todo, prepared.run_id
    summary = Summary(run_id, config.output.uri, prepared.fingerprint, len(work), len(work) - len(todo))
    # Rows a killed run had already superseded but not yet removed go first (one current row per item).
    policy = retry_policy(config)
    resume.drop_superseded(config.output.uri, prepared.fingerprint, out_options, policy)
    index = resume.read_index(config.output.uri, prepared.fingerprint, out_options, policy)
    written_before = {row["item_id"] for row in index}
    summary.items_redone = sum(1 for row in todo if row["item_id"] in written_before)
    log(
        f"run {run_id}: {len(work)} items from {config.input.uri}; {summary.items_skipped} already in "
        f"{config.output.uri} for config {prepared.fingerprint}; {len(todo)} to do"
    )
    start = time.perf_counter()
    if todo:
        cluster.cleanup_leftovers(log=log)  # what a SIGKILLed earlier run's cluster left running
        init_ray(config)
        check = lease.check if lease is not None else None
        with without_known_noise():  # Ray core's false alarm about the actor pool (pipeline.console)
            plan = build_plan(todo, config, run_id)
            summary = consume(plan, summary, driver_progress_interval(config), log, check=check)
        if lease is not None:
            lease.check()  # taken over mid-run: the other run owns the output's summary now
    summary.seconds = time.perf_counter() - start
    finish(summary, work, out_options, policy)
    write_run_record(config, summary, out_options)
    for line in summary.lines():
        log(line)
    return summary


def describe(prepared: Prepared) -> list[str]:
    """What a run would do (``--dry-run``): the lines printed, nothing started or written."""
    config, counts = prepared.config, prepared.counts
    kinds = Counter(row["media_type"] or "unknown type" for row in prepared.work)
    media = ", ".join(
        f"{n} {kind}{'s' if n != 1 and kind != 'unknown type' else ''}" for kind, n in sorted(kinds.items())
    )
    engine = config.to_engine_config()
    lines = [
        "dry run: everything checked; nothing started, nothing written",
        f"config: fingerprint {prepared.fingerprint}; task {config.task}, pruning {engine.pruning_method}"
        + (f" (budget {engine.budget} {engine.budget_unit})" if engine.budget is not None else "")
        + f", decode {engine.decode_strategy}, max {engine.max_new_tokens} new tokens",
        f"input: {config.input.uri}: {counts['total']} items ({media or 'none'})",
        f"output: {config.output.uri}: {counts['done']} already done for this config, {counts['todo']} to do",
    ]
    lines.extend(describe_model(prepared))
    compute = config.compute
    lines.append(
        f"a run would start Ray with {compute.actors} inference actor(s) x {compute.gpus_per_actor:g} GPU, "
        f"batches of {compute.batch_size}"
        if counts["todo"]
        else "a run would not start Ray: nothing to do"
    )
    return lines


def describe_model(prepared: Prepared) -> list[str]:
    """The model line of a dry run: its type and visual tokens per item, before and after pruning."""
    config, info = prepared.config, prepared.model
    if info is None:
        return [f"model: {config.model.path}"]
    per_image = getattr(info, "visual_tokens_per_image", None)
    line = f"model: {config.model.path}: model_type {info.model_type}"
    if per_image:
        frames = config.media.num_frames
        line += f"; visual tokens per image {per_image}, per video {frames} frames x {per_image} = {frames * per_image}"
        engine = config.to_engine_config()
        if engine.budget is not None and engine.budget_unit == "kept":
            line += f"; pruning keeps {min(engine.budget, per_image)} per image/frame"
    twig = getattr(info, "twig", None) or config.decode.twig
    if twig and config.to_engine_config().needs_twig:
        line += f"; twig {twig}"
    return [line]


def run(config: Config, log=print) -> Summary:
    """Run the job described by ``config`` (the Python API: ``run(load_config(path, overrides))``)."""
    return execute(prepare(config), log)


def consume(ds, summary: Summary, progress_interval_s: float | None = None, log=print, check=None) -> Summary:
    """Add up the per-part summaries the plan streams back; ``log`` a progress line every
    ``progress_interval_s`` seconds meanwhile (None: none, e.g. when Ray Data's bars show). ``check``
    (the lease's) is called after each batch of parts: it raises to stop the run."""
    kept = total = 0.0
    kinds: Counter = Counter()
    stages: Counter = Counter()
    stage_columns = {
        "decode": "decode_ms",
        "inference": "latency_ms",
        "prefill": "prefill_ms",
        "generate": "generate_ms",
        "write": "write_ms",
    }
    todo = summary.items_total - summary.items_skipped
    with ProgressReporter(todo, progress_interval_s, emit=log) as progress:
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            if check is not None:
                check()
            for part in batch.to_pylist():
                if part["write_error"]:
                    raise write_failure(part)
                summary.add_part(part)
                progress.add(part["ok"], part["rows"] - part["ok"])
                kinds.update(json.loads(part["error_kinds"]))
                kept += part["visual_tokens_kept"]
                total += part["visual_tokens_total"]
                for stage, column in stage_columns.items():
                    stages[stage] += part[column] / 1000.0
    summary.derive()
    summary.error_kinds = dict(kinds)
    summary.stage_seconds = {stage: round(stages[stage], 3) for stage in stage_columns}
    if summary.ok:
        summary.mean_visual_tokens_kept = kept / summary.ok
        summary.mean_visual_tokens_total = total / summary.ok
    return summary


def write_failure(part: dict) -> OSError:
    """The error a part summary reports (``write_batch`` could not write its part), raised on the driver."""
    if part["write_fault"] == "storage":
        return StorageUnavailable(part["write_error"])
    if not part["write_errno"]:
        return OSError(part["write_error"])
    return OSError(part["write_errno"], part["write_error"].removeprefix(f"[Errno {part['write_errno']}] "))


def finish(summary: Summary, work: list[dict], options: dict, policy: RetryPolicy | None = None) -> None:
    """Rates, plus the exactly-once check against what is now under the output."""
    if summary.seconds > 0:
        summary.items_per_second = summary.items_processed / summary.seconds
        summary.generated_tokens_per_second = summary.generated_tokens / summary.seconds
    summary.superseded = resume.drop_superseded(summary.output, summary.config_fingerprint, options, policy)
    index = resume.read_index(summary.output, summary.config_fingerprint, options, policy)
    counts = Counter(row["item_id"] for row in index)
    summary.rows_for_config = len(index)
    summary.duplicates = sum(n - 1 for n in counts.values() if n > 1)
    summary.missing = sum(1 for row in work if row["item_id"] not in counts)
    current = resume.current_rows(index)
    wanted = [current[row["item_id"]] for row in work if row["item_id"] in current]
    summary.errors_for_config = sum(row["status"] != "ok" for row in wanted)
    summary.retryable_errors = sum(row["status"] != "ok" and bool(row["retryable"]) for row in wanted)
    summary.error_rate = summary.errors_for_config / len(work) if work else 0.0


def write_run_record(config: Config, summary: Summary, options: dict) -> None:
    record = {"summary": asdict(summary), "config": config.model_dump(exclude={"storage": {"key", "secret"}})}
    uri = storage.join(config.output.uri, "_runs", f"{summary.run_id}.json")
    storage.write_bytes_atomic(uri, json.dumps(record, indent=2).encode(), options)


def main_exit_code(summary: Summary, max_error_rate: float | None = None) -> int:
    """The exit status of a run that finished (``pipeline.exit_status``), with one ``error:`` line
    on stderr when it is not 0. Rows in error count as written; retryable ones ask for a rerun."""
    if summary.duplicates or summary.missing:
        print(
            f"error: output is not exactly one row per item ({summary.duplicates} duplicated, "
            f"{summary.missing} missing); rerun the same command to fill the gaps",
            file=sys.stderr,
        )
        return exit_status.INCOMPLETE
    if summary.retryable_errors:
        print(
            f"error: {summary.retryable_errors} items still failed after retries with transient errors "
            f"(storage or network); rerun the same command to retry them",
            file=sys.stderr,
        )
        return exit_status.INFRASTRUCTURE
    if max_error_rate is not None and summary.error_rate > max_error_rate:
        print(
            f"error: {summary.errors_for_config} of {summary.items_total} items ({summary.error_rate:.1%}) are "
            f"errors, over output.max_error_rate {max_error_rate:g}; see their error_kind and error columns",
            file=sys.stderr,
        )
        return exit_status.TOO_MANY_ERRORS
    return exit_status.OK
