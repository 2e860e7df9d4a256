"""The job's command lines: ``vlm-batch caption|videoqa|validate`` (also ``jobs/caption.py``,
``jobs/videoqa.py``, ``vlm-caption``, ``vlm-videoqa``). Each prints its own usage with ``--help``.

Every outcome has one exit status (``EXIT_*`` below, tabled in the README) and, when it is not
success, one ``error:`` line on stderr naming the cause and the next step; a failure nobody
foresaw also writes its traceback to a log file whose path that line gives.
"""

from __future__ import annotations

import argparse
import datetime
import errno
import json
import os
import re
import signal
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import yaml

from pipeline import exit_status
from pipeline.config import Config, ConfigError, load_config

EXIT_OK = exit_status.OK
EXIT_USAGE = exit_status.USAGE
EXIT_INCOMPLETE = exit_status.INCOMPLETE
EXIT_FAILED = exit_status.FAILED
EXIT_TOO_MANY_ERRORS = exit_status.TOO_MANY_ERRORS
EXIT_INFRASTRUCTURE = exit_status.INFRASTRUCTURE
EXIT_BUSY = exit_status.BUSY
EXIT_INTERRUPTED = exit_status.INTERRUPTED
EXIT_TERMINATED = exit_status.TERMINATED

CAPTION_USAGE = """Caption images and videos, or answer questions about them, into Parquet.

    python jobs/caption.py --config configs/demo.yaml [--input URI] [--output URI] [key=value ...]
    ray job submit --working-dir . -- python jobs/caption.py --config configs/X.yaml ...

Overrides are dotted config keys, e.g. ``pruning.method=vispruner pruning.budget=64 task=qa``.
The config, the input, the output and the model are checked before any cluster work; a problem
exits with status 2 and one message naming it. Rerunning the same command skips items already
written for the same config, so a killed or scheduled run just picks up where it stopped.
``--dry-run`` does every check and says what a run would do, without Ray and without writing.

exit status: 0 done; 2 bad config/input/output/model (nothing written); 3 output not one row
per item (rerun); 4 the run stopped on an error (log file named; rerun resumes); 5 too many errors
(--max-error-rate); 6 storage, disk or cluster failed (rerun); 7 a run of the same config is writing
this output; 130 interrupted; 143 terminated.
"""

VIDEOQA_USAGE = """Answer the questions of a VideoQA annotation file and score them.

    python jobs/videoqa.py --config configs/shapes-qa.yaml [--input ANNOTATIONS] [--output URI] \\
        [--baseline URI] [--predictions FILE.jsonl] [key=value ...]

Runs the caption job with ``task=qa`` (resumable like it), then reads this config's rows back
and prints normalised exact-match accuracy per question type. With ``--baseline`` (the output of
an unpruned run; it may be the same output prefix), it also prints RelAcc: the mean over
question types of accuracy ÷ the unpruned accuracy. ``--predictions`` writes Video-LLaVA's
``{"id", "question", "answer", "pred"}`` JSON lines.
"""


