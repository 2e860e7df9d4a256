"""Sources: turn an input URI into the job's work rows, one per output row.

What an input is read as (:func:`input_kind`):

* A **directory or object-store prefix** is listed recursively for image and video files
  (``input.extensions``); ``item_id`` is the path relative to the prefix. ``input.kind`` may be
  ``auto`` or ``prefix``; ``manifest`` or ``annotations`` pinned on a directory is refused.
* A **single file** is read by what it is, whatever ``input.kind`` says (a config such as
  ``configs/demo.yaml`` pins ``prefix`` for its corpus; ``--input FILE`` replaces the input, so the
  file's own kind follows it):

  - ``.parquet .jsonl .ndjson``: a manifest;
  - ``.json``: VideoQA annotations;
  - ``.csv .tsv``: a manifest when its header has ``uri``, TGIF-QA annotations when it has
    ``gif_name``; with both or neither, ``input.kind`` (``manifest`` / ``annotations``) or
    ``input.layout=tgif_qa`` decides, else a ``tgif`` in the name, else manifest;
  - an image or video extension (or one listed in ``input.extensions``; any file when that is
    null): one media item, ``item_id`` = the file name;
  - anything else is refused.

  So on a file, ``input.kind`` only breaks the tie for a CSV/TSV that could be either.

Manifests: a Parquet, CSV/TSV or JSONL table with a ``uri`` column and optional ``id``,
``question``, ``answer``, ``question_type`` columns (header names match ignoring case and
surrounding spaces); relative URIs are relative to the manifest. With an ``id`` column, every row
needs a non-empty id and it is the row's ``item_id``, for captions as for QA: each row is one
item (for captions, rows repeating both id and uri count once); any other repeated id is
refused, naming it and where it occurs. Without one, QA rows are keyed by uri (plus a hash of the
question when a uri repeats) and captions by uri, one per distinct media file.

Annotations: VideoQA annotation files (MSVD-QA / MSRVTT-QA JSON, the Video-ChatGPT
``test_q.json``/``test_a.json`` pair, ActivityNet-QA, TGIF-QA CSV/TSV) joined with a media prefix;
for captions, one row per distinct media file, keyed by its uri.

Manifests and annotation files must be UTF-8 (a byte-order mark is fine). A work row is a dict
with ``item_id, uri, media_type`` (guessed from the extension, or None), ``question, answer,
question_type`` (None for captions). ``item_id`` must be unique: it is the key that makes output
exactly-once. A missing input, or one of no known kind, or content that cannot become work rows
raises :class:`SourceError` with a one-line message (object-store credentials and endpoints are
:func:`storage.check_access`'s). A missing relative path says where it was looked for, and under
``ray job submit`` why it may not be there (:func:`missing_input_message`).
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import os
import posixpath
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from pipeline import storage
from pipeline.config import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, Config, InputConfig

MANIFEST_SUFFIXES = (".parquet", ".csv", ".tsv", ".jsonl", ".ndjson")
ANNOTATION_SUFFIXES = (".json",)
# ActivityNet-QA's integer `type` (its dataset README): question types, then answer types of "free" questions.
ACTIVITYNET_TYPES = ("motion", "spatial", "temporal", "yes_no", "color", "object", "location", "number", "other")
# Extensions tried, in order, for an annotation's media name without one (as Video-LLaVA's eval scripts do).
MEDIA_EXTENSIONS_TRIED = ("mp4", "avi", "mov", "mkv", "webm", "gif", "png", "jpg", "jpeg")
MANIFEST_COLUMNS = ("uri", "id", "question", "answer", "question_type")
# Ray's job supervisor sets this for the entrypoint only (ray/dashboard/modules/job/job_supervisor.py,
# Ray 2.60); RAY_JOB_ID is stripped from the entrypoint's environment, so it cannot tell.
RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
SHOWN_LOCATIONS = 5  # rows named in a message before "..."


class SourceError(ValueError):
    """The input cannot be turned into work rows; the message says why and where."""


def media_type_of(uri: str) -> str | None:
    """'image' / 'video' from the extension, None when unknown (decode sniffs the bytes anyway)."""
    ext = posixpath.splitext(uri.lower())[1].lstrip(".")
    if ext in IMAGE_EXTENSIONS and ext != "gif":  # a GIF may be animated: decide after decoding
        return "image"
    if ext in VIDEO_EXTENSIONS:
        return "video"
    return None


def work_row(item_id, uri, question=None, answer=None, question_type=None) -> dict:
    return {
        "item_id": str(item_id),
        "uri": uri,
        "media_type": media_type_of(uri),
        "question": None if question is None else str(question),
        "answer": None if answer is None else str(answer),
        "question_type": None if question_type is None else str(question_type),
    }


def load_work_rows(config: Config, options: dict | None = None) -> list[dict]:
    """Work rows for ``config.input`` and ``config.task``, sorted by item_id, duplicates refused."""
    cfg = config.input
    kind = input_kind(cfg, options)
    if kind == "prefix":
        rows = prefix_rows(cfg.uri, cfg.extensions, options)
    elif kind == "media":
        rows = media_file_rows(cfg.uri, options)
    elif kind == "manifest":
        rows = manifest_rows(cfg.uri, options, config.task)
    else:
        rows = annotation_rows(cfg.uri, cfg.layout, cfg.media_prefix, cfg.answers_uri, options)
    if not rows:
        extensions = ", ".join(cfg.extensions) if cfg.extensions is not None else "any"
        raise SourceError(f"input {cfg.uri}: no items found (kind {kind}; extensions {extensions})")
    if config.task == "qa":
        missing = sum(not r["question"] for r in rows)
        if missing:
            raise SourceError(
                f"task=qa needs a question per row, but {missing} of {len(rows)} rows from {cfg.uri} have none: "
                "use a manifest with a `question` column or a VideoQA annotation file"
            )
    elif kind == "annotations":  # captions: one row per media file, whatever questions the file carries
        rows = caption_rows(rows)
    check_unique(rows, cfg.uri)
    rows.sort(key=lambda r: r["item_id"])
    return rows[: cfg.limit] if cfg.limit else rows


# --- what the input is


def check_input(config: Config, options: dict | None = None) -> None:
    """Fail fast, before any cluster work, when the input is missing, unreadable or of no known kind.

    A missing local path names the absolute path it was looked for at; under ``ray job submit`` a
    relative one also says why it may be missing there (see :func:`missing_input_message`).
    Object-store URIs get :func:`storage.check_access` (credentials, bucket, endpoint).
    """
    uri = config.input.uri
    if not _is_local(uri):
        storage.check_access(uri, options)
    input_kind(config.input, options)


def input_kind(cfg: InputConfig, options: dict | None = None) -> str:
    """``prefix``, ``media`` (one file), ``manifest`` or ``annotations``: the rule in the module docstring."""
    uri = cfg.uri
    what = _file_or_directory(uri, options)
    if what is None:
        raise SourceError(missing_input_message(uri))
    if what == "directory":
        if cfg.kind in ("manifest", "annotations"):
            raise SourceError(
                f"input.kind is {cfg.kind}, but input {uri} is a directory or prefix: give the {cfg.kind} "
                "file itself, or set input.kind=auto to list the media under it"
            )
        return "prefix"
    lower = uri.lower().rstrip("/")
    if lower.endswith(ANNOTATION_SUFFIXES):
        return "annotations"
    if lower.endswith((".csv", ".tsv")):
        return _table_kind(uri, cfg, options)
    if lower.endswith(MANIFEST_SUFFIXES):
        return "manifest"
    ext = posixpath.splitext(lower)[1].lstrip(".")
    listed = cfg.extensions is None or ext in {e.lower().lstrip(".") for e in cfg.extensions}
    if ext in IMAGE_EXTENSIONS or ext in VIDEO_EXTENSIONS or listed:
        return "media"
    raise SourceError(
        f"input {uri}: not a kind of file this job reads; the input can be a directory or prefix of media, "
        f"a manifest ({' '.join(MANIFEST_SUFFIXES)}), an annotation file (.json, or TGIF-QA .csv/.tsv), "
        "or one image or video file"
    )


def _table_kind(uri: str, cfg: InputConfig, options: dict | None) -> str:
    """A CSV/TSV is a manifest (``uri`` column) or TGIF-QA annotations (``gif_name``): its header says."""
    header = {h.strip().lower() for h in _header(uri, options)}
    if "uri" in header and "gif_name" not in header:
        return "manifest"
    if "gif_name" in header and "uri" not in header:
        return "annotations"
    # Both or neither: the config decides, then TGIF-QA's usual file names.
    if cfg.kind in ("manifest", "annotations"):
        return cfg.kind
    if cfg.layout == "tgif_qa" or "tgif" in uri.lower():
        return "annotations"
    return "manifest"


def _header(uri: str, options: dict | None) -> list[str]:
    """The column names of a CSV/TSV, from its first line only (a manifest may be large)."""
    fs, path = storage.open_fs(uri, options)
    with fs.open(path, "rb") as f:
        head = f.read(1 << 16)
    line = decode_text(uri, head.split(b"\n", 1)[0].rstrip(b"\r"))
    return next(csv.reader([line], dialect=_dialect(uri, line)), [])


def _file_or_directory(uri: str, options: dict | None) -> str | None:
    fs, path = storage.open_fs(uri, options)
    fs.invalidate_cache(path)  # a listing cached before the file appeared would say it is missing
    if fs.isfile(path):
        return "file"
    if fs.isdir(path):
        return "directory"
    return None


def _is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def running_as_ray_job() -> bool:
    """Whether this process is the entrypoint of a ``ray job submit`` job."""
    return RAY_JOB_ENV in os.environ


def missing_input_message(uri: str) -> str:
    """Why ``uri`` is not there, as far as this process can tell."""
    if not _is_local(uri):
        return f"input {uri} does not exist"
    path = uri.removeprefix("file://")
    where = os.path.abspath(path)
    if not running_as_ray_job():
        return f"input {uri} does not exist" + ("" if os.path.isabs(path) else f" (looked for {where})")
    if os.path.isabs(path):
        return f"input {uri} does not exist on the node running this Ray job's driver"
    # The classic: demo_out/ exists beside the repository, but the job runs in an uploaded copy of it.
    return (
        f"input {uri} does not exist in this Ray job's working directory ({where}): a relative path is "
        "resolved there, and `ray job submit --working-dir` uploads that directory without its git-ignored "
        "files (like demo_out/); pass an absolute path on a filesystem the cluster's nodes see, or an "
        "object-store URI (s3://...)"
    )


# --- prefixes and single files


def prefix_rows(uri: str, extensions: Iterable[str], options: dict | None) -> list[dict]:
    files = storage.list_files(uri, extensions, options)
    root = uri.rstrip("/")
    rows = []
    for path, _size in files:
        rel = posixpath.relpath(_strip_scheme(path), _strip_scheme(root)) if path != root else posixpath.basename(path)
        rows.append(work_row(rel, path))
    return rows


def media_file_rows(uri: str, options: dict | None) -> list[dict]:
    """One media file named as the input: one item, keyed by its file name."""
    # list_files gives the file's full URI (an absolute path locally), as a listing would.
    return [work_row(posixpath.basename(path), path) for path, _size in storage.list_files(uri, None, options)]


# --- manifests


@dataclass
class Table:
    """The records of a table file, where each one is in the file, and its column names."""

    uri: str
    records: list[dict]
    columns: list[str]
    unit: str = "row"  # what `places` count: "line" (text files) or "row" (Parquet, from 1)
    places: list[int] = field(default_factory=list)
    non_string: dict[str, str] = field(default_factory=dict)  # Parquet: column -> its Arrow type, if not text

    def where(self, indexes: list[int]) -> str:
        """``lines 3, 8, 12`` for records at these indexes (the first few)."""
        shown = ", ".join(str(self.places[i]) for i in indexes[:SHOWN_LOCATIONS])
        more = ", ..." if len(indexes) > SHOWN_LOCATIONS else ""
        return f"{self.unit}{'s' if len(indexes) > 1 else ''} {shown}{more}"


def manifest_rows(uri: str, options: dict | None, task: str) -> list[dict]:
    """Work rows of a manifest; for ``task=caption``, one row per item (see the module docstring)."""
    table = read_manifest(uri, options)
    names = manifest_columns(table)
    if table.columns and "uri" not in names:
        raise SourceError(f"manifest {uri} has no `uri` column (columns: {_listed(table.columns)})")
    if task == "qa" and table.records and "question" not in names:
        raise SourceError(
            f"task=qa needs a `question` column, but manifest {uri} has none (columns: {_listed(table.columns)})"
        )
    if names.get("uri") in table.non_string:
        raise SourceError(
            f"manifest {uri}: the `uri` column holds {table.non_string[names['uri']]} values; "
            "it must hold strings (paths or URIs)"
        )
    base = posixpath.dirname(uri.rstrip("/"))

    def value(rec: dict, key: str):
        return rec.get(names[key]) if key in names else None

    rows: list[dict] = []
    empty: dict[str, list[int]] = {"uri": [], "id": [], "question": []}
    for i, rec in enumerate(table.records):
        media, item_id, question = value(rec, "uri"), value(rec, "id"), value(rec, "question")
        if media is not None and not isinstance(media, str):
            raise SourceError(
                f"manifest {uri} {table.where([i])}: `uri` is {media!r} ({type(media).__name__}), not a path or URI"
            )
        for key, got in (("uri", media), ("id", item_id), ("question", question)):
            if got is None or got == "":
                empty[key].append(i)
        if not media:
            continue
        media = resolve(base, media)
        if "id" not in names:
            # Stable without an id column: the URI, plus the question when several rows share a URI.
            item_id = media if question is None else f"{media}#{_short_hash(str(question))}"
        rows.append(work_row(item_id, media, question, value(rec, "answer"), value(rec, "question_type")))
    _refuse_empty(table, empty, names, task)
    if "id" not in names:
        return rows if task == "qa" else caption_rows(rows)
    _refuse_repeated_ids(table, rows, task)
    return _distinct(rows) if task != "qa" else rows


def _refuse_empty(table: Table, empty: dict[str, list[int]], names: dict[str, str], task: str) -> None:
    needed = [("uri", "every row needs a media path or URI")]
    if "id" in names:
        needed.append(("id", "with an `id` column every row needs its own id"))
    if task == "qa" and "question" in names:
        needed.append(("question", "task=qa needs a question on every row"))
    for key, why in needed:
        if empty[key]:
            raise SourceError(
                f"manifest {table.uri}: empty `{names.get(key, key)}` at {table.where(empty[key])} "
                f"({len(empty[key])} of {len(table.records)} rows); {why}"
            )


def _refuse_repeated_ids(table: Table, rows: list[dict], task: str) -> None:
    """Ids key the output: one per item. For captions a row repeating both id and uri is the same item."""
    at: dict[str, list[int]] = {}
    uris: dict[str, set[str]] = {}
    for i, row in enumerate(rows):  # every record gave a row here: empty uris were refused
        at.setdefault(row["item_id"], []).append(i)
        uris.setdefault(row["item_id"], set()).add(row["uri"])
    repeated = [k for k, idx in at.items() if len(idx) > 1 and (task == "qa" or len(uris[k]) > 1)]
    if repeated:
        first = repeated[0]
        others = f" (and {len(repeated) - 1} more repeated ids)" if len(repeated) > 1 else ""
        raise SourceError(
            f"manifest {table.uri}: id {first!r} occurs at {table.where(at[first])}{others}; "
            "ids must be unique, one per item: they key exactly-once output"
        )


def _distinct(rows: list[dict]) -> list[dict]:
    seen: dict[str, dict] = {}
    for row in rows:
        seen.setdefault(row["item_id"], work_row(row["item_id"], row["uri"]))
    return list(seen.values())


def manifest_columns(table: Table) -> dict[str, str]:
    """Known column -> the manifest's own name for it: an exact match, else the one that matches
    ignoring case and surrounding spaces (``URI``, `` question`` after a CSV comma)."""
    names: dict[str, str] = {}
    for key in MANIFEST_COLUMNS:
        if key in table.columns:
            names[key] = key
            continue
        matches = [c for c in table.columns if isinstance(c, str) and c.strip().lower() == key]
        if len(matches) > 1:
            raise SourceError(f"manifest {table.uri}: columns {_listed(matches)} all read as `{key}`; keep one")
        if matches:
            names[key] = matches[0]
    return names


def read_manifest(uri: str, options: dict | None) -> Table:
    """A Parquet, CSV/TSV or JSON-lines file as a :class:`Table`."""
    data = storage.read_bytes(uri, options)
    lower = uri.lower()
    if lower.endswith(".parquet"):
        return _read_parquet(uri, data)
    text = decode_text(uri, data)
    if lower.endswith((".csv", ".tsv")):
        reader = csv.DictReader(io.StringIO(text), dialect=_dialect(uri, text.split("\n", 1)[0]))
        records, places = [], []
        try:
            for rec in reader:
                records.append(rec)
                places.append(reader.line_num)
        except csv.Error as e:
            raise SourceError(f"{uri} line {reader.line_num} is not valid CSV: {e}") from None
        return Table(uri, records, list(reader.fieldnames or []), "line", places)
    records, places, columns = [], [], {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise SourceError(f"{uri} line {n} is not JSON: {e}") from None
        if not isinstance(rec, dict):
            raise SourceError(f'{uri} line {n} is not a JSON object (one record per line, e.g. {{"uri": ...}})')
        records.append(rec)
        places.append(n)
        columns.update(dict.fromkeys(rec))
    return Table(uri, records, list(columns), "line", places)


def _read_parquet(uri: str, data: bytes) -> Table:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(io.BytesIO(data))
    except (pa.ArrowException, OSError) as e:
        raise SourceError(f"{uri} is not a readable Parquet file: {_one_line(e)}") from None
    non_string = {f.name: str(f.type) for f in table.schema if not _is_text(f.type)}
    return Table(uri, table.to_pylist(), table.column_names, "row", list(range(1, table.num_rows + 1)), non_string)


def _is_text(arrow_type) -> bool:
    import pyarrow as pa

    if pa.types.is_dictionary(arrow_type):
        arrow_type = arrow_type.value_type
    return pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type) or pa.types.is_null(arrow_type)


def read_table(uri: str, options: dict | None) -> list[dict]:
    """Records of a Parquet, CSV/TSV or JSON-lines file."""
    return read_manifest(uri, options).records


def _dialect(uri: str, first_line: str) -> str:
    return "excel-tab" if uri.lower().endswith(".tsv") or "\t" in first_line else "excel"


def decode_text(uri: str, data: bytes) -> str:
    """UTF-8 text (a leading byte-order mark dropped), or one line saying where it is not."""
    start = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[start:].decode("utf-8")
    except UnicodeDecodeError as e:
        offset = start + e.start
        raise SourceError(
            f"input {uri} is not UTF-8 text (byte 0x{data[offset]:02x} at offset {offset}); re-save it as UTF-8"
        ) from None


def _read_json(uri: str, options: dict | None, what: str = "annotation file"):
    try:
        return json.loads(decode_text(uri, storage.read_bytes(uri, options)))
    except json.JSONDecodeError as e:
        raise SourceError(f"{what} {uri} is not JSON: {e}") from None


# --- VideoQA annotations


def annotation_rows(
    uri: str, layout: str, media_prefix: str | None, answers_uri: str | None, options: dict | None
) -> list[dict]:
    base = posixpath.dirname(uri.rstrip("/"))
    prefix = (media_prefix or base).rstrip("/")
    if layout == "auto":
        layout = guess_layout(uri)
    if layout == "tgif_qa":
        records = read_table(uri, options)
    else:
        records = _read_json(uri, options)
        if not isinstance(records, list):
            raise SourceError(f"annotation file {uri} must hold a JSON list of records")
    if layout in ("videochatgpt", "activitynet_qa"):
        answers_uri = answers_uri or storage.join(base, "test_a.json")
        records = join_answers(uri, records, answers_uri, options)
    names = media_index(prefix, options)
    types = question_type_names(base, options)
    rows = []
    for i, rec in enumerate(records):
        name = media_name(rec, layout, i, uri)
        media = names.resolve(name)
        item_id = rec.get("question_id", rec.get("key", rec.get("id", i)))
        qtype = rec.get("type", rec.get("question_type"))
        if isinstance(qtype, int) or (isinstance(qtype, str) and qtype.isdigit()):
            qtype = (types or ACTIVITYNET_TYPES)[int(qtype)] if int(qtype) < len(types or ACTIVITYNET_TYPES) else qtype
        rows.append(work_row(item_id, media, rec.get("question"), rec.get("answer"), qtype))
    return rows


def guess_layout(uri: str) -> str:
    name = posixpath.basename(uri).lower()
    if name.endswith((".csv", ".tsv")):
        return "tgif_qa"
    if name.startswith("test_q"):
        return "activitynet_qa" if "activitynet" in uri.lower() else "videochatgpt"
    return "msrvtt_qa" if "msrvtt" in uri.lower() else "msvd_qa"


def join_answers(uri: str, questions: list[dict], answers_uri: str, options: dict | None) -> list[dict]:
    """Video-ChatGPT's pair: test_q.json and test_a.json match by position; question ids must agree."""
    try:
        answers = _read_json(answers_uri, options, "answers file")
    except FileNotFoundError:
        raise SourceError(f"{uri} needs its answers file {answers_uri} (set input.answers_uri)") from None
    if len(answers) != len(questions):
        raise SourceError(f"{uri} has {len(questions)} questions but {answers_uri} has {len(answers)} answers")
    joined = []
    for i, (q, a) in enumerate(zip(questions, answers, strict=True)):
        if str(q.get("question_id")) != str(a.get("question_id")):
            raise SourceError(f"{uri} and {answers_uri} disagree at position {i}: question_id {q.get('question_id')}")
        joined.append({**q, "answer": a.get("answer"), "type": a.get("type")})
    return joined


