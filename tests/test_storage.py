"""pipeline.storage against a real S3 server (SeaweedFS on loopback) and the local filesystem."""

from __future__ import annotations

import glob
import io
import os
import threading
import uuid

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs

from evaluation.s3_server import S3Server
from pipeline import storage


@pytest.fixture
def s3_root(s3_server: S3Server) -> str:
    """A fresh prefix per test: the server and its bucket are shared by the whole session."""
    return s3_server.uri(f"t-{uuid.uuid4().hex[:12]}")


@pytest.fixture(params=["s3", "local"])
def root(request, tmp_path) -> tuple[str, dict]:
    """(root URI, storage options) on the S3 server and on a local directory."""
    if request.param == "local":
        return str(tmp_path / "root"), storage.fsspec_options(str(tmp_path))
    server = request.getfixturevalue("s3_server")
    return request.getfixturevalue("s3_root"), server.options()


def other_client(server: S3Server) -> s3fs.S3FileSystem:
    """An independent client, standing in for another process (its own instance, its own listings cache)."""
    return s3fs.S3FileSystem(
        endpoint_url=server.endpoint_url, key=server.key, secret=server.secret, skip_instance_cache=True
    )


# --- options and URIs -------------------------------------------------------------------------------------------


def test_fsspec_options_only_set_values():
    assert storage.fsspec_options("s3://b/p") == {"use_listings_cache": False}
    opts = storage.fsspec_options(
        "s3://b/p", endpoint_url="http://h:1", region="eu-west-1", profile="p", key="k", secret="s", anon=True
    )
    assert opts == {
        "use_listings_cache": False,
        "endpoint_url": "http://h:1",
        "client_kwargs": {"region_name": "eu-west-1"},
        "profile": "p",
        "key": "k",
        "secret": "s",
        "anon": True,
    }
    for uri in ("/tmp/x", "relative/dir", "file:///tmp/x", "gs://b/p", "memory://x"):
        assert storage.fsspec_options(uri, endpoint_url="http://h:1", key="k") == {}


def test_join_keeps_protocol():
    assert storage.join("s3://b/p", "x.parquet") == "s3://b/p/x.parquet"
    assert storage.join("s3://b/p/", "/sub/", "x.parquet") == "s3://b/p/sub/x.parquet"
    assert storage.join("s3://b", "x") == "s3://b/x"
    assert storage.join("file:///tmp/a", "b") == "file:///tmp/a/b"
    assert storage.join("/tmp/a", "b", "c.json") == "/tmp/a/b/c.json"
    assert storage.join("s3://b/p") == "s3://b/p"


# --- read / write / list ----------------------------------------------------------------------------------------


def test_write_read_round_trip(root):
    base, opts = root
    uri = storage.join(base, "deep/nested/obj.bin")
    payload = os.urandom(100_000)
    assert not storage.exists(uri, opts)
    storage.write_bytes_atomic(uri, payload, opts)
    assert storage.exists(uri, opts)
    assert storage.read_bytes(uri, opts) == payload
    storage.write_bytes_atomic(uri, b"second", opts)  # overwrite
    assert storage.read_bytes(uri, opts) == b"second"
    storage.delete(uri, opts)
    assert not storage.exists(uri, opts)
    storage.delete(uri, opts)  # missing is fine
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(uri, opts)


def test_list_files(root):
    base, opts = root
    files = {
        "b.jpg": 3,
        "a.JPG": 5,
        "sub/c.png": 7,
        "sub/deeper/d.jpeg": 11,
        "sub/notes.txt": 13,
        ".hidden.jpg": 1,
        "_SUCCESS": 1,
        "sub/_x.jpg": 1,
        "_done/e.jpg": 1,
        ".tmp/part-0.jpg": 1,
    }
    for name, size in files.items():
        storage.write_bytes_atomic(storage.join(base, name), b"x" * size, opts)
    # A sibling whose name starts with the root's name must not leak into the listing of the root.
    storage.write_bytes_atomic(base.rstrip("/") + "-sibling/z.jpg", b"z", opts)

    got = storage.list_files(base, None, opts)
    expected = sorted((storage.join(base, n), s) for n, s in files.items() if not n.startswith((".", "_", "sub/_")))
    assert got == expected
    assert [u for u, _ in got] == sorted(u for u, _ in got)
    if base.startswith("s3://"):
        assert all(u.startswith("s3://") for u, _ in got)
    else:
        assert all(os.path.isabs(u) for u, _ in got)

    images = storage.list_files(base, ["JPG", ".png", "jpeg"], opts)
    assert [(u.rsplit("/", 1)[-1], s) for u, s in images] == [("a.JPG", 5), ("b.jpg", 3), ("c.png", 7), ("d.jpeg", 11)]
    assert storage.list_files(base, "txt", opts) == [(storage.join(base, "sub/notes.txt"), 13)]
    assert storage.list_files(base + "/", [".png"], opts) == [(storage.join(base, "sub/c.png"), 7)]

    # A URI naming one file lists just that file.
    single = storage.join(base, "sub/c.png")
    assert storage.list_files(single, None, opts) == [(single, 7)]
    named = storage.join(base, "sub/_x.jpg")  # named explicitly: not filtered
    assert storage.list_files(named, ["png"], opts) == [(named, 1)]

    missing = storage.join(base, "no-such-prefix")
    with pytest.raises(FileNotFoundError, match="no-such-prefix"):
        storage.list_files(missing, None, opts)