def job_parser(description: str, prog: str | None = None, parents: tuple[argparse.ArgumentParser, ...] = ()):
    """The options every job command shares."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter, parents=list(parents)
    )
    parser.add_argument("--config", help="YAML config (see configs/)")
    parser.add_argument("--input", help="input URI: prefix/directory, manifest or annotation file (input.uri)")
    parser.add_argument("--output", help="output directory or prefix for Parquet parts (output.uri)")
    parser.add_argument("--show", type=int, default=0, metavar="N", help="print N rows of this config's output")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="check everything and print what a run would do (items to do, model, visual tokens); no Ray, no writes",
    )
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    parser.add_argument(
        "--retry-errors",
        metavar="KIND[,KIND]",
        help="also redo items whose row is an error of these kinds (retryable errors are always redone; "
        "'all': every error) (output.retry_errors)",
    )
    parser.add_argument(
        "--max-error-rate",
        metavar="R",
        help="exit with status 5 when more than this share (0-1) of the items ended in error (output.max_error_rate)",
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    return parser


def parse_args(
    argv: list[str] | None,
    description: str = CAPTION_USAGE,
    parents: tuple[argparse.ArgumentParser, ...] = (),
    prog: str | None = None,
) -> tuple[Config, argparse.Namespace]:
    args = job_parser(description, prog, parents).parse_intermixed_args(argv)
    return config_from_args(args), args


def config_from_args(args: argparse.Namespace) -> Config:
    # --input/--output come after the key=value overrides, so they win; their source is named as such.
    overrides = list(args.overrides)
    if args.input:
        overrides.append(f"input.uri={args.input}")
    if args.output:
        overrides.append(f"output.uri={args.output}")
    if args.retry_errors:
        kinds = [k.strip() for k in args.retry_errors.split(",") if k.strip()]
        overrides.append(f"output.retry_errors=[{', '.join(kinds)}]")
    if args.max_error_rate is not None:
        overrides.append(f"output.max_error_rate={args.max_error_rate}")
    # Values are YAML-parsed; URIs must stay strings even if they look like numbers.
    return load_config(args.config, [_quote_uri(o) for o in overrides])


def _quote_uri(text: str) -> str:
    key, _, value = text.partition("=")
    if value.strip() in ("", "null", "~"):  # YAML's "unset": output.uri=null must not mean a folder ./null
        return text
    if key.strip() in (
        "input.uri",
        "output.uri",
        "model.path",
        "input.media_prefix",
        "input.answers_uri",
        "decode.twig",
    ):
        escaped = value.replace("'", "''")
        return f"{key}='{escaped}'"
    return text


# --- outcomes: one exit status and one line each


def guarded(job: Callable[[], int]) -> int:
    """Run ``job`` (which returns an exit status); turn whatever escapes into one line and a status.

    Errors raised while preparing (config, input, output, model: ``PreWorkError``) are the user's to
    fix: status 2. A storage, disk or cluster failure that stopped a run: status 6. Anything else
    stopped a run: status 4. Both with the traceback in a log file. Another run of the same config on
    the same output: status 7. SIGINT / SIGTERM: 130 / 143. A local Ray cluster the job started is
    shut down on every way out.
    """
    from pipeline import cluster
    from pipeline.lease import LeaseHeld, LeaseLost

    restore = cluster.install_signal_handlers()
    try:
        return job()
    except PreWorkError as e:
        print(f"error: {e.cause}", file=sys.stderr)
        return EXIT_USAGE
    except (LeaseHeld, LeaseLost) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BUSY
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", signal.SIGINT)  # cluster.Interrupted carries it; a plain Ctrl-C does not
        how = "" if signum == signal.SIGINT else f" by {signal.Signals(signum).name}"
        print(
            f"error: interrupted{how}; parts already written are kept; rerun the same command to resume",
            file=sys.stderr,
        )
        return EXIT_TERMINATED if signum == signal.SIGTERM else EXIT_INTERRUPTED
    except Exception as e:  # noqa: BLE001 - the last line of defence: never a bare traceback
        log = write_failure_log(e)
        fault = infrastructure_fault(e)
        what = f"{fault} failed: " if fault else ""
        print(
            f"error: the run stopped: {what}{short_cause(e)}; parts already written are kept, "
            f"{'fix it and ' if fault else ''}rerun the same command to resume (details: {log})",
            file=sys.stderr,
        )
        return EXIT_INFRASTRUCTURE if fault else EXIT_FAILED
    finally:
        cluster.shutdown_started_cluster()
        restore()


# errno values that say the disk, not the data or the code, failed
DISK_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EIO, errno.EACCES, errno.EPERM}
# Ray errors that say the cluster lost a node, a worker or an object (not that our code raised)
RAY_CLUSTER_ERRORS = ("NodeDiedError", "ObjectLostError", "OwnerDiedError", "WorkerCrashedError",
                      "OutOfMemoryError", "RaySystemError", "ObjectStoreFullError", "OutOfDiskError")  # fmt: skip


def infrastructure_fault(error: BaseException) -> str | None:
    """``"storage"``, ``"disk"`` or ``"cluster"`` when ``error`` (or what it wraps) is such a failure;
    None for everything else (a bug, a bad model found late)."""
    from pipeline.faults import is_transient

    for cause in causes(error):
        if type(cause).__name__ in RAY_CLUSTER_ERRORS:
            return "the cluster"
        if is_transient(cause) or type(cause).__name__ == "StorageUnavailable":
            return "storage"
        if isinstance(cause, OSError) and cause.errno in DISK_ERRNOS:
            return "the disk"
    return None


def causes(error: BaseException) -> list[BaseException]:
    """``error`` and what it wraps: ``__cause__``/``__context__`` and Ray's ``.cause``."""
    seen: list[BaseException] = []
    pending = [error]
    while pending:
        current = pending.pop()
        if not isinstance(current, BaseException) or any(current is s for s in seen):
            continue
        seen.append(current)
        pending += [getattr(current, "cause", None), current.__cause__, current.__context__]
    return seen