def media_name(rec: dict, layout: str, index: int, uri: str) -> str:
    if layout == "activitynet_qa":
        name = str(rec.get("video_name", ""))
        return name if name.startswith("v_") else f"v_{name}"
    if layout == "tgif_qa":
        name = rec.get("gif_name")
    else:
        name = rec.get("video_name", rec.get("video", rec.get("image")))
        if name is None and rec.get("video_id") is not None:
            vid = rec["video_id"]  # MSVD-QA / MSRVTT-QA number their clips
            name = f"video{vid}" if layout == "msrvtt_qa" else f"vid{vid}"
    if not name:
        raise SourceError(f"{uri} record {index} names no media (expected video/video_name/image/video_id/gif_name)")
    return str(name)


class MediaIndex:
    """The media prefix listed once: resolves annotation names with or without an extension, and
    by base name when the files sit in sub-folders (``videos/``, ``all/``) and the name is unique."""

    def __init__(self, prefix: str, files: list[str]):
        self.prefix = prefix
        self.lookup: dict[str, str] = {}
        ambiguous: set[str] = set()
        # Most specific first: relative path, relative stem, base name, base stem.
        for rank_key in (_rel, _rel_stem, _base, _base_stem):
            level: dict[str, str] = {}
            for full in sorted(files, key=_extension_rank):
                key = rank_key(full, prefix)
                if key in level and level[key] != full and _extension_rank(level[key]) == _extension_rank(full):
                    ambiguous.add(key)
                level.setdefault(key, full)
            for key, full in level.items():
                if key not in self.lookup and key not in ambiguous:
                    self.lookup[key] = full

    def resolve(self, name: str) -> str:
        name = name.lstrip("/")
        # Not listed: keep a URI anyway; decoding records "not found" on that row.
        return self.lookup.get(name) or storage.join(self.prefix, name)