def test_list_files_local_file_uri(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.jpg").write_bytes(b"123")
    assert storage.list_files(f"file://{tmp_path}", None) == [(str(tmp_path / "a" / "x.jpg"), 3)]


def test_other_fsspec_protocol_memory():
    base = f"memory://storage-test-{uuid.uuid4().hex[:8]}"
    storage.write_bytes_atomic(storage.join(base, "a/x.jpg"), b"abc")
    [(uri, size)] = storage.list_files(base, ["jpg"])
    assert size == 3 and uri.startswith("memory://")
    assert storage.read_bytes(uri) == b"abc"


def test_fresh_listing_sees_writes_by_another_client(s3_server, s3_root):
    opts = s3_server.options()
    storage.write_bytes_atomic(storage.join(s3_root, "_done/0.json"), b"{}", opts)
    assert [u for u, _ in storage.list_files(storage.join(s3_root, "_done"), None, opts)] == [
        storage.join(s3_root, "_done/0.json")
    ]
    # Even a caller who turned the listings cache back on gets a fresh listing.
    cached_opts = dict(opts, use_listings_cache=True)
    fs, path = storage.open_fs(s3_root, cached_opts)
    assert fs.ls(path + "/_done", detail=False) == [path + "/_done/0.json"]
    assert storage.list_files(storage.join(s3_root, "_done"), None, cached_opts)

    # Another process writes a marker...
    other_client(s3_server).pipe_file(f"{path}/_done/1.json", b"{}")
    # ... which a cached s3fs listing does not see (the stale-listing hazard, s3fs #851) ...
    assert fs.ls(path + "/_done", detail=False) == [path + "/_done/0.json"]
    # ... but every listing here does.
    want = [storage.join(s3_root, "_done/0.json"), storage.join(s3_root, "_done/1.json")]
    for o in (opts, cached_opts):
        assert [u for u, _ in storage.list_files(storage.join(s3_root, "_done"), None, o)] == want
        assert storage.exists(storage.join(s3_root, "_done/1.json"), o)


def test_read_bytes_max_bytes(root, monkeypatch):
    base, opts = root
    uri = storage.join(base, "big.bin")
    storage.write_bytes_atomic(uri, b"x" * 1000, opts)
    assert storage.read_bytes(uri, opts, max_bytes=1000) == b"x" * 1000

    fs, _ = storage.open_fs(uri, opts)  # fsspec caches instances: this is the one read_bytes uses

    def no_download(*args, **kwargs):
        raise AssertionError("downloaded an object over the limit")

    monkeypatch.setattr(fs, "cat_file", no_download)
    monkeypatch.setattr(fs, "open", no_download)
    with pytest.raises(ValueError, match=r"is 1000 bytes, over the limit of 999 \(media.max_bytes\)") as err:
        storage.read_bytes(uri, opts, max_bytes=999)
    assert uri in str(err.value)


# --- access checks and credentials ------------------------------------------------------------------------------


def test_check_access_ok_and_probe_cleaned_up(s3_server, s3_root):
    opts = s3_server.options()
    storage.check_access(s3_root, opts)  # an empty (new output) prefix is fine
    storage.check_access(s3_root, opts, write=True)
    storage.check_access(s3_server.uri(), opts, write=True)  # bucket root
    # The probe objects are gone. (SeaweedFS, being filer-backed, may keep the emptied "directory" itself.)
    listing = other_client(s3_server).call_s3("list_objects_v2", Bucket=s3_server.bucket)
    keys = [obj["Key"] for obj in listing.get("Contents", [])]
    assert not [k for k in keys if "_probe-" in k]


def test_check_access_wrong_secret(s3_server, s3_root):
    wrong = "WrongSecret-" + uuid.uuid4().hex
    opts = dict(s3_server.options(), secret=wrong)
    for write in (False, True):
        with pytest.raises(PermissionError) as err:
            storage.check_access(s3_root, opts, write=write)
        message = str(err.value)
        assert s3_root in message and s3_server.endpoint_url in message
        assert wrong not in message and s3_server.secret not in message
        assert err.value.__cause__ is None and err.value.__suppress_context__  # one message, no chained trace
    # An unknown access key is refused the same way.
    with pytest.raises(PermissionError):
        storage.check_access(s3_root, dict(s3_server.options(), key="no-such-key"))


def test_check_access_missing_bucket(s3_server):
    uri = "s3://no-such-bucket-" + uuid.uuid4().hex[:8] + "/out"
    with pytest.raises(FileNotFoundError) as err:
        storage.check_access(uri, s3_server.options(), write=True)
    assert uri in str(err.value) and s3_server.endpoint_url in str(err.value)


def test_check_access_local(tmp_path):
    with pytest.raises(FileNotFoundError):
        storage.check_access(str(tmp_path / "missing"))
    out = tmp_path / "new" / "out"
    storage.check_access(str(out), write=True)
    assert not (tmp_path / "new").exists()  # checked, not created: the run creates it when there is work
    out.mkdir(parents=True)
    storage.check_access(str(out), write=True)
    assert list(out.iterdir()) == []  # the probe is gone
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="is an existing file"):
        storage.check_access(str(tmp_path / "file"), write=True)
    with pytest.raises(NotADirectoryError, match="is a file"):
        storage.check_access(str(tmp_path / "file" / "out"), write=True)
    (tmp_path / "locked").mkdir(mode=0o500)
    if os.geteuid() != 0:  # root writes anywhere
        with pytest.raises(PermissionError, match="not writable"):
            storage.check_access(str(tmp_path / "locked" / "out"), write=True)