class PreWorkError(Exception):
    """A problem found before any work (status 2); ``cause`` is the one-line message."""

    def __init__(self, cause: BaseException | str):
        super().__init__(str(cause))
        self.cause = cause


def before_work(step: Callable[[], object]) -> object:
    """Run a preparation step; its expected failures become ``PreWorkError`` (status 2)."""
    from pipeline.sources import SourceError

    try:
        return step()
    except (ConfigError, SourceError, OSError, UnicodeError) as e:  # storage and file checks raise OSErrors
        raise PreWorkError(one_line(e)) from e


def one_line(error: BaseException) -> str:
    """The message of an expected error, one line (config errors list problems on indented lines)."""
    text = str(error).strip() or type(error).__name__
    if isinstance(error, ConfigError):  # "invalid config:" then one indented line per problem
        head, *problems = [line.strip() for line in text.splitlines() if line.strip()]
        return f"{head} {'; '.join(problems)}" if problems else head
    if isinstance(error, OSError) and not isinstance(error, (PermissionError, FileNotFoundError, ConnectionError)):
        text = f"{type(error).__name__}: {text}" if error.errno is None else text
    return text.splitlines()[0]


RAY_WRAPPERS = ("RayTaskError", "UserCodeException", "RayActorError")
ERROR_LINE = re.compile(r"^\s*(?:[\w.]+\.)?(\w+(?:Error|Exception|Unavailable)): (.+)$")


def short_cause(error: BaseException) -> str:
    """``Type: message`` of the innermost cause. Ray hands the driver a task's exception as text inside
    its own (the chain does not survive pickling), so the last ``SomeError: message`` line of that text
    that is not one of Ray's wrappers is the cause."""
    seen = set()
    while id(error) not in seen:
        seen.add(id(error))
        inner = getattr(error, "cause", None) or error.__cause__
        if not isinstance(inner, BaseException):
            break
        error = inner
    if any(name in type(error).__name__ for name in RAY_WRAPPERS):
        for line in reversed(str(error).splitlines()):
            match = ERROR_LINE.match(line)
            if match and not any(name in match[1] for name in RAY_WRAPPERS):
                return f"{match[1]}: {match[2].strip()[:300]}"
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    text = lines[-1].strip() if lines else ""
    return f"{type(error).__name__}: {text[:300]}" if text else type(error).__name__


def log_dir() -> Path:
    return Path(os.environ.get("VLM_LOG_DIR") or Path.home() / ".cache" / "vlm-batch" / "logs")


def write_failure_log(error: BaseException) -> Path:
    """The command, the time and the full traceback, in a file of its own; returns its path."""
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    directory = log_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{stamp}-{os.getpid()}.log"
        text = "".join(traceback.format_exception(error))
        path.write_text(f"command: {' '.join(sys.argv)}\ntime: {stamp}\n\n{text}")
        return path
    except OSError:  # no writable log folder: the traceback goes to stderr after all
        traceback.print_exception(error)
        return Path("<stderr above>")


