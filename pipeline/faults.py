"""Transient or permanent: which storage failures are worth another try, and the retry loop that tries.

A *transient* failure may go away by itself: the endpoint refuses or drops connections (a restart, a
failover), a request times out, the service throttles (``SlowDown``, HTTP 429) or fails inside (HTTP 5xx).
A *permanent* one will not: the object is not there, access is denied, the request is malformed or too
large, the local disk is full or read-only, and anything this module does not recognise.

Errors reach us wrapped: s3fs turns a botocore ``ClientError`` into ``OSError``/``PermissionError``/
``FileNotFoundError`` with the original as ``__cause__`` (``s3fs.errors.translate_boto_error``), and
aiobotocore raises ``EndpointConnectionError`` while handling aiohttp's ``ClientConnectorError``. So
:func:`is_transient` walks the whole chain (``__cause__``, ``__context__``, exceptions in ``args``) and
the first link it recognises decides.

No Ray, no torch: the driver and the workers both use this module. botocore and aiohttp are optional.
"""

from __future__ import annotations

import errno
import http.client
import logging
import random
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

# A refused/reset connection or an unreachable network: the other side (or the path to it) is down for now.
TRANSIENT_ERRNOS = frozenset(
    {
        errno.ECONNREFUSED,
        errno.ECONNRESET,
        errno.ECONNABORTED,
        errno.ETIMEDOUT,
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
        errno.ENETDOWN,
        errno.EPIPE,
    }
)
# Not found, no access, full or read-only disk, bad argument, too large: trying again changes nothing.
PERMANENT_ERRNOS = frozenset(
    {
        errno.ENOENT,
        errno.EACCES,
        errno.EPERM,
        errno.EROFS,
        errno.ENOSPC,
        errno.EDQUOT,
        errno.EISDIR,
        errno.ENOTDIR,
        errno.EEXIST,
        errno.EINVAL,
        errno.EFBIG,
        errno.EMSGSIZE,
        errno.ENAMETOOLONG,
    }
)
# S3 (and AWS-style) error codes that mean "slow down" or "our fault, try again".
TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "RequestLimitExceeded",
        "TooManyRequestsException",
        "InternalError",
        "ServiceUnavailable",
        "RequestTimeout",
        "RequestTimeoutException",
        "500",
        "502",
        "503",
        "504",
    }
)

# s3fs raises these without an errno (FileNotFoundError(message)), so they are matched by class.
NOT_THERE_OR_NOT_ALLOWED = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)


class StorageUnavailable(OSError):
    """Storage kept failing transiently until the attempts ran out; a later run may well succeed.

    ``attempts``: how many times the operation was tried; ``cause``: the last error, on one line.
    The message names the operation (e.g. ``writing part s3://b/out/part-1a2b.parquet``), the attempt
    count and the cause. Picklable (Ray sends it from the task to the driver).
    """

    def __init__(self, message: str, attempts: int = 0, cause: str = "") -> None:
        super().__init__(message)
        self.attempts = attempts
        self.cause = cause

    def __reduce__(self):
        return (type(self), (self.args[0] if self.args else "", self.attempts, self.cause))


@dataclass(frozen=True)
class RetryPolicy:
    """How often, and how patiently, a storage operation is tried.

    Try ``attempts`` times; before try n+1 wait a random time in [0, min(max_wait_s, base_s * 2**(n-1))]
    ("full jitter": workers that failed together do not come back together). The defaults wait up to
    0.5 + 1 + 2 + 4 + 8 + 8 + 8 = 31.5 s in all, and each try against an unreachable S3 endpoint itself
    takes about 5 s (botocore's own retries), so 8 tries span 40 s or more: a ~30 s outage is ridden out.
    """

    attempts: int = 8
    base_s: float = 0.5
    max_wait_s: float = 8.0

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.base_s < 0 or self.max_wait_s < 0:
            raise ValueError(f"bad retry policy {self}: attempts must be >= 1, waits >= 0")

    @classmethod
    def from_storage(cls, storage_config: Mapping | None) -> RetryPolicy:
        """The policy of a ``storage`` config section (``StorageConfig.model_dump()``); defaults for missing keys."""
        config = storage_config or {}
        default = cls()
        return cls(
            attempts=config.get("retry_attempts", default.attempts),
            base_s=config.get("retry_base_s", default.base_s),
            max_wait_s=config.get("retry_max_wait_s", default.max_wait_s),
        )

    def wait_bound(self, failed: int) -> float:
        """The longest wait after the ``failed``-th failed try (1-based)."""
        return min(self.max_wait_s, self.base_s * 2 ** (failed - 1))

    @property
    def max_total_wait_s(self) -> float:
        return sum(self.wait_bound(n) for n in range(1, self.attempts))


# Module-level so tests can replace them (no real sleeping, a seeded generator).
_sleep: Callable[[float], None] = time.sleep
_random = random.Random()