def _rel(full: str, prefix: str) -> str:
    return posixpath.relpath(_strip_scheme(full), _strip_scheme(prefix))


def _rel_stem(full: str, prefix: str) -> str:
    return posixpath.splitext(_rel(full, prefix))[0]


def _base(full: str, prefix: str) -> str:
    return posixpath.basename(full)


def _base_stem(full: str, prefix: str) -> str:
    return posixpath.splitext(posixpath.basename(full))[0]


def _extension_rank(path: str) -> int:
    ext = posixpath.splitext(path)[1][1:].lower()
    return MEDIA_EXTENSIONS_TRIED.index(ext) if ext in MEDIA_EXTENSIONS_TRIED else len(MEDIA_EXTENSIONS_TRIED)


def media_index(prefix: str, options: dict | None) -> MediaIndex:
    try:
        files = [path for path, _ in storage.list_files(prefix, None, options)]
    except FileNotFoundError:
        raise SourceError(f"media prefix {prefix} does not exist (set input.media_prefix)") from None
    return MediaIndex(prefix, files)


def question_type_names(base: str, options: dict | None) -> tuple[str, ...] | None:
    """Our corpus writes int types into test_a.json and their names into manifest.json."""
    try:
        manifest = json.loads(storage.read_bytes(storage.join(base, "manifest.json"), options))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    names = manifest.get("question_types") if isinstance(manifest, dict) else None
    return tuple(names) if names else None


