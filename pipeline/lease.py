"""One run at a time per (output, config): a lease object under the output, renewed while the run lives.

Two runs of the same config into the same output (a cron schedule firing while the last run still
works) would each redo every item the other has not committed yet. The first run to start takes a
lease; the second finds it held and stops at once with :class:`LeaseHeld`. A run killed without
cleaning up stops renewing; once its lease expires the next run takes it over and resumes.

Where it lives:

* object stores: ``<output>/_leases/<fingerprint>.json``, one object;
* local folders: ``<output>/_leases/<fingerprint>/<generation>.json``, the newest generation counts.

What it holds: run id, config fingerprint, host, pid (and the pid's start time and this machine's
boot id / pid namespace), start, last renewal and expiry (epoch seconds, and the same in UTC for
people), ``released`` once its run ended, and a fresh ``nonce`` per write.

Guarantees (every change is a compare-and-swap on what was read, so two runs that find the same
stale lease cannot both win):

* local folders (any POSIX filesystem with atomic ``link``/``O_EXCL``, NFS included): each change
  creates generation N+1 exclusively; the loser of a race gets EEXIST. Race-free.
* S3 (AWS since 2024, SeaweedFS 4.x, MinIO): ``PutObject`` with ``IfNoneMatch='*'`` to create and
  ``IfMatch=<etag>`` to renew, take over and release; the loser gets 412. Race-free. The first
  write of each run probes that the store honours the condition (a second create must fail).
* S3 stores that ignore or refuse those conditions, and other fsspec stores: write, wait
  ``settle_s``, read back and keep the lease only if it still holds this write's nonce; the last
  writer wins. Best effort: two runs whose read-then-write straddle each other by more than
  ``settle_s`` can both run until the next renewal (``ttl_s / 3``), when the loser finds out.

Expiry is judged by the reader's clock against the holder's: hosts sharing an output need clocks
within a few seconds of each other (NTP). On the holder's own machine (same boot and pid namespace)
a lease whose process is gone is free at once, without waiting for it to expire.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import hashlib
import json
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from pipeline import procinfo, storage

# A SIGKILLed run's lease blocks reruns for at most this long. Renewal every ttl/3 (20 s) leaves two
# missed renewals (40 s: an object-store outage, a stalled driver) before a live run can lose its
# lease; a killed run's rerun waits at most a minute, on the holder's own machine not at all.
DEFAULT_TTL_S = 60.0
# Fallback stores only (see the module docstring): how long a write is given to become the last one.
DEFAULT_SETTLE_S = 1.0
RETRY_S = 5.0  # after a failed renewal, the next try comes sooner than ttl/3
LEASES = "_leases"


class LeaseHeld(RuntimeError):
    """Another live run of the same config holds the output's lease."""

    def __init__(self, output: str, holder: LeaseRecord):
        self.output, self.holder = output, holder
        super().__init__(
            f"output {output} is being written by run {holder.run_id} (host {holder.host}, pid {holder.pid}, "
            f"started {utc(holder.started)}) with the same config; its lease expires at {utc(holder.expires)} "
            "unless renewed; wait for it to finish, or rerun after that"
        )


class LeaseLost(RuntimeError):
    """This run's lease was taken over by another run (it went unrenewed past its expiry)."""

    def __init__(self, output: str, run_id: str, holder: LeaseRecord | None):
        self.output, self.run_id, self.holder = output, run_id, holder
        by = (
            f"run {holder.run_id} (host {holder.host}, pid {holder.pid}, started {utc(holder.started)})"
            if holder
            else "nobody (the lease was deleted)"
        )
        super().__init__(
            f"run {run_id} lost its lease on output {output} to {by} after going unrenewed past its expiry; "
            "stopping so that two runs do not write the same items; parts already written are kept"
        )


def utc(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


@dataclass
class LeaseRecord:
    """The lease's content (JSON)."""

    run_id: str
    fingerprint: str
    host: str
    pid: int
    started: float  # epoch seconds
    renewed: float
    expires: float
    ttl_s: float
    nonce: str  # new on every write: how a writer recognises its own write when reading back
    generation: int = 1
    released: bool = False
    pid_start: int | None = None  # procinfo.start_time(pid): tells the holder from a later process with its pid
    machine: str | None = None  # procinfo.machine_identity(): whose pids pid/pid_start are

    def free(self, now: float) -> bool:
        """Released by its run, or expired (its run stopped renewing)."""
        return self.released or now >= self.expires

    def holder_gone(self) -> bool:
        """The holder ran on this machine (same boot, same pid namespace) and its process is gone."""
        return (
            self.machine is not None
            and self.machine == procinfo.machine_identity()
            and not procinfo.alive(self.pid, self.pid_start)
        )

    def to_bytes(self) -> bytes:
        data = dataclasses.asdict(self)
        data.update(started_utc=utc(self.started), renewed_utc=utc(self.renewed), expires_utc=utc(self.expires))
        return json.dumps(data, indent=2).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> LeaseRecord:
        raw = json.loads(data)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})

    @classmethod
    def unreadable(cls, since: float) -> LeaseRecord:
        """Stand-in for a lease file that cannot be parsed (half-written on a store without ``link``,
        or damaged): held for one default ttl from its modification time, then free."""
        return cls("unknown", "", "unknown", 0, since, since, since + DEFAULT_TTL_S, DEFAULT_TTL_S, "")


