"""`ray job submit` of jobs/caption.py against a real local Ray head, reading media and the model
from a real S3 server and writing Parquet back to it, as users run it on a cluster."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from pipeline import storage
from pipeline.output import read_output
from synthetic.corpus import write_corpus

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.timeout(900)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """`ray start --head --block` on loopback, its own ports; the whole process group is stopped
    at the end (`ray stop` would also stop any other Ray on the machine)."""
    dashboard = free_port()
    # Token auth, as Ray recommends for any cluster: the head and the submitter share the token.
    env = {
        **os.environ,
        "PATH": f"{BIN}:{os.environ['PATH']}",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
    }
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    log = (tmp_path_factory.mktemp("ray") / "head.log").open("w")
    cmd = [
        str(BIN / "ray"),
        "start",
        "--head",
        "--block",
        "--node-ip-address=127.0.0.1",
        f"--port={free_port()}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard}",
        f"--ray-client-server-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
        "--num-cpus=2",
        "--include-dashboard=true",
        "--disable-usage-stats",
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dashboard}"
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{url}/api/version", timeout=2):
                break
        except urllib.error.HTTPError:
            break  # answering (401: this probe sends no token; `ray job submit` does)
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            log.flush()
            stop_group(proc)
            raise RuntimeError(f"ray head did not come up:\n{Path(log.name).read_text()[-3000:]}")
        time.sleep(1)
    yield url, env
    stop_group(proc)
    log.close()


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the head's process group (`ray start --block` then stops what it started); SIGKILL
    the group if it is still there after 10 s (it sometimes sits out a 30 s wait, for nothing)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def upload_dir(local: Path, uri: str, options: dict) -> None:
    for path in sorted(local.rglob("*")):
        if path.is_file():
            storage.write_bytes_atomic(
                storage.join(uri, path.relative_to(local).as_posix()), path.read_bytes(), options
            )


@pytest.mark.slow  # ~30 s; the README walkthrough test submits a job too (make test-all)
def test_ray_job_submit_s3_round_trip(ray_head, s3_server, tmp_path):
    url, env = ray_head
    options = s3_server.options()
    corpus = s3_server.uri("job", "corpus")
    write_corpus(corpus, seed=31, n_images=3, n_videos=2, storage_options=options)
    model = s3_server.uri("job", "models", "shapes-llava")
    upload_dir(ROOT / "models" / "shapes-llava", model, options)
    output = s3_server.uri("job", "captions")
    # Credentials and endpoint reach the job the standard way: AWS_* variables in its runtime env.
    runtime_env = {"env_vars": {**s3_server.env(), "VLM_MODEL_CACHE": str(tmp_path / "model-cache")}}
    cmd = [
        str(BIN / "ray"),
        "job",
        "submit",
        "--address",
        url,
        "--working-dir",
        str(ROOT),
        "--runtime-env-json",
        json.dumps(runtime_env),
        "--",
        "python",
        "jobs/caption.py",
        "--config",
        "configs/demo.yaml",
        "--input",
        corpus,
        "--output",
        output,
        f"model.path={model}",
        "decode.max_new_tokens=16",
        "ray.progress_bars=false",
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "succeeded" in done.stdout
    assert "ok 5, error 0" in done.stdout  # the job's summary, streamed back by `ray job submit`
    rows = read_output(output, options).to_pylist()
    assert sorted(r["item_id"] for r in rows) == [
        "images/img_00000000.png",
        "images/img_00000001.png",
        "images/img_00000002.png",
        "videos/vid_00000000.mp4",
        "videos/vid_00000001.mp4",
    ]
    assert all(r["status"] == "ok" and r["text"] and r["uri"].startswith("s3://") for r in rows)
    assert (tmp_path / "model-cache").is_dir()  # the model came from S3 through the node cache
    runs = storage.list_files(storage.join(output, "_runs"), ["json"], options)
    assert len(runs) == 1


def test_wrong_credentials_fail_before_cluster_work(s3_server, tmp_path):
    """A wrong secret: one clear error naming the URI, exit code 2, no secret in the output."""
    env = {**os.environ, **s3_server.env(), "AWS_SECRET_ACCESS_KEY": "not-the-secret-123"}
    env.pop("RAY_ADDRESS", None)
    cmd = [
        sys.executable,
        "jobs/caption.py",
        "--config",
        "configs/demo.yaml",
        "--input",
        s3_server.uri("job", "nothing"),
        "--output",
        str(tmp_path / "out"),
    ]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "error:" in done.stderr and s3_server.uri("job", "nothing") in done.stderr
    assert "not-the-secret-123" not in done.stderr + done.stdout
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def readme_walkthrough() -> str:
    """The bash block between the walkthrough markers of README.md."""
    text = (ROOT / "README.md").read_text()
    block = text.split("<!-- walkthrough:start -->", 1)[1].split("<!-- walkthrough:end -->", 1)[0]
    return block.split("```bash\n", 1)[1].rsplit("```", 1)[0]


def project_copy(target: Path) -> Path:
    """The repository's files as a fresh clone has them (tracked and untracked, not ignored), plus
    `.venv/bin` of the environment running the tests: a checkout where `make demo` has run."""
    names = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.decode()
    for name in filter(None, names.split("\0")):
        source = ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    # A real .venv folder (so `.venv/` in .gitignore keeps it out of the upload) whose bin/ is ours.
    (target / ".venv").mkdir()
    (target / ".venv" / "bin").symlink_to(BIN)
    return target


def test_readme_walkthrough_runs_command_for_command(tmp_path):
    """README's local `ray job submit` walkthrough, run as written in a copy of the project, with a
    fresh home (so no ~/.ray/auth_token exists yet, as on a new machine)."""
    project = project_copy(tmp_path / "vlm-batch")
    write_corpus(str(project / "demo_out" / "corpus"), seed=41, n_images=2, n_videos=1)
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(home), PATH=os.environ["PATH"].replace(f"{BIN}:", ""), RAY_USAGE_STATS_ENABLED="0")
    script = "set -euo pipefail\n" + readme_walkthrough()
    try:
        done = subprocess.run(["bash", "-c", script], cwd=project, env=env, capture_output=True, text=True, timeout=600)
    finally:
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True, timeout=120)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-3000:]
    assert "succeeded" in done.stdout
    assert "ok 3, error 0" in done.stdout
    rows = read_output(str(project / "demo_out" / "captions-job")).to_pylist()
    assert len(rows) == 3 and all(r["status"] == "ok" and r["text"] for r in rows)
    assert (home / ".ray" / "auth_token").exists()
