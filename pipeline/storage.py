"""Object-store and local file access through fsspec: options, fresh listings, atomic writes, access checks.

Every function takes a URI (``s3://bucket/key``, ``gs://...``, ``file:///path`` or a plain local path) and the
storage options from :func:`fsspec_options`. No Ray imports: the driver and the workers both use this module.
"""

from __future__ import annotations

import os
import posixpath
import uuid
from collections.abc import Iterable
from typing import NoReturn

import fsspec
from fsspec.implementations.local import LocalFileSystem
from fsspec.utils import get_protocol

S3_PROTOCOLS = ("s3", "s3a")


def _protocol(uri: str) -> str:
    return get_protocol(uri)


def fsspec_options(
    uri: str,
    endpoint_url: str | None = None,
    region: str | None = None,
    profile: str | None = None,
    key: str | None = None,
    secret: str | None = None,
    anon: bool = False,
    retry_attempts: int | None = None,
    retry_base_s: float | None = None,
    retry_max_wait_s: float | None = None,
) -> dict:
    """Storage options for ``fsspec.url_to_fs(uri, **options)``.

    s3:// gets s3fs keyword arguments; every other protocol gets ``{}``. Unset values are left out so that the
    standard AWS chain applies (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, AWS_PROFILE,
    AWS_DEFAULT_REGION, AWS_ENDPOINT_URL(_S3), ~/.aws profiles, instance roles).

    The ``retry_*`` settings are taken so that a whole ``storage`` section (``StorageConfig.model_dump()``)
    can be passed as is; they are no fsspec option: ``pipeline.faults.RetryPolicy.from_storage`` reads them.
    """
    if _protocol(uri) not in S3_PROTOCOLS:
        return {}
    # The listings cache is per instance and never sees writes from other processes (s3fs #657, #851): a resume
    # check or a marker lookup would trust a stale listing. Every listing here goes to the server.
    options: dict = {"use_listings_cache": False}
    if endpoint_url:
        options["endpoint_url"] = endpoint_url  # top-level kwarg since s3fs 2023.x
    if region:
        options["client_kwargs"] = {"region_name": region}
    if profile:
        options["profile"] = profile
    if key:
        options["key"] = key
    if secret:
        options["secret"] = secret
    if anon:
        options["anon"] = True
    return options


def open_fs(uri: str, options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path without protocol) for a URI."""
    return fsspec.core.url_to_fs(uri, **(options or {}))


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI, keeping its protocol: ``join("s3://b/p/", "x.parquet") == "s3://b/p/x.parquet"``."""
    parts = tuple(p.strip("/") for p in parts if p and p.strip("/"))
    if not parts:
        return uri
    if "://" not in uri:
        return os.path.join(uri, *parts)
    return "/".join([uri.rstrip("/"), *parts])


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def _full_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    # Local results stay plain absolute paths (what PIL, decord and friends expect); others keep the protocol.
    return path if _is_local(fs) else fs.unstrip_protocol(path)


def _hidden(name: str) -> bool:
    return name.startswith((".", "_"))


def list_files(uri: str, extensions: Iterable[str] | None, options: dict | None = None) -> list[tuple[str, int]]:
    """(URI, size in bytes) of every file under a prefix or directory, recursively, sorted by URI.

    The listing is always fresh. ``extensions`` (``"jpg"`` or ``".jpg"``, any case) filters by suffix; None keeps
    all files. Names starting with ``.`` or ``_`` anywhere below the root are skipped (temporary files, ``_done/``
    markers, ``.tmp/`` staging). A URI naming a single file returns just that file, unfiltered. Local results are
    absolute paths. A missing prefix raises FileNotFoundError.
    """
    fs, path = open_fs(uri, options)
    if isinstance(extensions, str):
        extensions = [extensions]
    suffixes = None if extensions is None else tuple("." + e.lower().lstrip(".") for e in extensions)
    fs.invalidate_cache(path)
    found = fs.find(path, withdirs=False, detail=True)
    if not found:
        if not fs.exists(path):
            raise FileNotFoundError(f"no such file, directory or prefix: {uri}")
        return []
    root = path.rstrip("/")
    out = []
    for name, info in found.items():
        if info.get("type") == "directory":
            continue
        if name != root:  # a file named by the URI itself is returned whatever its name
            if any(_hidden(part) for part in posixpath.relpath(name, root).split("/")):
                continue
            if suffixes is not None and not name.lower().endswith(suffixes):
                continue
        out.append((_full_uri(fs, name), int(info.get("size") or 0)))
    return sorted(out)


def read_bytes(uri: str, options: dict | None = None, max_bytes: int | None = None) -> bytes:
    """The whole object. With ``max_bytes``, a larger object raises ValueError before any of it is downloaded."""
    fs, path = open_fs(uri, options)
    if max_bytes is None:
        return fs.cat_file(path)
    fs.invalidate_cache(path)  # a cached size could be stale (s3fs #424)
    size = fs.size(path)
    if size is not None and size > max_bytes:
        raise ValueError(f"{uri} is {size} bytes, over the limit of {max_bytes} (media.max_bytes)")
    # Read at most one byte past the limit: an object replaced by a bigger one after the size check is still refused.
    data = fs.cat_file(path, start=0, end=max_bytes + 1)
    if len(data) > max_bytes:
        raise ValueError(f"{uri} is over {max_bytes} bytes, over the limit of {max_bytes} (media.max_bytes)")
    return data