def lease_uri(output_uri: str, fingerprint: str) -> str:
    """Where the lease of ``fingerprint`` under ``output_uri`` lives (object stores: the object;
    local: the folder of generations)."""
    name = fingerprint if storage._protocol(output_uri) in ("file", "local") else f"{fingerprint}.json"
    return storage.join(output_uri, LEASES, name)


# --- stores: read() -> (record | None, token); write(record, token) -> new token, or None when the
# lease changed since ``token`` was read (someone else wrote it: re-read and decide again).


class _LocalStore:
    """Generation files ``<NNNNNNNNNNNN>.json`` in one folder; the highest is the lease.

    A change from generation N creates N+1 with ``link`` (the whole content appears at once, and
    only one creator can succeed), checks that nothing higher exists, then deletes older
    generations. The highest generation is never deleted, so numbers never go back and a stale
    reader's create always collides or is caught by that check.
    """

    conditional = True
    _NAME = re.compile(r"^(\d{12})\.json$")

    def __init__(self, directory: str):
        self.directory = directory

    def _path(self, generation: int) -> str:
        return os.path.join(self.directory, f"{generation:012d}.json")

    def _generations(self) -> list[int]:
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        return sorted(int(m.group(1)) for m in map(self._NAME.match, names) if m)

    def read(self) -> tuple[LeaseRecord | None, int]:
        for _ in range(50):
            generations = self._generations()
            if not generations:
                return None, 0
            path = self._path(generations[-1])
            try:
                with open(path, "rb") as f:
                    data = f.read()
                mtime = os.stat(path).st_mtime
            except FileNotFoundError:  # deleted by the creator of a newer generation: list again
                continue
            try:
                return LeaseRecord.from_bytes(data), generations[-1]
            except (ValueError, TypeError):
                if time.time() - mtime < 1.0:  # being written without link (see _create): look again
                    time.sleep(0.05)
                    continue
                return LeaseRecord.unreadable(mtime), generations[-1]
        raise OSError(f"lease folder {self.directory} keeps changing under the reader")

    def write(self, record: LeaseRecord, token: int) -> int | None:
        os.makedirs(self.directory, exist_ok=True)
        new = token + 1
        target = self._path(new)
        if not self._create(target, record.to_bytes()):
            return None
        generations = self._generations()
        if generations[-1] != new:  # a stale reader re-created an old number after it was deleted
            _unlink(target)
            return None
        for old in generations[:-1]:
            _unlink(self._path(old))
        return new

    def _create(self, target: str, data: bytes) -> bool:
        """Create ``target`` with ``data`` unless it exists; False if it does."""
        tmp = os.path.join(self.directory, f".{uuid.uuid4().hex}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, target)
            except FileExistsError:
                return False
            except OSError as e:
                if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.ENOSYS):
                    raise
                # No hard links here (some FUSE and SMB mounts): O_EXCL is as exclusive, but readers may
                # see the file empty for a moment (read() looks again).
                try:
                    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
                except FileExistsError:
                    return False
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
        finally:
            _unlink(tmp)
        _fsync_dir(self.directory)
        return True


class _VerifiedStore:
    """Any fsspec store: plain writes made safe(ish) by waiting ``settle_s`` and reading back."""

    conditional = False

    def __init__(self, fs, path: str, settle_s: float):
        self.fs, self.path, self.settle_s = fs, path, settle_s

    def _get(self) -> tuple[bytes | None, str | None]:
        try:
            data = self.fs.cat_file(self.path)
        except FileNotFoundError:
            return None, None
        return data, hashlib.sha1(data).hexdigest()

    def _put(self, data: bytes) -> None:
        self.fs.pipe_file(self.path, data)

    def read(self) -> tuple[LeaseRecord | None, str | None]:
        data, token = self._get()
        if data is None:
            return None, None
        try:
            return LeaseRecord.from_bytes(data), token
        except (ValueError, TypeError):
            return LeaseRecord.unreadable(0.0), token  # damaged: free (its expiry is long past)

    def write(self, record: LeaseRecord, token: str | None) -> str | None:
        if self._get()[1] != token:
            return None
        self._put(record.to_bytes())
        return self._verify(record)

    def _verify(self, record: LeaseRecord) -> str | None:
        """Wait for racing writers to land, then keep the lease only if the last write was ours."""
        time.sleep(self.settle_s)
        current, token = self.read()
        return token if current is not None and current.nonce == record.nonce else None