@pytest.fixture
def clean_aws_env(monkeypatch, tmp_path):
    """No AWS_* variables, no ~/.aws files, no instance metadata, no s3fs instance made under another environment."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    s3fs.S3FileSystem.clear_instance_cache()  # fsspec reuses instances by kwargs, whatever the environment
    yield monkeypatch
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def aws_env(clean_aws_env, s3_server):
    """Only the server's AWS_* variables, as a Ray job started with ``s3_server.env()`` would see them."""
    for name, value in s3_server.env().items():
        clean_aws_env.setenv(name, value)
    return clean_aws_env


def test_credentials_and_endpoint_from_environment(aws_env, s3_server, s3_root):
    opts = storage.fsspec_options(s3_root)
    assert opts == {"use_listings_cache": False}  # nothing but the environment tells it where and who
    storage.check_access(s3_root, opts, write=True)
    uri = storage.join(s3_root, "env/x.txt")
    storage.write_bytes_atomic(uri, b"from env", opts)
    assert storage.read_bytes(uri, opts) == b"from env"
    assert storage.list_files(s3_root, None, opts) == [(uri, 8)]

    wrong = "EnvWrongSecret-" + uuid.uuid4().hex
    aws_env.setenv("AWS_SECRET_ACCESS_KEY", wrong)
    s3fs.S3FileSystem.clear_instance_cache()
    with pytest.raises(PermissionError) as err:
        storage.check_access(s3_root, opts)
    assert wrong not in str(err.value) and s3_server.endpoint_url in str(err.value)


def test_check_access_without_any_credentials(clean_aws_env, s3_server, s3_root):
    with pytest.raises(PermissionError, match="no credentials found") as err:
        storage.check_access(s3_root, storage.fsspec_options(s3_root, endpoint_url=s3_server.endpoint_url))
    assert s3_root in str(err.value)


# --- atomic local writes ----------------------------------------------------------------------------------------


