"""Inputs mean what they say (issue 17): a file is read by what it is, manifest ids are item ids,
text must be UTF-8, and a missing input says where it was looked for. No Ray: every CLI run here
fails (exit 2) before any cluster work, or the rows come from ``load_work_rows`` directly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import storage
from pipeline.config import load_config
from pipeline.sources import RAY_JOB_ENV, SourceError, check_input, load_work_rows

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"  # pins input.kind: prefix
SHAPES_QA = ROOT / "configs" / "shapes-qa.yaml"  # pins input.kind: annotations, layout msvd_qa


def demo(uri, *overrides, path=DEMO):
    return load_config(path, [f"input.uri='{uri}'", *overrides])


def write_csv(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def caption_cli(*args: str, cwd: Path = ROOT, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, str(ROOT / "jobs" / "caption.py"), "--config", str(DEMO), *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=60)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


# --- 1. a file is read by what it is


def test_manifest_under_a_prefix_pin_is_a_manifest(tmp_path):
    manifest = write_csv(tmp_path / "m.csv", "uri,id,question\na.jpg,one,what colour?\nb.mp4,two,how many?\n")
    rows = load_work_rows(demo(manifest))
    assert [(r["item_id"], r["uri"], r["media_type"]) for r in rows] == [
        ("one", str(tmp_path / "a.jpg"), "image"),
        ("two", str(tmp_path / "b.mp4"), "video"),
    ]
    qa = load_work_rows(demo(manifest, "task=qa"))
    assert [(r["item_id"], r["question"]) for r in qa] == [("one", "what colour?"), ("two", "how many?")]


def test_annotations_and_manifests_follow_the_file_not_the_pin(tmp_path):
    (tmp_path / "v1.mp4").write_bytes(b"x")
    ann = tmp_path / "qa.json"
    ann.write_text(json.dumps([{"video": "v1", "question": "q?", "answer": "a", "question_id": 5}]))
    assert [r["item_id"] for r in load_work_rows(demo(ann, "task=qa"))] == ["5"]  # prefix pinned
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"uri": "v1.mp4", "id": "k", "question": "q?"}) + "\n")
    rows = load_work_rows(demo(manifest, path=SHAPES_QA))  # annotations + msvd_qa pinned
    assert [(r["item_id"], r["question"]) for r in rows] == [("k", "q?")]


def test_tgif_table_is_told_by_its_header(tmp_path):
    (tmp_path / "tumblr_x.gif").write_bytes(b"x")
    ann = write_csv(tmp_path / "Test_frameqa_question.tsv", "gif_name\tquestion\tanswer\tkey\ntumblr_x\tq\ta\t7\n")
    rows = load_work_rows(demo(ann, "task=qa"))
    assert [(r["item_id"], r["uri"]) for r in rows] == [("7", str(tmp_path / "tumblr_x.gif"))]


def test_a_media_file_is_one_item_keyed_by_its_name(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "clip.mp4").write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    for uri in ("sub/clip.mp4", str(tmp_path / "sub" / "clip.mp4")):  # a relative path was keyed "."
        rows = load_work_rows(demo(uri))
        assert [(r["item_id"], r["uri"], r["media_type"]) for r in rows] == [
            ("clip.mp4", str(tmp_path / "sub" / "clip.mp4"), "video")
        ]


def test_a_file_of_unknown_kind_is_refused(tmp_path):
    notes = write_csv(tmp_path / "notes.txt", "hello\n")
    with pytest.raises(SourceError) as info:
        load_work_rows(demo(notes))
    message = str(info.value)
    assert str(notes) in message and "\n" not in message
    assert ".parquet .csv .tsv .jsonl .ndjson" in message and ".json" in message and "image or video" in message
    # input.extensions=null takes every file as media, as it does when listing a directory
    assert [r["item_id"] for r in load_work_rows(demo(notes, "input.extensions=null"))] == ["notes.txt"]


@pytest.mark.parametrize("kind", ["manifest", "annotations"])
def test_manifest_or_annotations_pinned_on_a_directory_is_refused(tmp_path, kind):
    (tmp_path / "a.jpg").write_bytes(b"x")
    with pytest.raises(SourceError, match=f"input.kind is {kind}, but input .* is a directory"):
        load_work_rows(demo(tmp_path, f"input.kind={kind}"))


def test_cli_reads_a_manifest_given_with_the_demo_config(tmp_path):
    """Before: the manifest became one 'image' row (unsupported_format, exit 0, done forever)."""
    manifest = write_csv(tmp_path / "m.csv", "uri,id\na.jpg,x1\nb.jpg,x1\n")
    line = one_error_line(caption_cli("--input", str(manifest), "--output", str(tmp_path / "out")))
    assert f"manifest {manifest}: id 'x1' occurs at lines 2, 3" in line
    notes = write_csv(tmp_path / "notes.pdf", "%PDF")
    line = one_error_line(caption_cli("--input", str(notes), "--output", str(tmp_path / "out2")))
    assert f"input {notes}: not a kind of file this job reads" in line
    assert not (tmp_path / "out2").exists()  # refused in preflight, before the output is touched


def test_object_store_inputs_follow_the_same_rule(s3_server):
    options = s3_server.options()
    for name in ("kinds/imgs/a.jpg", "kinds/imgs/b.mp4"):
        storage.write_bytes_atomic(s3_server.uri(name), b"x", options)
    storage.write_bytes_atomic(s3_server.uri("kinds/m.csv"), b"uri,id\nimgs/a.jpg,k1\n", options)
    expected = {
        "kinds": ["imgs/a.jpg", "imgs/b.mp4"],  # a prefix, listed
        "kinds/m.csv": ["k1"],  # a manifest, whatever demo.yaml pins
        "kinds/imgs/b.mp4": ["b.mp4"],  # one media file
    }
    for name, ids in expected.items():
        config = demo(s3_server.uri(name))
        check_input(config, options)
        assert [r["item_id"] for r in load_work_rows(config, options)] == ids, name
    with pytest.raises(SourceError, match=f"^input {s3_server.uri('kinds/gone')} does not exist$"):
        check_input(demo(s3_server.uri("kinds/gone")), options)


# --- 2. manifest ids


def test_manifest_ids_key_captions_even_on_one_uri(tmp_path):
    """The drill: 100,000 ids on one file collapsed to one row; each id is one item now."""
    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.table({"uri": ["same.jpg"] * 5, "id": [f"r{i}" for i in range(5)]}), manifest)
    rows = load_work_rows(demo(manifest))
    assert [r["item_id"] for r in rows] == ["r0", "r1", "r2", "r3", "r4"]
    assert {r["uri"] for r in rows} == {str(tmp_path / "same.jpg")}


def test_manifest_without_ids_keeps_uri_ids(tmp_path):
    """Unchanged, so earlier outputs keep resuming: one caption per distinct uri, keyed by it."""
    manifest = write_csv(tmp_path / "m.csv", "uri,question\na.jpg,q1\na.jpg,q2\nb.jpg,q3\n")
    rows = load_work_rows(demo(manifest))
    assert [r["item_id"] for r in rows] == [str(tmp_path / "a.jpg"), str(tmp_path / "b.jpg")]


def test_caption_rows_repeating_id_and_uri_are_one_item(tmp_path):
    manifest = write_csv(tmp_path / "m.csv", "uri,id,question\nv.mp4,v,q1\nv.mp4,v,q2\n")
    assert [r["item_id"] for r in load_work_rows(demo(manifest))] == ["v"]
    with pytest.raises(SourceError, match=r"id 'v' occurs at lines 2, 3;"):  # two questions, one id
        load_work_rows(demo(manifest, "task=qa"))


def test_duplicate_ids_name_the_id_and_rows(tmp_path):
    lines = "".join(f"{i}.jpg,dup\n" for i in range(7)) + "x.jpg,other\ny.jpg,other\n"
    manifest = write_csv(tmp_path / "m.csv", "uri,id\n" + lines)
    with pytest.raises(SourceError) as info:
        load_work_rows(demo(manifest))
    assert str(info.value) == (
        f"manifest {manifest}: id 'dup' occurs at lines 2, 3, 4, 5, 6, ... (and 1 more repeated ids); "
        "ids must be unique, one per item: they key exactly-once output"
    )


def test_empty_ids_are_refused(tmp_path):
    manifest = tmp_path / "m.jsonl"
    records = [{"uri": "a.jpg", "id": "a"}, {"uri": "b.jpg", "id": ""}, {"uri": "c.jpg"}]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(SourceError, match=r"empty `id` at lines 2, 3 \(2 of 3 rows\)"):
        load_work_rows(demo(manifest))


# --- 3. columns


def test_qa_without_a_question_column_names_the_columns(tmp_path):
    manifest = write_csv(tmp_path / "m.csv", "uri,id,prompt\na.jpg,1,what?\n")
    with pytest.raises(SourceError, match=r"needs a `question` column, but manifest .* \(columns: uri, id, prompt\)"):
        load_work_rows(demo(manifest, "task=qa"))
    line = one_error_line(caption_cli("--input", str(manifest), "--output", str(tmp_path / "out"), "task=qa"))
    assert "columns: uri, id, prompt" in line


def test_header_names_ignore_case_and_spaces(tmp_path):
    manifest = write_csv(tmp_path / "m.csv", "URI, Id, Question\na.jpg,k,what?\n")
    rows = load_work_rows(demo(manifest, "task=qa"))
    assert [(r["item_id"], r["uri"], r["question"]) for r in rows] == [("k", str(tmp_path / "a.jpg"), "what?")]
    both = write_csv(tmp_path / "both.csv", "uri,URI\na.jpg,b.jpg\n")
    load_work_rows(demo(both))  # an exact name wins
    twice = write_csv(tmp_path / "twice.csv", "Uri,URI\na.jpg,b.jpg\n")
    with pytest.raises(SourceError, match="columns Uri, URI all read as `uri`; keep one"):
        load_work_rows(demo(twice))


# --- 4. encoding and types


def test_non_utf8_text_is_refused_in_one_line(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_bytes("uri,id\ncafé.jpg,1\n".encode("latin-1"))
    with pytest.raises(SourceError) as info:
        load_work_rows(demo(manifest))
    assert str(info.value) == f"input {manifest} is not UTF-8 text (byte 0xe9 at offset 10); re-save it as UTF-8"
    ann = tmp_path / "qa.json"
    ann.write_bytes(b'[{"video": "v", "question": "\xff"}]')
    with pytest.raises(SourceError, match=r"is not UTF-8 text \(byte 0xff at offset 29\)"):
        load_work_rows(demo(ann, "task=qa"))


def test_utf8_with_bom_is_fine(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_bytes("\ufeffuri,id\ncafé.jpg,1\n".encode())
    assert [r["uri"] for r in load_work_rows(demo(manifest))] == [str(tmp_path / "café.jpg")]
    bad = tmp_path / "bad.csv"
    bad.write_bytes("\ufeffuri,id\n".encode() + b"\xff.jpg,1\n")
    with pytest.raises(SourceError, match=r"byte 0xff at offset 10\)"):  # offsets count the mark
        load_work_rows(demo(bad))


def test_non_string_uris_are_refused(tmp_path):
    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.table({"uri": [1, 2], "id": ["a", "b"]}), manifest)
    with pytest.raises(SourceError, match=r"the `uri` column holds int64 values; it must hold strings"):
        load_work_rows(demo(manifest))
    lines = tmp_path / "m.jsonl"
    lines.write_text('{"uri": "a.jpg"}\n{"uri": 7}\n')
    with pytest.raises(SourceError, match=r"line 2: `uri` is 7 \(int\), not a path or URI"):
        load_work_rows(demo(lines))


# --- 5. a missing input


def test_missing_relative_input_says_where_it_was_looked_for(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(RAY_JOB_ENV, raising=False)
    with pytest.raises(SourceError) as info:
        check_input(demo("demo_out/corpus"))
    assert str(info.value) == f"input demo_out/corpus does not exist (looked for {tmp_path / 'demo_out/corpus'})"
    with pytest.raises(SourceError, match="^input /no/such/dir does not exist$"):
        check_input(demo("/no/such/dir"))


def test_missing_relative_input_under_ray_job_submit(tmp_path):
    """The entrypoint of `ray job submit` gets RAY_JOB_CONFIG_JSON_ENV_VAR (Ray's job supervisor)."""
    proc = caption_cli("--output", str(tmp_path / "out"), cwd=tmp_path, env={RAY_JOB_ENV: "{}"})
    line = one_error_line(proc)
    assert "input demo_out/corpus does not exist in this Ray job's working directory" in line
    assert "without its git-ignored files (like demo_out/)" in line and "absolute path" in line
    assert "object-store URI" in line
