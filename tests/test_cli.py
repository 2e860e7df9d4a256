"""The job's command line as a user meets it: one exit status and one ``error:`` line per outcome,
nothing written before there is work, ``--dry-run``, ``--print-config``, ``vlm-batch`` and its
commands. No Ray here: everything below is decided before a cluster would start."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import cli
from pipeline.config import load_config
from synthetic.corpus import write_corpus

ROOT = Path(__file__).resolve().parent.parent


def child_env(**extra: str) -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), **extra}


def job(*args: str, **env: str) -> subprocess.CompletedProcess:
    """``python jobs/caption.py ARGS`` from the project root, as documented."""
    return subprocess.run(
        [sys.executable, "jobs/caption.py", *args],
        cwd=ROOT,
        env=child_env(**env),
        capture_output=True,
        text=True,
        timeout=120,
    )


def error_line(done: subprocess.CompletedProcess) -> str:
    """The one line a failing command prints: no traceback, no second line."""
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: "), done.stderr
    return lines[0]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli") / "corpus"
    write_corpus(str(root), seed=5, n_images=3, n_videos=1)
    return root


def test_output_that_is_a_file_exits_2_with_one_line(corpus, tmp_path):
    existing = tmp_path / "results.parquet"
    existing.write_bytes(b"not a folder")
    done = job("--config", "configs/demo.yaml", "--input", str(corpus), "--output", str(existing))
    assert done.returncode == cli.EXIT_USAGE
    line = error_line(done)
    assert "output.uri" in line and "is an existing file" in line
    assert existing.read_bytes() == b"not a folder"


@pytest.mark.parametrize(
    "case",
    ["empty input", "missing model", "missing input", "qa without questions"],
)
def test_problems_found_before_work_leave_no_output_folder(case, corpus, tmp_path):
    output = tmp_path / "out" / "captions"
    args = ["--config", "configs/demo.yaml", "--input", str(corpus), "--output", str(output)]
    if case == "empty input":
        (tmp_path / "empty").mkdir()
        args[3] = str(tmp_path / "empty")
    elif case == "missing model":
        args.append(f"model.path={tmp_path / 'no-such-model'}")
    elif case == "missing input":
        args[3] = str(tmp_path / "no-such-input")
    else:
        args.append("task=qa")  # a folder of media has no questions
    done = job(*args)
    assert done.returncode == cli.EXIT_USAGE, done.stderr
    line = error_line(done)
    expected = {
        "empty input": "no items found",
        "missing model": "model.path",
        "missing input": "no-such-input",
        "qa without questions": "question",
    }
    assert expected[case] in line
    assert not (tmp_path / "out").exists()


def test_bad_values_are_blamed_on_where_they_came_from(tmp_path):
    done = job("--config", "configs/demo.yaml", "pruning.budget=abc", "--dry-run")
    assert done.returncode == cli.EXIT_USAGE
    assert "pruning.budget" in error_line(done) and "from the command line: pruning.budget=abc" in done.stderr
    config = tmp_path / "bad.yaml"
    config.write_text("pruning:\n  method: vispruner\n  budget: abc\n")
    done = job("--config", str(config), "--dry-run")
    assert f"from {config}" in error_line(done) and "command line" not in done.stderr


def test_null_on_the_command_line_unsets_a_path(corpus):
    done = job("--config", "configs/demo.yaml", "--input", str(corpus), "output.uri=null", "--dry-run")
    assert done.returncode == cli.EXIT_USAGE
    assert "output.uri is not set" in error_line(done)
    assert not (ROOT / "null").exists()


DRY_RUN = """
import sys
from pipeline.cli import caption_main
code = caption_main(sys.argv[1:])
print("ray imported:", "ray" in sys.modules)
sys.exit(code)
"""


def test_dry_run_says_what_a_run_would_do_and_starts_nothing(corpus, tmp_path):
    output = tmp_path / "out"
    args = ["--config", "configs/demo.yaml", "--input", str(corpus), "--output", str(output)]
    fingerprint = load_config("configs/demo.yaml", [f"input.uri={corpus}", f"output.uri={output}"]).fingerprint()

    def dry_run() -> str:
        done = subprocess.run(
            [sys.executable, "-c", DRY_RUN, *args, "--dry-run"],
            cwd=ROOT,
            env=child_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        assert "ray imported: False" in done.stdout
        return done.stdout

    text = dry_run()
    assert f"fingerprint {fingerprint}" in text
    assert "4 items (3 images, 1 video)" in text
    assert "0 already done for this config, 4 to do" in text
    assert "model: models/shapes-llava: model_type llava; visual tokens per image 64, per video 4 frames x 64" in text
    assert "pruning keeps 21 per image/frame" in text
    assert not output.exists()  # nothing written, not even the folder

    # Two items already written for this config (and one for another config): 2 done, 2 to do.
    output.mkdir()
    done_ids = sorted(p.relative_to(corpus).as_posix() for p in corpus.rglob("*.png"))[:2]
    keys = pa.table(
        {
            "item_id": [*done_ids, done_ids[0]],
            "config_fingerprint": [fingerprint, fingerprint, "another-config"],
            "status": ["ok", "ok", "ok"],
        }
    )
    pq.write_table(keys, output / "part-test.parquet")
    before = sorted(output.iterdir())
    text = dry_run()
    assert "2 already done for this config, 2 to do" in text
    assert sorted(output.iterdir()) == before


def test_print_config_is_yaml_the_job_reads_back(corpus, tmp_path, capsys):
    args = ["--config", "configs/demo.yaml", "--input", str(corpus), "pruning.budget=9", "storage.secret=s3cr3t"]
    assert cli.caption_main([*args, "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert "s3cr3t" not in printed
    saved = tmp_path / "resolved.yaml"
    saved.write_text(printed)
    original = cli.parse_args(args)[0]
    again = load_config(saved)
    assert again.fingerprint() == original.fingerprint()
    assert again.pruning.budget == 9 and again.input.uri == str(corpus)


def test_vlm_batch_commands_each_have_their_own_help(capsys):
    assert cli.main(["--help"]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in ("caption", "videoqa", "validate"))
    assert cli.main(["frobnicate"]) == cli.EXIT_USAGE
    assert "unknown command 'frobnicate'" in capsys.readouterr().err
    for command, own in (("caption", "Caption images"), ("videoqa", "--baseline"), ("validate", "Check a config")):
        with pytest.raises(SystemExit) as exit_:
            cli.main([command, "--help"])
        assert exit_.value.code == 0
        text = capsys.readouterr().out
        assert text.startswith(f"usage: vlm-batch {command}") and own in text, text


def test_validate(tmp_path, capsys):
    fingerprint = load_config("configs/demo.yaml").fingerprint()
    assert cli.main(["validate", "configs/demo.yaml"]) == 0
    assert f"fingerprint {fingerprint}" in capsys.readouterr().out
    assert cli.main(["validate", "configs/demo.yaml", "pruning.method=nope"]) == cli.EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown pruning method 'nope'" in err
    assert cli.main(["validate", str(tmp_path / "missing.yaml")]) == cli.EXIT_USAGE
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("raised", ["failure", "interrupt"])
def test_a_run_that_stops_gives_one_line_a_status_and_a_log(raised, corpus, tmp_path, monkeypatch, capsys):
    import pipeline.run

    def execute(prepared, log=print):
        try:
            raise OSError("connection reset by peer")
        except OSError as cause:
            if raised == "interrupt":
                raise KeyboardInterrupt from None
            raise RuntimeError("the inference stage failed") from cause

    monkeypatch.setattr(pipeline.run, "execute", execute)
    monkeypatch.setenv("VLM_LOG_DIR", str(tmp_path / "logs"))
    code = cli.caption_main(["--config", "configs/demo.yaml", "--input", str(corpus), "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    if raised == "interrupt":
        assert code == cli.EXIT_INTERRUPTED and "interrupted" in err[0] and "rerun" in err[0]
        return
    assert code == cli.EXIT_FAILED
    assert "OSError: connection reset by peer" in err[0] and "rerun the same command" in err[0]
    log = Path(err[0].rsplit("details: ", 1)[1].rstrip(")"))
    assert log.parent == tmp_path / "logs"
    assert "RuntimeError: the inference stage failed" in log.read_text() and "Traceback" in log.read_text()


def test_unreachable_object_store_exits_2_with_one_line(tmp_path):
    done = job(
        "--config",
        "configs/demo.yaml",
        "--input",
        "s3://corpus-bucket/images/",
        "--output",
        str(tmp_path / "out"),
        "storage.endpoint_url=http://127.0.0.1:9",  # nothing listens on the discard port
        "storage.retry_attempts=1",  # an outage at start is waited out; a test need not wait
        AWS_ACCESS_KEY_ID="test-key",
        AWS_SECRET_ACCESS_KEY="test-secret-4321",
    )
    assert done.returncode == cli.EXIT_USAGE
    line = error_line(done)
    assert "s3://corpus-bucket/images/" in line and "http://127.0.0.1:9" in line
    assert "test-secret-4321" not in done.stderr + done.stdout
    assert not (tmp_path / "out").exists()


def test_ssd_on_the_demo_model_finds_its_twig(corpus, tmp_path):
    """decode.strategy=ssd without decode.twig: the model folder's twig/ is used, and said."""
    done = job(
        "--config", "configs/demo.yaml", "--input", str(corpus), "--output", str(tmp_path / "o"),
        "decode.strategy=ssd", "--dry-run",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "decode ssd" in done.stdout and "twig models/shapes-llava/twig" in done.stdout


def test_what_stopped_a_run_is_named_and_classified():
    from pipeline.faults import StorageUnavailable

    class UserCodeException(Exception):  # as Ray hands a task's error to the driver: as text
        pass

    wrapped = UserCodeException(
        "ray::MapBatches(InferenceStage)() (pid=1)\nValueError: the weights are corrupt\n\nThe above exception was "
        "the direct cause of the following exception:\n\nray.exceptions.UserCodeException: UDF failed to process "
        "a data block.\nTo change retry attempts ... if you believe this to be transient."
    )
    assert cli.short_cause(wrapped) == "ValueError: the weights are corrupt"
    assert cli.infrastructure_fault(wrapped) is None
    assert cli.infrastructure_fault(OSError(30, "Read-only file system")) == "the disk"
    assert cli.infrastructure_fault(OSError(28, "No space left on device")) == "the disk"
    unavailable = StorageUnavailable("writing part s3://b/o/part-1.parquet failed after 8 attempts", 8, "refused")
    assert cli.infrastructure_fault(RuntimeError("stage failed")) is None
    try:
        raise RuntimeError("stage failed") from unavailable
    except RuntimeError as chained:
        assert cli.infrastructure_fault(chained) == "storage"
    node_died = type("NodeDiedError", (Exception,), {})("node 10.0.0.3 died")
    assert cli.infrastructure_fault(node_died) == "the cluster"
    assert cli.infrastructure_fault(ValueError("a bug")) is None