def test_local_atomic_write_never_shows_partial_parquet(tmp_path, monkeypatch):
    out = tmp_path / "out"
    target = str(out / "part-0.parquet")

    # Mid-write (just before the rename) no *.parquet is visible and the temporary name is hidden.
    seen = {}
    real_replace = os.replace

    def spying_replace(src, dst):
        seen["parquet"] = glob.glob(str(out / "*.parquet"))
        seen["tmp"] = os.path.basename(src)
        seen["listing"] = storage.list_files(str(out), None)
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spying_replace)
    storage.write_bytes_atomic(target, b"PAR1" * 1000)
    assert seen["parquet"] == [] and seen["listing"] == []
    assert seen["tmp"].startswith(".") and not seen["tmp"].endswith(".parquet")
    assert os.listdir(out) == ["part-0.parquet"]
    monkeypatch.setattr(os, "replace", real_replace)

    # A write that fails half way leaves the old file intact and no temporary file behind.
    def failing_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="disk full"):
        storage.write_bytes_atomic(target, b"garbage")
    monkeypatch.undo()
    assert os.listdir(out) == ["part-0.parquet"]
    assert storage.read_bytes(target) == b"PAR1" * 1000

    # A concurrent reader only ever sees one whole version.
    versions = [b"a" * 1_000_000, b"b" * 2_000_000]
    stop = threading.Event()
    bad = []

    def reader():
        while not stop.is_set():
            data = open(target, "rb").read()
            if data not in versions and data != b"PAR1" * 1000:
                bad.append(len(data))

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(20):
            storage.write_bytes_atomic(target, versions[i % 2])
    finally:
        stop.set()
        thread.join()
    assert bad == []
    assert os.listdir(out) == ["part-0.parquet"]


# --- Parquet readers on the S3 server ---------------------------------------------------------------------------


def _write_parts(base: str, opts: dict) -> None:
    for shard in range(2):
        buffer = io.BytesIO()
        pq.write_table(pa.table({"shard": [shard] * 3, "x": [1, 2, 3]}), buffer)
        storage.write_bytes_atomic(storage.join(base, f"part-{shard}.parquet"), buffer.getvalue(), opts)
    storage.write_bytes_atomic(storage.join(base, "_done/0.json"), b"{}", opts)


def test_duckdb_reads_parquet_from_s3_via_fsspec(s3_server, s3_root):
    duckdb = pytest.importorskip("duckdb")
    opts = s3_server.options()
    _write_parts(s3_root, opts)
    con = duckdb.connect()
    # DuckDB's httpfs extension is downloaded on first use (no network here); an fsspec filesystem works offline.
    con.register_filesystem(s3fs.S3FileSystem(**opts, skip_instance_cache=True))
    rows = con.sql(
        f"SELECT shard, count(*), sum(x) FROM read_parquet('{s3_root}/part-*.parquet') GROUP BY 1 ORDER BY 1"
    )
    assert rows.fetchall() == [(0, 3, 6), (1, 3, 6)]


def test_duckdb_httpfs_reads_parquet_from_s3(s3_server, s3_root):
    duckdb = pytest.importorskip("duckdb")
    con = duckdb.connect()
    try:
        con.sql("LOAD httpfs")  # never INSTALL here: that downloads from extensions.duckdb.org
    except duckdb.Error:
        pytest.skip("DuckDB httpfs extension not installed (INSTALL httpfs needs network)")
    _write_parts(s3_root, s3_server.options())
    host = s3_server.endpoint_url.removeprefix("http://")
    con.sql(
        f"CREATE SECRET s3test (TYPE s3, KEY_ID '{s3_server.key}', SECRET '{s3_server.secret}', "
        f"ENDPOINT '{host}', URL_STYLE 'path', USE_SSL false, REGION 'us-east-1')"
    )
    assert con.sql(f"SELECT count(*) FROM read_parquet('{s3_root}/part-*.parquet')").fetchone() == (6,)


def test_pyarrow_reads_parquet_from_s3(s3_server, s3_root):
    opts = s3_server.options()
    _write_parts(s3_root, opts)
    fs, path = storage.open_fs(s3_root, opts)
    parts = [u for u, _ in storage.list_files(s3_root, ["parquet"], opts)]
    assert [p.rsplit("/", 1)[-1] for p in parts] == ["part-0.parquet", "part-1.parquet"]
    table = pq.read_table([storage.open_fs(p, opts)[1] for p in parts], filesystem=fs)
    assert table.num_rows == 6 and sorted(table.column("shard").to_pylist()) == [0, 0, 0, 1, 1, 1]