class _S3Store(_VerifiedStore):
    """S3 conditional writes; the token is the object's ETag. Falls back to :class:`_VerifiedStore`'s
    write-and-read-back when the store refuses the conditions (501) or is found to ignore them."""

    conditional = True

    def __init__(self, fs, path: str, settle_s: float):
        super().__init__(fs, path, settle_s)
        self.bucket, _, self.key = path.partition("/")
        self.probed = False

    def _get(self) -> tuple[bytes | None, str | None]:
        fs = self.fs

        async def get() -> tuple[bytes, str]:
            # One GET gives the content and its ETag together (a HEAD then a GET could straddle a write).
            response = await fs._call_s3("get_object", Bucket=self.bucket, Key=self.key)
            try:
                return await response["Body"].read(), response["ETag"]
            finally:
                response["Body"].close()

        try:
            return _run(fs, get())
        except FileNotFoundError:
            return None, None

    def write(self, record: LeaseRecord, token: str | None) -> str | None:
        if not self.conditional:
            return super().write(record, token)
        data = record.to_bytes()
        condition = {"IfNoneMatch": "*"} if token is None else {"IfMatch": token}
        try:
            response = self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.key, Body=data, **condition)
        except Exception as e:  # noqa: BLE001 - s3fs raises OSError subclasses, botocore its own errors
            code, status = _s3_error(e)
            if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
                # Lost the race, or won it and a retry of the same PUT (s3fs retries) was refused: the nonce says.
                current, etag = self.read()
                return etag if current is not None and current.nonce == record.nonce else None
            if code == "NotImplemented" or status == 501:
                self.conditional = False
                return super().write(record, token)
            raise
        if not self.probed:
            self.probed = True
            if self._ignores_conditions(data):
                self.conditional = False
                return self._verify(record)
        return response.get("ETag")

    def _ignores_conditions(self, data: bytes) -> bool:
        """Whether a create-if-absent of the object we just wrote succeeds (the store ignores
        If-None-Match). The same bytes go up, so a store that does ignore it is left unchanged."""
        try:
            self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.key, Body=data, IfNoneMatch="*")
        except Exception as e:  # noqa: BLE001
            code, status = _s3_error(e)
            if code == "PreconditionFailed" or status == 412 or isinstance(e, FileExistsError):
                return False
            raise
        return True


def _run(fs, coroutine):
    from fsspec.asyn import sync

    return sync(fs.loop, asyncio.wait_for, coroutine, 60)