def with_retries(fn: Callable[[], T], policy: RetryPolicy, what: str) -> tuple[T, int]:
    """``(fn(), attempts)``: call ``fn`` until it succeeds, retrying transient errors per ``policy``.

    A permanent error is raised at once, as it is, with ``.attempts`` set on it (how many tries it took to
    get there). When the attempts run out on a transient error, raises :class:`StorageUnavailable` (from
    that error) whose message is ``"{what} failed after N attempts ...: <cause>"``.
    """
    waited = 0.0
    for attempt in range(1, policy.attempts + 1):
        try:
            return fn(), attempt
        except Exception as error:
            if not is_transient(error):
                _set_attempts(error, attempt)
                raise
            if attempt == policy.attempts:
                cause = describe(error)
                raise StorageUnavailable(
                    f"{what} failed after {attempt} attempts ({waited:.1f} s of waiting): storage unavailable: {cause}",
                    attempt,
                    cause,
                ) from error
            wait = _random.uniform(0.0, policy.wait_bound(attempt))
            # info, not warning: a worker's warnings reach the driver's console, and the row records the attempts.
            log.info("%s: attempt %d of %d failed (%s); retry in %.2f s", what, attempt, policy.attempts, error, wait)
            _sleep(wait)
            waited += wait
    raise AssertionError("unreachable")  # the loop returns or raises


def attempts_of(error: BaseException) -> int:
    """How many tries ended in ``error`` (set by :func:`with_retries`; 1 for an error raised elsewhere)."""
    return getattr(error, "attempts", None) or 1


def _set_attempts(error: BaseException, attempts: int) -> None:
    try:
        error.attempts = attempts
    except (AttributeError, TypeError):  # an exception class with __slots__: the count is lost, not the error
        pass


def describe(error: BaseException) -> str:
    """``Type: message`` on one line, at most 300 characters."""
    text = " ".join(str(error).split()) or "(no message)"
    text = f"{type(error).__name__}: {text}"
    return text if len(text) <= 300 else text[:297] + "..."


def is_transient(error: BaseException) -> bool:
    """True when ``error`` (or what it wraps) is worth another try; unknown errors are permanent."""
    for link in chain(error):
        verdict = _verdict(link)
        if verdict is not None:
            return verdict
    return False


def chain(error: BaseException) -> Iterator[BaseException]:
    """``error``, then what it wraps (``__cause__``, ``__context__``, exceptions in ``args``), breadth first."""
    seen: set[int] = set()
    queue = [error]
    while queue:
        link = queue.pop(0)
        if id(link) in seen:
            continue
        seen.add(id(link))
        yield link
        queue += [e for e in (link.__cause__, link.__context__) if e is not None]
        queue += [a for a in getattr(link, "args", ()) if isinstance(a, BaseException)]


def _verdict(error: BaseException) -> bool | None:
    """True: transient; False: permanent; None: this link does not say (look at what it wraps)."""
    if isinstance(error, StorageUnavailable):
        return True
    for library_verdict in _library_errors():
        verdict = library_verdict(error) if library_verdict is not None else None
        if verdict is not None:
            return verdict
    if isinstance(error, NOT_THERE_OR_NOT_ALLOWED):
        return False
    # ConnectionRefused/Reset/Aborted, BrokenPipe; TimeoutError covers socket.timeout, asyncio's and fsspec's.
    if isinstance(error, ConnectionError | TimeoutError | http.client.IncompleteRead):
        return True
    if isinstance(error, OSError) and error.errno is not None:
        if error.errno in TRANSIENT_ERRNOS:
            return True
        if error.errno in PERMANENT_ERRNOS:
            return False
    return None  # e.g. s3fs's OSError(EIO/EBUSY) around a ClientError: its __cause__ decides


def _status_says(status: object) -> bool | None:
    if not isinstance(status, int):
        return None
    return status == 429 or status >= 500


@cache
def _library_errors() -> tuple[Callable | None, Callable | None]:
    """Verdict functions for botocore's and aiohttp's errors (None where the library is not installed)."""
    try:
        from botocore import exceptions as bc
        from botocore.parsers import ResponseParserError
    except ImportError:  # pragma: no cover - botocore is an s3fs dependency
        botocore_verdict = None
    else:
        # ConnectionError covers EndpointConnectionError and ConnectTimeoutError; HTTPClientError covers
        # ReadTimeoutError and ConnectionClosedError. An unparseable response is usually a throttling
        # reply in the wrong format (s3fs #484: s3fs retries those too).
        transient = (bc.ConnectionError, bc.HTTPClientError, bc.IncompleteReadError, ResponseParserError)

        def botocore_verdict(error: BaseException) -> bool | None:
            if isinstance(error, bc.ClientError):
                response = getattr(error, "response", None) or {}
                code = str((response.get("Error") or {}).get("Code") or "")
                status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
                return code in TRANSIENT_CODES or bool(_status_says(status))
            if isinstance(error, transient):
                return True
            if isinstance(error, bc.BotoCoreError):  # no credentials, bad parameters, ...
                return False
            return None

    try:
        import aiohttp
    except ImportError:  # pragma: no cover - an s3fs dependency
        aiohttp_verdict = None
    else:
        # A bad URL or certificate is not going to fix itself; a dropped or refused connection might.
        refused = (aiohttp.InvalidURL, aiohttp.ClientConnectorCertificateError, aiohttp.ClientSSLError)

        def aiohttp_verdict(error: BaseException) -> bool | None:
            if isinstance(error, aiohttp.ClientResponseError):
                return bool(_status_says(error.status))
            if isinstance(error, refused):
                return False
            if isinstance(error, aiohttp.ClientError):
                return True
            return None

    return botocore_verdict, aiohttp_verdict
