"""Sources: prefixes, manifests and VideoQA annotation layouts become unique work rows."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import load_config
from pipeline.sources import SourceError, load_work_rows
from synthetic.corpus import write_corpus


def config(uri, *overrides):
    return load_config(None, [f"input.uri='{uri}'", *overrides])


def touch(path, data=b"x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_prefix_lists_media_by_extension(tmp_path):
    for name in ["a/1.jpg", "a/2.PNG", "b/c/3.mp4", "notes.txt", "_hidden.jpg", ".x.png", "4.webm"]:
        touch(tmp_path / name)
    rows = load_work_rows(config(tmp_path))
    assert [r["item_id"] for r in rows] == ["4.webm", "a/1.jpg", "a/2.PNG", "b/c/3.mp4"]
    assert [r["media_type"] for r in rows] == ["video", "image", "image", "video"]
    assert rows[1]["uri"] == str(tmp_path / "a/1.jpg")
    assert all(r["question"] is None for r in rows)
    limited = load_work_rows(config(tmp_path, "input.limit=2", "input.extensions=[jpg, png]"))
    assert [r["item_id"] for r in limited] == ["a/1.jpg", "a/2.PNG"]


def test_empty_prefix_is_an_error(tmp_path):
    touch(tmp_path / "readme.txt")
    with pytest.raises(SourceError, match="no items found"):
        load_work_rows(config(tmp_path))


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_manifest_formats(tmp_path, fmt):
    records = [
        {"uri": "media/x.jpg", "id": "one", "question": "what colour?"},
        {"uri": "/abs/y.mp4", "id": "two", "question": "how many?"},
    ]
    path = tmp_path / f"manifest.{fmt}"
    if fmt == "csv":
        path.write_text("uri,id,question\n" + "".join(f"{r['uri']},{r['id']},{r['question']}\n" for r in records))
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        pq.write_table(pa.Table.from_pylist(records), path)
    rows = load_work_rows(config(path, "task=qa"))
    assert [(r["item_id"], r["uri"], r["question"]) for r in rows] == [
        ("one", str(tmp_path / "media/x.jpg"), "what colour?"),  # relative to the manifest
        ("two", "/abs/y.mp4", "how many?"),
    ]
    captions = load_work_rows(config(path))  # the id column keys captions too
    assert [(r["item_id"], r["uri"], r["question"]) for r in captions] == [
        ("one", str(tmp_path / "media/x.jpg"), None),
        ("two", "/abs/y.mp4", None),
    ]


def test_manifest_without_ids_gets_stable_distinct_ids(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps({"uri": "v.mp4", "question": q}) + "\n" for q in ["a?", "b?"]))
    rows = load_work_rows(config(path, "task=qa"))
    assert len({r["item_id"] for r in rows}) == 2
    assert rows == load_work_rows(config(path, "task=qa"))


def test_duplicate_ids_are_refused(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps({"uri": u, "id": "same", "question": "q"}) + "\n" for u in ["a.jpg", "b.jpg"]))
    with pytest.raises(SourceError, match="ids must be unique"):
        load_work_rows(config(path, "task=qa"))


def test_qa_needs_questions(tmp_path):
    touch(tmp_path / "a.jpg")
    with pytest.raises(SourceError, match="task=qa needs a question"):
        load_work_rows(config(tmp_path, "task=qa"))


def test_generated_corpus_annotations(tmp_path):
    """Our own corpus: MSVD-QA-style qa.json and the Video-ChatGPT pair give the same questions."""
    write_corpus(str(tmp_path), seed=5, n_images=2, n_videos=2)
    qa = load_work_rows(config(tmp_path / "qa.json", "task=qa"))
    pair = load_work_rows(config(tmp_path / "test_q.json", "task=qa"))
    records = json.loads((tmp_path / "qa.json").read_text())
    assert len(qa) == len(records)
    videos = [r for r in qa if r["media_type"] == "video"]  # the Video-ChatGPT pair holds the videos' questions
    assert len(videos) == len(pair) > 0
    assert [(r["item_id"], r["uri"], r["question"], r["answer"], r["question_type"]) for r in videos] == [
        (r["item_id"], r["uri"], r["question"], r["answer"], r["question_type"]) for r in pair
    ]
    by_id = {r["question_id"]: r for r in records}
    for row in qa:
        rec = by_id[row["item_id"]]
        assert row["answer"] == rec["answer"] and row["question_type"] == rec["type"]
        assert row["uri"].endswith(rec.get("video") or rec.get("image"))
    captions = load_work_rows(config(tmp_path / "qa.json"))
    assert len(captions) == 4  # one per media file


def test_msrvtt_video_ids_and_extension_search(tmp_path):
    touch(tmp_path / "videos/video7.mp4")
    touch(tmp_path / "videos/video9.avi")
    ann = tmp_path / "msrvtt_test_qa.json"
    ann.write_text(
        json.dumps(
            [
                {"id": 0, "video_id": 7, "question": "q0", "answer": "a0"},
                {"id": 1, "video_id": 9, "question": "q1", "answer": "a1"},
            ]
        )
    )
    rows = load_work_rows(config(ann, "task=qa", f"input.media_prefix='{tmp_path / 'videos'}'"))
    assert [r["uri"] for r in rows] == [str(tmp_path / "videos/video7.mp4"), str(tmp_path / "videos/video9.avi")]
    assert [r["item_id"] for r in rows] == ["0", "1"]


def test_activitynet_pair_prefix_and_types(tmp_path):
    touch(tmp_path / "all_test/v_abc.mp4")
    (tmp_path / "test_q.json").write_text(
        json.dumps(
            [
                {"video_name": "abc", "question": "is it day", "question_id": "v_abc_1"},
                {"video_name": "abc", "question": "what color", "question_id": "v_abc_2"},
            ]
        )
    )
    (tmp_path / "test_a.json").write_text(
        json.dumps(
            [
                {"answer": "yes", "type": 3, "question_id": "v_abc_1"},
                {"answer": "red", "type": 4, "question_id": "v_abc_2"},
            ]
        )
    )
    rows = load_work_rows(
        config(
            tmp_path / "test_q.json",
            "task=qa",
            "input.layout=activitynet_qa",
            f"input.media_prefix='{tmp_path / 'all_test'}'",
        )
    )
    assert [(r["uri"], r["answer"], r["question_type"]) for r in rows] == [
        (str(tmp_path / "all_test/v_abc.mp4"), "yes", "yes_no"),
        (str(tmp_path / "all_test/v_abc.mp4"), "red", "color"),
    ]


def test_answer_file_must_agree(tmp_path):
    touch(tmp_path / "v.mp4")
    (tmp_path / "test_q.json").write_text(json.dumps([{"video_name": "v", "question": "q", "question_id": "1"}]))
    (tmp_path / "test_a.json").write_text(json.dumps([{"answer": "a", "type": 0, "question_id": "2"}]))
    with pytest.raises(SourceError, match="disagree at position 0"):
        load_work_rows(config(tmp_path / "test_q.json", "task=qa"))


def test_tgif_frameqa_tsv(tmp_path):
    touch(tmp_path / "gifs/tumblr_x.gif")
    ann = tmp_path / "Test_frameqa_question.tsv"
    ann.write_text(
        "gif_name\tquestion\tanswer\ttype\tvid_id\tkey\ntumblr_x\twhat is the cat doing\tsleeping\t0\tgif1\t7\n"
    )
    rows = load_work_rows(
        config(
            ann,
            "task=qa",
            "input.kind=annotations",
            "input.layout=tgif_qa",
            f"input.media_prefix='{tmp_path / 'gifs'}'",
        )
    )
    assert [(r["item_id"], r["uri"], r["answer"]) for r in rows] == [
        ("7", str(tmp_path / "gifs/tumblr_x.gif"), "sleeping")
    ]
