"""Sources: turn an input URI into the job's work rows, one per output row.

Three kinds of input (``input.kind``, guessed by ``auto``):

* ``prefix``: a directory or object-store prefix listed recursively for image and video files;
  ``item_id`` is the path relative to the prefix.
* ``manifest``: a Parquet, CSV or JSONL table with a ``uri`` column and optional ``id``,
  ``question``, ``answer``, ``question_type`` columns; relative URIs are relative to the manifest.
* ``annotations``: VideoQA annotation files (MSVD-QA / MSRVTT-QA JSON, the Video-ChatGPT
  ``test_q.json``/``test_a.json`` pair, ActivityNet-QA, TGIF-QA CSV/TSV) joined with a media prefix.

A work row is a dict with ``item_id, uri, media_type`` (guessed from the extension, or None),
``question, answer, question_type`` (None for captions). ``item_id`` must be unique: it is the
key that makes output exactly-once.
"""

from __future__ import annotations

import csv
import io
import json
import os
import posixpath
from collections import Counter
from collections.abc import Iterable

from pipeline import storage
from pipeline.config import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, Config

MANIFEST_SUFFIXES = (".parquet", ".csv", ".tsv", ".jsonl", ".ndjson")
# ActivityNet-QA's integer `type` (its dataset README): question types, then answer types of "free" questions.
ACTIVITYNET_TYPES = ("motion", "spatial", "temporal", "yes_no", "color", "object", "location", "number", "other")
# Extensions tried, in order, for an annotation's media name without one (as Video-LLaVA's eval scripts do).
MEDIA_EXTENSIONS_TRIED = ("mp4", "avi", "mov", "mkv", "webm", "gif", "png", "jpg", "jpeg")


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
    kind = cfg.kind if cfg.kind != "auto" else guess_kind(cfg.uri)
    if kind == "prefix":
        rows = prefix_rows(cfg.uri, cfg.extensions, options)
    elif kind == "manifest":
        rows = manifest_rows(cfg.uri, options)
    else:
        rows = annotation_rows(cfg.uri, cfg.layout, cfg.media_prefix, cfg.answers_uri, options)
    if not rows:
        extensions = ", ".join(cfg.extensions) if cfg.extensions is not None else "any"
        raise SourceError(f"input {cfg.uri}: no items found (kind {kind}; extensions {extensions})")
    if config.task == "qa":
        missing = sum(r["question"] is None for r in rows)
        if missing:
            raise SourceError(
                f"task=qa needs a question per row, but {missing} of {len(rows)} rows from {cfg.uri} have none: "
                "use a manifest with a `question` column or a VideoQA annotation file"
            )
    else:  # captions: one row per media file, whatever questions the input carries
        rows = caption_rows(rows) if kind != "prefix" else rows
    check_unique(rows, cfg.uri)
    rows.sort(key=lambda r: r["item_id"])
    return rows[: cfg.limit] if cfg.limit else rows


def guess_kind(uri: str) -> str:
    lower = uri.lower().rstrip("/")
    if lower.endswith(MANIFEST_SUFFIXES):
        return "annotations" if lower.endswith((".csv", ".tsv")) and "tgif" in lower else "manifest"
    if lower.endswith(".json"):
        return "annotations"
    return "prefix"


def prefix_rows(uri: str, extensions: Iterable[str], options: dict | None) -> list[dict]:
    files = storage.list_files(uri, extensions, options)
    root = uri.rstrip("/")
    rows = []
    for path, _size in files:
        rel = posixpath.relpath(_strip_scheme(path), _strip_scheme(root)) if path != root else posixpath.basename(path)
        rows.append(work_row(rel, path))
    return rows


def manifest_rows(uri: str, options: dict | None) -> list[dict]:
    records = read_table(uri, options)
    if records and "uri" not in records[0]:
        raise SourceError(f"manifest {uri} has no `uri` column (columns: {', '.join(records[0])})")
    base = posixpath.dirname(uri.rstrip("/"))
    rows = []
    for i, rec in enumerate(records):
        media = rec.get("uri")
        if not media:
            raise SourceError(f"manifest {uri} row {i}: empty `uri`")
        media = resolve(base, str(media))
        question = rec.get("question")
        item_id = rec.get("id")
        if item_id is None or item_id == "":
            # Stable without an id column: the URI, plus the question when several rows share a URI.
            item_id = media if question is None else f"{media}#{_short_hash(str(question))}"
        rows.append(work_row(item_id, media, question, rec.get("answer"), rec.get("question_type")))
    return rows


def read_table(uri: str, options: dict | None) -> list[dict]:
    """Records of a Parquet, CSV/TSV or JSON-lines file."""
    data = storage.read_bytes(uri, options)
    lower = uri.lower()
    if lower.endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.read_table(io.BytesIO(data)).to_pylist()
    text = data.decode("utf-8-sig")
    if lower.endswith((".csv", ".tsv")):
        dialect = "excel-tab" if lower.endswith(".tsv") or ("\t" in text.split("\n", 1)[0]) else "excel"
        return list(csv.DictReader(io.StringIO(text), dialect=dialect))
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise SourceError(f"{uri} line {n} is not JSON: {e}") from None
    return records


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
        try:
            records = json.loads(storage.read_bytes(uri, options))
        except json.JSONDecodeError as e:
            raise SourceError(f"annotation file {uri} is not JSON: {e}") from None
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
        answers = json.loads(storage.read_bytes(answers_uri, options))
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


def caption_rows(rows: list[dict]) -> list[dict]:
    """One caption row per distinct media URI, keyed by the URI."""
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


def _short_hash(text: str) -> str:
    import hashlib

    return hashlib.sha1(text.encode()).hexdigest()[:12]
