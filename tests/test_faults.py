"""Faults must not cost data: transient storage errors are retried, permanent ones are not, and what is left
of a failure says whether a later run may succeed (pipeline.faults; decode, write and resume use it)."""

from __future__ import annotations

import asyncio
import errno
import logging
import pickle
import socket
import statistics
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

import aiohttp
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    ReadTimeoutError,
)
from fsspec.exceptions import FSTimeoutError
from s3fs.errors import translate_boto_error

from evaluation.s3_server import relaunch_s3_server, start_s3_server, stop_s3_server
from pipeline import faults, output, resume, storage
from pipeline.config import StorageConfig, load_config
from pipeline.decode import decode_row
from pipeline.faults import RetryPolicy, StorageUnavailable, is_transient, with_retries
from pipeline.inference import InferenceStage, base_values, error_row
from pipeline.media import MediaError, MediaOptions
from pipeline.schema import DECODED_SCHEMA, FINGERPRINT_SCHEMA, OUTPUT_SCHEMA_VERSION, SCHEMA, WORK_FIELDS
from pipeline.write import write_batch

ROOT = Path(__file__).resolve().parent.parent
URL = "http://127.0.0.1:9/bucket/key"


def client_error(code: str, status: int, message: str = "boom") -> ClientError:
    response = {"Error": {"Code": code, "Message": message}, "ResponseMetadata": {"HTTPStatusCode": status}}
    return ClientError(response, "GetObject")


def raised(fn) -> BaseException:
    """What ``fn`` raises, with its __cause__/__context__ set as Python sets them."""
    try:
        fn()
    except BaseException as e:  # noqa: BLE001 - the exception is the value under test
        return e
    raise AssertionError("did not raise")