def _s3_error(error: BaseException) -> tuple[str | None, int | None]:
    """(S3 error code, HTTP status) of an s3fs/botocore error, from it or its causes."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        response = getattr(error, "response", None)
        if isinstance(response, dict):
            return response.get("Error", {}).get("Code"), response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        error = error.__cause__ or error.__context__
    return None, None


def _store(output_uri: str, fingerprint: str, options: dict | None, settle_s: float):
    fs, path = storage.open_fs(lease_uri(output_uri, fingerprint), options)
    if storage._is_local(fs):
        return _LocalStore(path)
    if storage._protocol(output_uri) in storage.S3_PROTOCOLS:
        return _S3Store(fs, path, settle_s)
    return _VerifiedStore(fs, path, settle_s)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- the lease


class Lease:
    """A held lease: renewed every ``ttl_s / 3`` by a daemon thread until :meth:`release`.

    When a renewal finds that another run took the lease over, ``lost`` is set, ``lost_to`` names
    the new holder, ``on_lost`` is called (from the renewal thread) and :meth:`check` raises
    :class:`LeaseLost`. A renewal that
    fails for another reason (the store unreachable) is retried every few seconds; ``last_error``
    keeps the latest such error.
    """

    def __init__(
        self,
        store,
        output: str,
        record: LeaseRecord,
        token,
        log: Callable[[str], None],
        on_lost: Callable[[LeaseRecord | None], None] | None,
        previous: LeaseRecord | None = None,
    ):
        self.output, self.record, self._store, self._token = output, record, store, token
        self.previous = previous  # the lease this one replaced (released, expired or its process gone), if any
        self._log, self._on_lost = log, on_lost
        self.lost = False
        self.lost_to: LeaseRecord | None = None  # who holds it now; None if the lease object was deleted
        self.released = False
        self.renewals = 0
        self.last_error: BaseException | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew_loop, name=f"lease-{record.run_id}", daemon=True)

    @property
    def run_id(self) -> str:
        return self.record.run_id

    def _start(self) -> Lease:
        self._thread.start()
        return self

    def _renew_loop(self) -> None:
        period = self.record.ttl_s / 3
        wait = period
        while not self._stop.wait(wait):
            try:
                if not self.renew():
                    return
                wait = period
            except Exception as e:  # noqa: BLE001 - a flaky store must not end the renewals
                self.last_error = e
                wait = min(period, RETRY_S)

    def renew(self) -> bool:
        """Push the expiry ``ttl_s`` ahead; False when the lease is lost or released."""
        with self._lock:
            if self.lost or self.released:
                return False
            now = time.time()
            new = dataclasses.replace(
                self.record,
                renewed=now,
                expires=now + self.record.ttl_s,
                nonce=uuid.uuid4().hex,
                generation=self.record.generation + 1,
            )
            token = self._store.write(new, self._token)
            if token is not None:
                self.record, self._token = new, token
                self.renewals += 1
                self.last_error = None
                return True
            self.lost_to, _ = self._store.read()
            self.lost = True
        self._log(str(LeaseLost(self.output, self.record.run_id, self.lost_to)))
        if self._on_lost is not None:
            self._on_lost(self.lost_to)
        return False

    def check(self) -> None:
        """Raise :class:`LeaseLost` if another run has taken this lease over."""
        if self.lost:
            raise LeaseLost(self.output, self.record.run_id, self.lost_to)

    def release(self) -> None:
        """Stop renewing and mark the lease released, so the next run need not wait for it to expire.

        A release that cannot be written (the store unreachable) only costs the next run the wait
        until the expiry; it is logged, never raised.
        """
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=max(30.0, self.record.ttl_s))
        with self._lock:
            if self.lost or self.released:
                return
            self.released = True
            now = time.time()
            new = dataclasses.replace(
                self.record,
                renewed=now,
                expires=now,
                released=True,
                nonce=uuid.uuid4().hex,
                generation=self.record.generation + 1,
            )
            try:
                if self._store.write(new, self._token) is not None:
                    self.record = new
            except Exception as e:  # noqa: BLE001
                self._log(
                    f"could not release the lease on output {self.output} ({type(e).__name__}: {e}); "
                    f"the next run can take it over after {utc(self.record.expires)}"
                )

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def acquire(
    output_uri: str,
    fingerprint: str,
    options: dict | None = None,
    run_id: str | None = None,
    ttl_s: float = DEFAULT_TTL_S,
    log: Callable[[str], None] = print,
    on_lost: Callable[[LeaseRecord | None], None] | None = None,
    settle_s: float = DEFAULT_SETTLE_S,
) -> Lease:
    """Take the lease of ``fingerprint`` under ``output_uri``, or raise :class:`LeaseHeld`.

    Free (absent, released, expired, or its holder's process gone on this machine): taken, taking
    over an unreleased one with one ``log`` line. Use as a context manager, or call ``release()``.
    """
    store = _store(output_uri, fingerprint, options, settle_s)
    run_id = run_id or uuid.uuid4().hex[:12]
    for _ in range(20):
        current, token = store.read()
        now = time.time()
        gone = current is not None and not current.free(now) and current.holder_gone()
        if current is not None and not current.free(now) and not gone:
            raise LeaseHeld(output_uri, current)
        me = os.getpid()
        record = LeaseRecord(
            run_id=run_id,
            fingerprint=fingerprint,
            host=socket.gethostname(),
            pid=me,
            started=now,
            renewed=now,
            expires=now + ttl_s,
            ttl_s=ttl_s,
            nonce=uuid.uuid4().hex,
            generation=(current.generation + 1) if current else 1,
            pid_start=procinfo.start_time(me),
            machine=procinfo.machine_identity(),
        )
        new_token = store.write(record, token)
        if new_token is None:
            continue  # someone else changed it first: read again (it is most likely held now)
        if current is not None and not current.released:
            why = (
                f"whose process (pid {current.pid}) is no longer running"
                if gone
                else f"which expired at {utc(current.expires)} without renewal (its run was killed or lost)"
            )
            log(
                f"output {output_uri}: run {run_id} takes over the lease of run {current.run_id} (host "
                f"{current.host}, pid {current.pid}, started {utc(current.started)}), {why}; resuming its work"
            )
        return Lease(store, output_uri, record, new_token, log, on_lost, current)._start()
    raise OSError(f"could not take the lease of output {output_uri}: it kept changing under this run")


def read_lease(output_uri: str, fingerprint: str, options: dict | None = None) -> LeaseRecord | None:
    """The lease as it is now (None if there is none): who holds it, until when."""
    return _store(output_uri, fingerprint, options, DEFAULT_SETTLE_S).read()[0]