# --- caption


def caption_main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """``jobs/caption.py`` / ``vlm-batch caption``."""
    return guarded(lambda: _caption(job_parser(CAPTION_USAGE, prog).parse_intermixed_args(argv)))


def run_from_args(args: argparse.Namespace) -> tuple[Config, object | None]:
    """The config, then ``--print-config``, ``--dry-run`` or the run itself; the summary is None when
    nothing ran. Problems found before work raise ``PreWorkError``."""
    from pipeline.run import execute, prepare

    config = before_work(lambda: config_from_args(args))
    if args.print_config:
        print_config(config)
        return config, None
    prepared = before_work(lambda: prepare(config))
    if args.dry_run:
        print_dry_run(prepared)
        return config, None
    return config, execute(prepared)


def _caption(args: argparse.Namespace) -> int:
    config, summary = run_from_args(args)
    if summary is None:
        return EXIT_OK
    if args.show:
        show_rows(config, args.show)
    return finished_status(summary, config)


def finished_status(summary, config: Config) -> int:
    from pipeline.run import main_exit_code

    return main_exit_code(summary, config.output.max_error_rate)


def print_config(config: Config) -> None:
    """The config as the run would use it, secrets left out, as YAML that ``--config`` accepts."""
    data = config.model_dump(mode="json", exclude={"storage": {"key", "secret"}})
    print(f"# config fingerprint {config.fingerprint()}")
    print(yaml.safe_dump(data, sort_keys=False), end="")


def print_dry_run(prepared) -> None:
    """What a run of this command would do; nothing is started or written."""
    from pipeline.run import describe

    for line in describe(prepared):
        print(line)


def show_rows(config: Config, count: int) -> None:
    """A few rows of this config's output, and how to query all of it."""
    from pipeline.output import read_output
    from pipeline.run import options_for

    rows = [
        r
        for r in read_output(config.output.uri, options_for(config.output.uri, config)).to_pylist()
        if r["config_fingerprint"] == config.fingerprint()
    ]
    rows.sort(key=lambda r: (r["status"] != "ok", r["item_id"]))
    for r in rows[:count]:
        detail = r["text"] if r["status"] == "ok" else f"{r['error_kind']}: {r['error']}"
        tokens = f"{r['visual_tokens_kept']}/{r['visual_tokens_total']} visual tokens"
        print(f"\n{r['item_id']} [{r['media_type']}, {tokens}]")
        print(f"  {detail}")
    if "://" not in config.output.uri:
        query = f"SELECT status, count(*) FROM '{config.output.uri}/*.parquet' GROUP BY status"
        print(f'\nquery it: python -c "import duckdb; duckdb.sql(\\"{query}\\").show()"')


# --- videoqa: the caption job with task=qa, then scored


def rows_for(output: str, fingerprint: str, config: Config) -> list[dict]:
    from pipeline.output import read_output
    from pipeline.run import options_for

    table = read_output(output, options_for(output, config))
    return [r for r in table.to_pylist() if r["config_fingerprint"] == fingerprint]


def unpruned_fingerprint(config: Config) -> str:
    """The fingerprint the same config has with pruning off: how a baseline's rows are found."""
    baseline = config.model_copy(deep=True)
    baseline.pruning.method = "none"
    baseline.pruning.budget = None
    return baseline.fingerprint()


def score(rows: list[dict]) -> dict[str, float]:
    from evaluation.scoring import accuracy_by_type, is_correct

    return accuracy_by_type((r["question_type"] or "all", is_correct(r["text"], r["answer"])) for r in rows)


def videoqa_main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """``jobs/videoqa.py`` / ``vlm-batch videoqa``: the caption job with task=qa, then scored."""
    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--baseline", help="output URI of an unpruned run of the same config")
    extra.add_argument("--predictions", type=Path, help="write Video-LLaVA-style prediction JSON lines here")
    parser = job_parser(VIDEOQA_USAGE, prog, parents=(extra,))
    return guarded(lambda: _videoqa(parser.parse_intermixed_args(argv)))