def refused_by_aiohttp() -> aiohttp.ClientError:
    """The ClientConnectorError aiohttp raises for a refused connection (a port nothing listens on)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connections are refused

        async def get() -> None:
            async with aiohttp.ClientSession() as session:
                await session.get(f"http://127.0.0.1:{port}/")

        return raised(lambda: asyncio.run(get()))


def wrapped(error: BaseException, how: str) -> BaseException:
    """``error`` inside a generic exception, as a cause, a context or an argument."""
    if how == "cause":
        outer = RuntimeError("outer")
        outer.__cause__ = error
        return outer
    if how == "context":

        def fail() -> None:
            try:
                raise error
            except BaseException:
                raise KeyError("while handling")  # noqa: B904 - the implicit __context__ is the point

        return raised(fail)
    return RuntimeError("wrapped", error) if how == "args" else error


TRANSIENT = {
    "botocore EndpointConnectionError": EndpointConnectionError(endpoint_url=URL),
    "botocore ConnectTimeoutError": ConnectTimeoutError(endpoint_url=URL),
    "botocore ReadTimeoutError": ReadTimeoutError(endpoint_url=URL),
    "botocore ConnectionClosedError": ConnectionClosedError(endpoint_url=URL),
    "ClientError 503 SlowDown": client_error("SlowDown", 503),
    "ClientError 503 ServiceUnavailable": client_error("ServiceUnavailable", 503),
    "ClientError 500 InternalError": client_error("InternalError", 500),
    "ClientError 429": client_error("TooManyRequests", 429),
    "ClientError 400 Throttling": client_error("Throttling", 400),
    "ClientError 400 ThrottlingException": client_error("ThrottlingException", 400),
    "ClientError 503 RequestLimitExceeded": client_error("RequestLimitExceeded", 503),
    "ClientError 502 no code": client_error("", 502),
    "s3fs SlowDown (OSError EBUSY)": translate_boto_error(client_error("SlowDown", 503)),
    "s3fs InternalError (OSError EREMOTEIO)": translate_boto_error(client_error("InternalError", 500)),
    "s3fs 503 (OSError EBUSY)": translate_boto_error(client_error("503", 503)),
    "s3fs RequestTimeout (TimeoutError)": translate_boto_error(client_error("RequestTimeout", 400)),
    "ConnectionRefusedError": ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"),
    "ConnectionResetError": ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"),
    "ConnectionAbortedError": ConnectionAbortedError(errno.ECONNABORTED, "aborted"),
    "BrokenPipeError": BrokenPipeError(errno.EPIPE, "Broken pipe"),
    "TimeoutError (socket.timeout, asyncio's)": TimeoutError("timed out"),
    "fsspec FSTimeoutError": FSTimeoutError(),
    "aiohttp refused connection": refused_by_aiohttp(),
    "aiohttp ServerDisconnectedError": aiohttp.ServerDisconnectedError(),
    "aiohttp 503": aiohttp.ClientResponseError(None, (), status=503),
    "aiohttp 429": aiohttp.ClientResponseError(None, (), status=429),
    "StorageUnavailable": StorageUnavailable("reading x failed after 8 attempts", 8, "cause"),
    **{
        f"OSError {errno.errorcode[n]}": OSError(n, "os error")
        for n in (errno.ECONNREFUSED, errno.ECONNRESET, errno.ETIMEDOUT, errno.EHOSTUNREACH, errno.ENETUNREACH)
    },
    "OSError EPIPE": OSError(errno.EPIPE, "os error"),
}
PERMANENT = {
    "ClientError 404 NoSuchKey": client_error("NoSuchKey", 404),
    "ClientError 403 AccessDenied": client_error("AccessDenied", 403),
    "ClientError 400 InvalidRequest": client_error("InvalidRequest", 400),
    "ClientError 400 EntityTooLarge": client_error("EntityTooLarge", 400),
    "s3fs NoSuchKey (FileNotFoundError)": translate_boto_error(client_error("NoSuchKey", 404)),
    "s3fs 404 (FileNotFoundError)": translate_boto_error(client_error("404", 404)),
    "s3fs AccessDenied (PermissionError)": translate_boto_error(client_error("AccessDenied", 403)),
    "s3fs 403 (PermissionError)": translate_boto_error(client_error("403", 403)),
    "s3fs EntityTooLarge (OSError EMSGSIZE)": translate_boto_error(client_error("EntityTooLarge", 400)),
    "s3fs unknown code 400 (OSError EIO)": translate_boto_error(client_error("WeirdThing", 400)),
    "botocore NoCredentialsError": NoCredentialsError(),
    "aiohttp 404": aiohttp.ClientResponseError(None, (), status=404),
    "aiohttp InvalidURL": aiohttp.InvalidURL("not a url"),
    "FileNotFoundError": FileNotFoundError(errno.ENOENT, "No such file or directory"),
    "PermissionError": PermissionError(errno.EACCES, "Permission denied"),
    "IsADirectoryError": IsADirectoryError(errno.EISDIR, "Is a directory"),
    **{f"OSError {errno.errorcode[n]}": OSError(n, "os error") for n in (errno.ENOSPC, errno.EROFS, errno.EACCES)},
    "OSError EIO alone": OSError(errno.EIO, "I/O error"),
    "ValueError (too large)": ValueError("x is 10 bytes, over the limit of 5 (media.max_bytes)"),
    "RuntimeError": RuntimeError("unknown"),
    "KeyError": KeyError("k"),
}


@pytest.mark.parametrize("name", TRANSIENT)
def test_transient_errors(name):
    assert is_transient(TRANSIENT[name])


@pytest.mark.parametrize("name", PERMANENT)
def test_permanent_errors(name):
    assert not is_transient(PERMANENT[name])


@pytest.mark.parametrize("how", ["cause", "context", "args"])
def test_what_an_error_wraps_decides_when_it_says_nothing_itself(how):
    assert is_transient(wrapped(EndpointConnectionError(endpoint_url=URL), how))
    assert not is_transient(wrapped(client_error("NoSuchKey", 404), how))


def test_the_outermost_error_that_says_something_decides():
    # s3fs translated a 404 while a connection error was being handled: not found, not transient
    not_found = translate_boto_error(client_error("NoSuchKey", 404))
    not_found.__context__ = ConnectionResetError()
    assert not is_transient(not_found)
    looping = RuntimeError("a")
    looping.__context__ = looping  # a cycle ends the walk
    assert not is_transient(looping)


# --- the retry loop -----------------------------------------------------------------------------------------


class Flaky:
    """Raises ``errors`` in turn, then returns "done"; counts calls."""

    def __init__(self, *errors: BaseException) -> None:
        self.errors, self.calls = list(errors), 0

    def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "done"


@pytest.fixture
def waits(monkeypatch) -> list[float]:
    """The waits with_retries asks for, none really slept; jitter from a seeded generator."""
    asked: list[float] = []
    monkeypatch.setattr(faults, "_sleep", asked.append)
    monkeypatch.setattr(faults, "_random", __import__("random").Random(18))
    return asked


def test_retries_transient_errors_and_counts_attempts(waits):
    fn = Flaky(ConnectionResetError(), EndpointConnectionError(endpoint_url=URL))
    assert with_retries(fn, RetryPolicy(attempts=5, base_s=0.5, max_wait_s=8), "reading x") == ("done", 3)
    assert fn.calls == 3 and len(waits) == 2
    assert 0 <= waits[0] <= 0.5 and 0 <= waits[1] <= 1.0


def test_waits_grow_are_jittered_within_bounds_and_stop_at_the_cap(waits):
    policy = RetryPolicy(attempts=7, base_s=0.5, max_wait_s=2.0)
    bounds = [0.5, 1.0, 2.0, 2.0, 2.0, 2.0]
    assert [policy.wait_bound(n) for n in range(1, 7)] == bounds and policy.max_total_wait_s == 9.5
    runs = 300
    for _ in range(runs):
        with pytest.raises(StorageUnavailable):
            with_retries(Flaky(*[TimeoutError()] * 7), policy, "x")
    assert len(waits) == runs * 6  # no wait after the last attempt
    per_retry = [waits[i::6] for i in range(6)]
    for bound, drawn in zip(bounds, per_retry, strict=True):
        assert all(0 <= w <= bound for w in drawn)
        assert 0.4 * bound < statistics.mean(drawn) < 0.6 * bound  # full jitter: uniform over [0, bound]
        assert max(drawn) > 0.9 * bound and min(drawn) < 0.1 * bound
    means = [statistics.mean(d) for d in per_retry]
    assert means[0] < means[1] < means[2]  # exponential growth ...
    assert max(means[2:]) - min(means[2:]) < 0.25  # ... up to the cap


def test_attempts_run_out_on_a_transient_error(waits):
    last = EndpointConnectionError(endpoint_url=URL)
    fn = Flaky(ConnectionResetError(), TimeoutError(), last)
    with pytest.raises(StorageUnavailable) as caught:
        with_retries(fn, RetryPolicy(attempts=3, base_s=0.1, max_wait_s=1), "writing part s3://b/out/part-1.parquet")
    error = caught.value
    assert isinstance(error, OSError) and error.__cause__ is last and fn.calls == 3 and len(waits) == 2
    assert error.attempts == 3 and error.cause.startswith("EndpointConnectionError: Could not connect")
    assert str(error).startswith("writing part s3://b/out/part-1.parquet failed after 3 attempts")
    assert "storage unavailable: EndpointConnectionError" in str(error)
    copy = pickle.loads(pickle.dumps(error))  # Ray ships it from the task to the driver
    assert (type(copy), str(copy), copy.attempts, copy.cause) == (StorageUnavailable, str(error), 3, error.cause)


def test_permanent_errors_are_raised_at_once_with_their_attempts(waits):
    fn = Flaky(FileNotFoundError("s3://b/gone"))
    with pytest.raises(FileNotFoundError) as caught:
        with_retries(fn, RetryPolicy(), "reading s3://b/gone")
    assert fn.calls == 1 and waits == [] and faults.attempts_of(caught.value) == 1
    fn = Flaky(ConnectionRefusedError(), translate_boto_error(client_error("AccessDenied", 403)))
    with pytest.raises(PermissionError) as caught:
        with_retries(fn, RetryPolicy(), "reading s3://b/secret")
    assert fn.calls == 2 and len(waits) == 1 and caught.value.attempts == 2
    assert faults.attempts_of(ValueError("raised elsewhere")) == 1


def test_retry_settings_are_storage_config_not_fingerprint():
    assert RetryPolicy() == RetryPolicy(attempts=8, base_s=0.5, max_wait_s=8.0)
    assert RetryPolicy().max_total_wait_s == 31.5  # with ~5 s per try against a dead endpoint: > 30 s
    assert RetryPolicy.from_storage(StorageConfig().model_dump()) == RetryPolicy() == RetryPolicy.from_storage(None)
    base = load_config(ROOT / "configs" / "demo.yaml")
    tuned = load_config(
        ROOT / "configs" / "demo.yaml",
        ["storage.retry_attempts=3", "storage.retry_base_s=0.2", "storage.retry_max_wait_s=1"],
    )
    assert RetryPolicy.from_storage(tuned.storage.model_dump()) == RetryPolicy(3, 0.2, 1.0)
    assert tuned.fingerprint() == base.fingerprint() == "e3e1a25a46743e8c"  # schema v4 did not change it either
    assert (OUTPUT_SCHEMA_VERSION, FINGERPRINT_SCHEMA) == (4, 3)
    # a whole storage section goes to fsspec_options, as the stages pass it
    assert storage.fsspec_options("s3://b/p", **tuned.storage.model_dump()) == {"use_listings_cache": False}
    with pytest.raises(ValueError):
        RetryPolicy(attempts=0)


# --- the decode stage ---------------------------------------------------------------------------------------


class FakeWorker:
    """Stands in for DecodeWorker: any bytes decode to one 4x4 black image (or raise ``error``)."""

    def __init__(self, error: Exception | None = None) -> None:
        self.error, self.seen = error, []

    def decode(self, data: bytes, uri: str):
        self.seen.append(data)
        if self.error:
            raise self.error
        return SimpleNamespace(kind="image", frames=np.zeros((1, 4, 4, 3), np.uint8))


def work_row(uri: str) -> dict:
    return {name: None for name, _ in WORK_FIELDS} | {"item_id": uri.rsplit("/", 1)[-1], "uri": uri}


SMALL = {"retry_attempts": 4, "retry_base_s": 0.01, "retry_max_wait_s": 0.02}


@pytest.fixture(autouse=True)
def storage_up(monkeypatch):
    """Each test starts with no outage noted by an earlier one (pipeline.decode's per-process note)."""
    import pipeline.decode

    monkeypatch.setattr(pipeline.decode, "_storage_down_until", 0.0)


def test_decode_retries_a_read_that_fails_twice(waits, monkeypatch):
    read = Flaky(EndpointConnectionError(endpoint_url=URL), ConnectionResetError())
    monkeypatch.setattr(storage, "read_bytes", lambda uri, options, max_bytes=None: read() and b"bytes")
    row = decode_row(work_row("s3://b/a.png"), FakeWorker(), MediaOptions(), SMALL)
    assert list(row) == DECODED_SCHEMA.names
    assert row["error_kind"] is None and row["frame_shape"] == [1, 4, 4, 3]
    assert (row["retryable"], row["attempts"]) == (None, 3)  # ok: retryable null, attempts = reads tried
    assert len(waits) == 2


def test_decode_of_a_read_that_always_fails_is_retryable(waits, monkeypatch):
    def down(uri, options, max_bytes=None):
        raise EndpointConnectionError(endpoint_url=URL)

    monkeypatch.setattr(storage, "read_bytes", down)
    row = decode_row(work_row("s3://b/a.png"), FakeWorker(), MediaOptions(), SMALL)
    assert (row["error_kind"], row["retryable"], row["attempts"]) == ("read_failed", True, 4)
    assert row["error"].startswith("reading s3://b/a.png failed after 4 attempts")
    assert "EndpointConnectionError" in row["error"] and row["frames"] is None
    # the output row keeps it, and the part summary counts it apart
    config = load_config(ROOT / "configs" / "demo.yaml")
    out = error_row(base_values(row, config, "f" * 16, "run"))
    assert (out["status"], out["error_kind"], out["retryable"], out["attempts"]) == ("error", "read_failed", True, 4)


def test_after_a_read_outlasts_its_retries_the_next_reads_try_once(waits, monkeypatch):
    """In a long outage the rows of a batch do not each wait out the whole budget in turn."""
    import pipeline.decode

    def down(uri, options, max_bytes=None):
        raise EndpointConnectionError(endpoint_url=URL)

    monkeypatch.setattr(storage, "read_bytes", down)
    first = decode_row(work_row("s3://b/a.png"), FakeWorker(), MediaOptions(), SMALL)
    second = decode_row(work_row("s3://b/b.png"), FakeWorker(), MediaOptions(), SMALL)
    assert (first["attempts"], second["attempts"]) == (4, 1)
    assert second["retryable"] is True and second["error_kind"] == "read_failed"
    monkeypatch.setattr(pipeline.decode, "_storage_down_until", 0.0)  # the window has passed
    assert decode_row(work_row("s3://b/c.png"), FakeWorker(), MediaOptions(), SMALL)["attempts"] == 4


def test_decode_of_a_missing_file_is_permanent(tmp_path, waits):
    row = decode_row(work_row(str(tmp_path / "gone.png")), FakeWorker(), MediaOptions(), None)
    assert (row["error_kind"], row["retryable"], row["attempts"]) == ("not_found", False, 1)
    assert waits == []


def test_decode_errors_are_not_retryable(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not a png")
    worker = FakeWorker(MediaError("corrupt", "bad.png is corrupt"))
    row = decode_row(work_row(str(tmp_path / "bad.png")), worker, MediaOptions(), None)
    assert (row["error_kind"], row["retryable"], row["attempts"]) == ("corrupt", False, 1)


def test_inference_failed_rows_are_not_retryable_and_summaries_count_retryable_errors(tmp_path):
    config = load_config(ROOT / "configs" / "demo.yaml")
    decoded = {name: None for name in DECODED_SCHEMA.names} | {"item_id": "x", "uri": "/x.png", "attempts": 1}
    decoded |= {"frame_shape": [1, 4, 4, 3], "decode_ms": 1.0}

    def engine_fails(rows, bases):
        raise RuntimeError("engine failed")

    stage = object.__new__(InferenceStage)  # no model: the engine call fails
    stage.generate = engine_fails
    (row,) = stage.run_rows([decoded], [base_values(decoded, config, "fp", "run")])
    assert (row["error_kind"], row["retryable"], row["attempts"]) == ("inference_failed", False, 1)
    unavailable = error_row(base_values(decoded | {"error_kind": "read_failed", "retryable": True}, config, "fp", "r"))
    not_found = error_row(base_values(decoded | {"error_kind": "not_found", "retryable": False}, config, "fp", "r"))
    table = pa.Table.from_pylist([row, unavailable, not_found], schema=SCHEMA)
    (summary,) = write_batch(table, str(tmp_path), {}).to_pylist()
    assert summary["rows"] == 3 and summary["ok"] == 0 and summary["retryable_errors"] == 1


# --- part writes and resume reads ---------------------------------------------------------------------------


def out_row(item_id: str, **extra) -> dict:
    base = {f.name: None for f in SCHEMA}
    base.update(item_id=item_id, status="ok", config_fingerprint="f", created_at=datetime.now(UTC), attempts=1)
    return base | extra


def test_v3_parts_read_back_with_nulls_in_the_new_columns(tmp_path):
    v3 = pa.schema([f for f in SCHEMA if f.name not in ("retryable", "attempts")])
    assert SCHEMA.names[: len(v3)] == v3.names  # the new columns come last: v3's keep their positions
    old = pa.Table.from_pylist([out_row("a", status="error", error_kind="read_failed")], schema=SCHEMA)
    pq.write_table(old.select(v3.names), tmp_path / "part-old.parquet")
    new = pa.Table.from_pylist([out_row("b", status="error", retryable=True, attempts=8)], schema=SCHEMA)
    output.write_part(new, str(tmp_path))
    table = output.read_output(str(tmp_path))
    assert table.schema == SCHEMA
    rows = {r["item_id"]: r for r in table.to_pylist()}
    assert (rows["a"]["retryable"], rows["a"]["attempts"]) == (None, None)
    assert (rows["b"]["retryable"], rows["b"]["attempts"]) == (True, 8)
    # a v3 error row counts as permanent; the v4 retryable one is redone
    assert resume.done_items(str(tmp_path), "f") == ({"a"}, 1)


@pytest.mark.parametrize(
    ("code", "kind"), [(errno.ENOSPC, OSError), (errno.EROFS, OSError), (errno.EACCES, PermissionError)]
)
def test_local_disk_errors_are_not_retried(tmp_path, monkeypatch, waits, code, kind):
    fail = Flaky(OSError(code, "disk says no"))
    monkeypatch.setattr(storage, "write_bytes_atomic", lambda uri, data, options=None: fail())
    with pytest.raises(OSError) as caught:
        output.write_part(pa.Table.from_pylist([out_row("a")], schema=SCHEMA), str(tmp_path))
    error = caught.value
    assert fail.calls == 1 and waits == [] and type(error) is kind and error.errno == code
    assert f"cannot write part {tmp_path}/part-" in str(error) and errno.errorcode[code] in str(error)
    assert "not retried" in str(error)


def test_a_write_that_outlasts_the_policy_names_the_part(tmp_path, monkeypatch, waits):
    fail = Flaky(*[ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")] * 3)
    monkeypatch.setattr(storage, "write_bytes_atomic", lambda uri, data, options=None: fail())
    with pytest.raises(StorageUnavailable) as caught:
        output.write_part(pa.Table.from_pylist([out_row("a")], schema=SCHEMA), str(tmp_path), policy=RetryPolicy(3))
    assert caught.value.attempts == 3 and fail.calls == 3
    message = str(caught.value)
    assert message.startswith(f"writing part {tmp_path}/part-") and ".parquet failed after 3 attempts" in message
    assert "ConnectionRefusedError: [Errno 111] Connection refused" in message


def test_resume_reads_retry_transient_errors(tmp_path, monkeypatch, waits):
    output.write_part(pa.Table.from_pylist([out_row("a"), out_row("b")], schema=SCHEMA), str(tmp_path))
    real_read, real_open = storage.read_bytes, storage.open_fs
    reads = Flaky(ConnectionResetError(), TimeoutError())
    monkeypatch.setattr(storage, "read_bytes", lambda uri, options=None: reads() and real_read(uri, options))

    listing = Flaky(EndpointConnectionError(endpoint_url=URL))

    class FlakyListing:
        def __init__(self, fs) -> None:
            self.fs = fs

        def ls(self, path, **kwargs):
            listing()
            return self.fs.ls(path, **kwargs)

        def __getattr__(self, name: str):
            return getattr(self.fs, name)

    def open_fs(uri, options=None):
        fs, path = real_open(uri, options)
        return FlakyListing(fs), path

    monkeypatch.setattr(storage, "open_fs", open_fs)
    keys = output.read_keys(str(tmp_path))
    assert sorted(keys.column("item_id").to_pylist()) == ["a", "b"]
    assert listing.calls == 2 and reads.calls == 3 and len(waits) == 3  # one failed listing, two failed reads


# --- a real outage: SeaweedFS stopped, then started again on the same ports -------------------------------------


@pytest.fixture
def own_s3_server(tmp_path, monkeypatch):
    """A SeaweedFS server of this test's own (the session's shared one is never stopped), and its process.

    AWS_MAX_ATTEMPTS=1 turns off botocore's own retries (about 5 s per call against a dead endpoint), so
    every try the test sees is one of with_retries'.
    """
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    server, proc = start_s3_server(tmp_path / "s3")
    state = {"proc": proc}
    try:
        yield server, state
    finally:
        stop_s3_server(state["proc"])


def test_reads_and_writes_ride_out_a_real_outage(own_s3_server, caplog):
    caplog.set_level(logging.INFO, logger="pipeline.faults")  # each failed try is logged: the write's too
    server, state = own_s3_server
    assert server.directory is not None and set(server.ports) == {"master", "volume", "filer", "s3", "admin"}
    prefix = f"t-{uuid.uuid4().hex[:8]}"
    image = server.uri(prefix, "in", "a.png")
    storage.write_bytes_atomic(image, b"\x89PNG pretend", server.options())
    storage_config = {"endpoint_url": server.endpoint_url, "key": server.key, "secret": server.secret}
    storage_config |= {"retry_attempts": 30, "retry_base_s": 0.2, "retry_max_wait_s": 1.0}  # up to ~18 s of waits
    policy = RetryPolicy.from_storage(storage_config)
    out_uri = server.uri(prefix, "out")
    worker = FakeWorker()
    results: dict = {}

    def read() -> None:
        results["row"] = decode_row(work_row(image), worker, MediaOptions(), storage_config)

    def write() -> None:
        table = pa.Table.from_pylist([out_row("a", text="a caption")], schema=SCHEMA)
        results["part"] = output.write_part(table, out_uri, server.options(), policy)

    stop_s3_server(state["proc"])
    threads = [threading.Thread(target=read), threading.Thread(target=write)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    time.sleep(3.0)
    state["proc"] = relaunch_s3_server(server)  # same ports, same data
    for thread in threads:
        thread.join(timeout=60)
    assert not any(t.is_alive() for t in threads) and time.monotonic() - started >= 3.0
    row = results["row"]
    assert row["error_kind"] is None and row["attempts"] > 1 and worker.seen == [b"\x89PNG pretend"]
    assert results["part"].startswith(out_uri + "/part-")
    write_retries = [r for r in caplog.records if r.getMessage().startswith(f"writing part {results['part']}: attempt")]
    assert write_retries  # the write failed at least once before it succeeded: attempts > 1
    table = output.read_output(out_uri, server.options())
    assert table.column("text").to_pylist() == ["a caption"]
    # and after the outage: a missing object is still permanent, at once
    gone = decode_row(work_row(server.uri(prefix, "in", "gone.png")), worker, MediaOptions(), storage_config)
    assert (gone["error_kind"], gone["retryable"], gone["attempts"]) == ("not_found", False, 1)


def test_an_outage_as_the_run_starts_is_waited_out(waits, monkeypatch, tmp_path):
    """The held-out drill stops storage one second into a run: prepare()'s checks and listing retry it."""
    import pipeline.run as run

    config = load_config("configs/demo.yaml", [f"input.uri={tmp_path}/in", f"output.uri={tmp_path}/out"])
    checks = Flaky(EndpointConnectionError(endpoint_url=URL), ConnectionRefusedError())
    listing = Flaky(ConnectionResetError())
    monkeypatch.setattr(run, "preflight", lambda cfg: checks() and SimpleNamespace(model_type="llava"))
    monkeypatch.setattr(run, "load_work_rows", lambda cfg, options: listing() and [])
    prepared = run.prepare(config)
    assert checks.calls == 3 and listing.calls == 2 and len(waits) == 3
    assert prepared.todo == [] and prepared.model.model_type == "llava"


def test_a_wrong_bucket_as_the_run_starts_fails_at_once(waits, monkeypatch, tmp_path):
    import pipeline.run as run

    config = load_config("configs/demo.yaml", [f"input.uri={tmp_path}/in", f"output.uri={tmp_path}/out"])
    checks = Flaky(FileNotFoundError("bucket corpus-bucket does not exist"))
    monkeypatch.setattr(run, "preflight", lambda cfg: checks())
    with pytest.raises(FileNotFoundError, match="corpus-bucket"):
        run.prepare(config)
    assert checks.calls == 1 and waits == []