def write_bytes_atomic(uri: str, data: bytes, options: dict | None = None) -> None:
    """Write an object so that readers see either the old state or all of ``data``, never a part of it.

    Local: a hidden temporary file in the same directory (so a ``*.parquet`` glob never matches it, and the rename
    stays on one filesystem), fsync, then ``os.replace``. Object stores: one PUT (``pipe_file``); an object only
    becomes visible when the PUT or the multipart upload completes.
    """
    fs, path = open_fs(uri, options)
    if not _is_local(fs):
        fs.pipe_file(path, data)
        fs.invalidate_cache(path)
        return
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    # os.open with 0o666 honours the umask, unlike tempfile.mkstemp's 0o600.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    # Make the rename itself durable across a crash.
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def exists(uri: str, options: dict | None = None) -> bool:
    """Whether a file or prefix exists, asked of the server (never a cached listing)."""
    fs, path = open_fs(uri, options)
    fs.invalidate_cache(path)
    return fs.exists(path)


def delete(uri: str, options: dict | None = None) -> None:
    """Delete one file; a missing file is not an error."""
    fs, path = open_fs(uri, options)
    try:
        fs.rm_file(path)
    except FileNotFoundError:
        pass
    fs.invalidate_cache(path)


def _endpoint(fs: fsspec.AbstractFileSystem, options: dict) -> str:
    endpoint = options.get("endpoint_url") or options.get("client_kwargs", {}).get("endpoint_url")
    if not endpoint:
        # The client's own endpoint also covers AWS_ENDPOINT_URL(_S3) and profile settings.
        client = getattr(fs, "s3", None)
        endpoint = getattr(getattr(client, "meta", None), "endpoint_url", None)
    return endpoint or "the default AWS endpoint"


def _scrub(text: str, options: dict) -> str:
    for secret in (options.get("secret"), options.get("token"), os.environ.get("AWS_SECRET_ACCESS_KEY")):
        if secret:
            text = text.replace(secret, "***")
    return text


def check_access(uri: str, options: dict | None = None, write: bool = False) -> None:
    """Fail fast, before any cluster work, when a URI cannot be read (or, with ``write``, written).

    s3: checks the credentials and that the bucket exists with one ListObjectsV2 call (the prefix itself may still
    be empty, e.g. a new output prefix). Wrong credentials raise PermissionError, a missing bucket
    FileNotFoundError, an unreachable endpoint ConnectionError: one message naming the URI and the endpoint,
    never the secret. Local paths must exist unless ``write``; a local output is checked without
    creating anything (it is created when there is work): an existing file there raises
    NotADirectoryError, a folder that cannot be written PermissionError. Other ``write=True`` checks
    write and delete a small ``_probe-*`` object under the URI.
    """
    options = options or {}
    fs, path = open_fs(uri, options)
    if _protocol(uri) in S3_PROTOCOLS:
        _check_s3(uri, fs, path, options, write)
        return
    if _is_local(fs) and write:
        _check_local_output(uri, path)
        return
    if not write and not fs.exists(path):
        raise FileNotFoundError(f"{uri} does not exist")
    if write:
        probe = join(uri, f"_probe-{uuid.uuid4().hex}")
        write_bytes_atomic(probe, b"probe", options)
        delete(probe, options)


def _check_local_output(uri: str, path: str) -> None:
    """A local output folder can be created and written: it is a folder (or does not exist yet) and
    the folder itself or its nearest existing parent is writable. Nothing is created."""
    path = os.path.abspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(
            f"output {uri} is an existing file; give a folder (new or existing) for the Parquet parts"
        )
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise NotADirectoryError(f"output {uri} cannot be created: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "is not writable" if existing == path else f"cannot be created: {existing} is not writable"
        raise PermissionError(f"output {uri} {what}")
    if existing == path:  # an existing folder: prove a write lands (a full or read-only disk fails here)
        probe = os.path.join(path, f"_probe-{uuid.uuid4().hex}")
        write_bytes_atomic(probe, b"probe")
        os.unlink(probe)


def _check_s3(uri: str, fs, path: str, options: dict, write: bool) -> None:
    from botocore.exceptions import BotoCoreError, NoCredentialsError

    bucket, _, prefix = path.partition("/")

    def fail(exc: BaseException, what: str) -> NoReturn:
        where = f"{uri} (endpoint {_endpoint(fs, options)})"
        reason = _scrub(str(exc) or type(exc).__name__, options)
        if isinstance(exc, NoCredentialsError):
            raise PermissionError(
                f"cannot {what} {where}: no credentials found; set storage key/secret or profile, "
                "or AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_PROFILE"
            ) from None
        if isinstance(exc, PermissionError):
            raise PermissionError(f"cannot {what} {where}: access denied, check the key and secret: {reason}") from None
        if isinstance(exc, FileNotFoundError):
            raise FileNotFoundError(f"cannot {what} {where}: bucket {bucket!r} does not exist: {reason}") from None
        raise ConnectionError(f"cannot {what} {where}: {type(exc).__name__}: {reason}") from None

    try:
        # One cheap call that needs valid credentials and an existing bucket; s3fs maps the S3 error codes
        # (SignatureDoesNotMatch, InvalidAccessKeyId, AccessDenied -> PermissionError; NoSuchBucket ->
        # FileNotFoundError).
        fs.call_s3("list_objects_v2", Bucket=bucket, Prefix=prefix, MaxKeys=1)
    except (OSError, BotoCoreError) as exc:
        fail(exc, "read")
    if write:
        probe = join(uri, f"_probe-{uuid.uuid4().hex}")
        try:
            write_bytes_atomic(probe, b"probe", options)
            delete(probe, options)
        except (OSError, BotoCoreError) as exc:
            fail(exc, "write to")