def _videoqa(args: argparse.Namespace) -> int:
    from evaluation.scoring import relative_accuracy

    args.overrides = [*args.overrides, "task=qa"]
    config, summary = run_from_args(args)
    if summary is None:
        return EXIT_OK
    rows = rows_for(config.output.uri, config.fingerprint(), config)
    unanswerable = [r for r in rows if r["answer"] is None]
    if unanswerable:
        print(f"{len(unanswerable)} rows have no reference answer; they are not scored")
    scored = [r for r in rows if r["answer"] is not None]
    accuracy = score(scored)
    print(f"\naccuracy ({len(scored)} questions, {sum(r['status'] != 'ok' for r in scored)} in error count as wrong):")
    for qtype, value in accuracy.items():
        print(f"  {qtype:<12} {value:.3f}")
    report = {"config_fingerprint": config.fingerprint(), "questions": len(scored), "accuracy": accuracy}
    if args.baseline:
        fingerprint = unpruned_fingerprint(config)
        base_rows = [r for r in rows_for(args.baseline, fingerprint, config) if r["answer"] is not None]
        if not base_rows:
            print(f"error: no unpruned rows (config {fingerprint}) under {args.baseline}", file=sys.stderr)
            return EXIT_USAGE
        base_ids = {r["item_id"] for r in base_rows}
        common = [r for r in scored if r["item_id"] in base_ids]
        baseline = score(base_rows)
        method = score(common)
        rel = relative_accuracy(method, baseline)
        report.update(baseline_accuracy=baseline, rel_acc=rel, baseline_questions=len(base_rows))
        print(f"RelAcc vs unpruned ({len(base_rows)} questions): {rel:.3f}")
    if args.predictions:
        with args.predictions.open("w") as f:
            for r in scored:
                record = {"id": r["item_id"], "question": r["question"], "answer": r["answer"], "pred": r["text"]}
                f.write(json.dumps(record) + "\n")
        print(f"predictions: {args.predictions}")
    print(json.dumps(report))
    return finished_status(summary, config)


# --- validate, and the one command that holds them all

VALIDATE_USAGE = """Check a config file (and overrides) without touching storage or the model.

    vlm-batch validate configs/demo.yaml [key=value ...]

Prints the fingerprint on success (status 0); one line naming the bad key on failure (status 2).
Use ``vlm-batch caption --config X --dry-run`` to also check the input, the output and the model.
"""


def validate_main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """``vlm-batch validate CONFIG [key=value ...]``."""
    parser = argparse.ArgumentParser(
        prog=prog, description=VALIDATE_USAGE, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("config", help="YAML config")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    args = parser.parse_args(argv)

    def job() -> int:
        config = before_work(lambda: load_config(args.config, [_quote_uri(o) for o in args.overrides]))
        print(f"ok: {args.config} is a valid config (fingerprint {config.fingerprint()})")
        return EXIT_OK

    return guarded(job)


COMMANDS = {
    "caption": (caption_main, "caption images and videos, or answer questions about them, into Parquet"),
    "videoqa": (videoqa_main, "answer a VideoQA annotation file's questions and score them"),
    "validate": (validate_main, "check a config file without running anything"),
}


def main(argv: list[str] | None = None) -> int:
    """``vlm-batch COMMAND ...``: each command has its own ``--help``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = ["usage: vlm-batch COMMAND [options]   (vlm-batch COMMAND --help for each)", "", "commands:"]
        lines += [f"  {name:<10} {text}" for name, (_, text) in COMMANDS.items()]
        unknown = argv and argv[0] not in ("-h", "--help")
        print("\n".join(lines), file=sys.stderr if unknown else sys.stdout)
        if unknown:
            print(f"error: unknown command {argv[0]!r}; choose one of {', '.join(COMMANDS)}", file=sys.stderr)
            return EXIT_USAGE
        return EXIT_OK if argv else EXIT_USAGE
    command, rest = argv[0], argv[1:]
    return COMMANDS[command][0](rest, prog=f"vlm-batch {command}")