# --- all kinds


def caption_rows(rows: list[dict]) -> list[dict]:
    """One caption row per distinct media URI, keyed by the URI (annotations, manifests without ids)."""
    seen: dict[str, dict] = {}
    for row in rows:
        seen.setdefault(row["uri"], work_row(row["uri"], row["uri"]))
    return list(seen.values())


def check_unique(rows: list[dict], uri: str) -> None:
    counts = Counter(r["item_id"] for r in rows)
    repeated = [k for k, n in counts.items() if n > 1]
    if repeated:
        raise SourceError(
            f"input {uri}: {len(repeated)} item ids occur more than once (e.g. {', '.join(repeated[:3])}); "
            "ids must be unique for exactly-once output: give each row a distinct `id`"
        )


def resolve(base: str, uri: str) -> str:
    if "://" in uri or uri.startswith("/"):
        return uri
    return storage.join(base, uri)


def _strip_scheme(uri: str) -> str:
    """A comparable path: object-store URIs without their scheme, local paths made absolute
    (storage.list_files returns absolute local paths, whatever root it was given)."""
    if "://" in uri and not uri.startswith("file://"):
        return uri.split("://", 1)[1]
    return os.path.abspath(uri.removeprefix("file://"))


def _listed(columns: Iterable) -> str:
    return ", ".join(str(c) for c in columns) or "none"


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _short_hash(text: str) -> str:
    import hashlib

    return hashlib.sha1(text.encode()).hexdigest()[:12]
