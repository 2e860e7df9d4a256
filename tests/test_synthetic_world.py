"""Shapes world: determinism, corpus schema, closed vocabulary, geometry, blank control, video, balance."""

from __future__ import annotations

import io
import json
from collections import Counter

import decord
import fsspec
import numpy as np
import pytest
from PIL import Image

from synthetic import world
from synthetic.corpus import TYPE_CODES, _mp4_bytes, encode_mp4, write_corpus
from synthetic.world import (
    COLOURS,
    IMAGE_QUESTION_TYPES,
    MOTIONS,
    POSITIONS,
    SHAPES,
    VIDEO_QUESTION_TYPES,
    WorldConfig,
    answer_set,
    blank_frames,
    iter_items,
    make_item,
    sample_frame_indices,
    vocabulary,
    words,
)

ANNOTATIONS = ("qa.json", "captions.json", "test_q.json", "test_a.json", "scenes.jsonl")


@pytest.fixture(scope="module")
def items():
    """150 images and 150 videos of seed 0, generated once for the module."""
    return list(iter_items(0, 150, "image")) + list(iter_items(0, 150, "video"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    return out, write_corpus(str(out), 7, 8, 4)


def _names(question: str) -> list[str]:
    """The "<colour> <shape>" objects a question names, in order."""
    toks = words(question)
    return [f"{a} {b}" for a, b in zip(toks, toks[1:], strict=False) if a in COLOURS and b in SHAPES]


def _obj(item, name: str) -> dict:
    (obj,) = [o for o in item.scene["objects"] if f"{o['colour']} {o['shape']}" == name]
    return obj


def _centre(box) -> np.ndarray:
    return np.array([box[0] + box[2], box[1] + box[3]]) / 2


def _object_mask(item) -> np.ndarray:
    mask = np.zeros(item.frames.shape[:3], bool)
    for o in item.scene["objects"]:
        for t, box in enumerate(o["boxes"]):
            if box is not None:
                mask[t, box[1] : box[3], box[0] : box[2]] |= world._sprite(o["shape"], o["size_px"])
    return mask


def test_make_item_is_pure_and_seeded():
    for kind in ("image", "video"):
        a, b = make_item(5, 3, kind), make_item(5, 3, kind)
        assert a.frames.tobytes() == b.frames.tobytes() and a.frames.dtype == np.uint8
        assert (a.item_id, a.caption, a.qa, a.scene) == (b.item_id, b.caption, b.qa, b.scene)
        assert a.item_id == ("img_00000003" if kind == "image" else "vid_00000003")
        other_seed, other_index = make_item(6, 3, kind), make_item(5, 4, kind)
        assert other_seed.caption != a.caption and other_index.caption != a.caption
        assert json.loads(json.dumps(a.scene)) == a.scene  # JSON-serialisable as is
    assert make_item(5, 3, "image").frames.shape == (1, 64, 64, 3)
    video = make_item(5, 3, "video")
    assert 8 <= video.frames.shape[0] <= 16 and video.frames.shape[1:] == (64, 64, 3)


def test_write_corpus_is_deterministic(corpus, tmp_path):
    out, _ = corpus
    write_corpus(str(tmp_path / "same"), 7, 8, 4)
    write_corpus(str(tmp_path / "other"), 8, 8, 4)
    for name in ANNOTATIONS:
        assert (out / name).read_bytes() == (tmp_path / "same" / name).read_bytes(), name
    media = sorted(p.relative_to(out) for p in out.glob("*/*"))
    assert len(media) == 12
    for rel in media:
        assert (out / rel).read_bytes() == (tmp_path / "same" / rel).read_bytes(), rel
    assert (out / "qa.json").read_bytes() != (tmp_path / "other" / "qa.json").read_bytes()
    png = "images/img_00000000.png"
    assert (out / png).read_bytes() != (tmp_path / "other" / png).read_bytes()


def test_annotation_schema(corpus):
    out, summary = corpus
    qa = json.loads((out / "qa.json").read_text())
    assert [r["id"] for r in qa] == list(range(len(qa))) == list(range(summary["qa"]))
    assert len({r["question_id"] for r in qa}) == len(qa)
    per_item = Counter()
    for r in qa:
        media = "image" if "image" in r else "video"
        assert set(r) == {"id", media, "question", "answer", "question_id", "type", "item_id"}
        assert all(isinstance(r[k], str) for k in set(r) - {"id"}) and isinstance(r["id"], int)
        assert r[media] == f"{r['item_id']}.{'png' if media == 'image' else 'mp4'}"
        assert (out / f"{media}s" / r[media]).is_file()
        assert r["question_id"] == f"{r['item_id']}_q{per_item[r['item_id']]}"
        assert r["type"] in (IMAGE_QUESTION_TYPES if media == "image" else VIDEO_QUESTION_TYPES)
        per_item[r["item_id"]] += 1

    captions = json.loads((out / "captions.json").read_text())
    assert [c["item_id"] for c in captions] == [f"img_{i:08d}" for i in range(8)] + [f"vid_{i:08d}" for i in range(4)]
    for c in captions:
        assert set(c) == {"item_id", "kind", "file", "caption"} and (out / c["file"]).is_file()
        assert c["file"] == (f"images/{c['item_id']}.png" if c["kind"] == "image" else f"videos/{c['item_id']}.mp4")

    test_q = json.loads((out / "test_q.json").read_text())
    test_a = json.loads((out / "test_a.json").read_text())
    video_qa = [r for r in qa if "video" in r]
    assert len(test_q) == len(test_a) == len(video_qa) == summary["qa_video"] > 0
    for q, a, r in zip(test_q, test_a, video_qa, strict=True):
        assert set(q) == {"video_name", "question", "question_id"} and set(a) == {"answer", "type", "question_id"}
        assert q["question_id"] == a["question_id"] == r["question_id"]
        assert q["video_name"] == r["item_id"] and q["question"] == r["question"] and a["answer"] == r["answer"]
        assert a["type"] == TYPE_CODES[r["type"]] and isinstance(a["type"], int)

    scenes = [json.loads(line) for line in (out / "scenes.jsonl").read_text().splitlines()]
    assert [s["item_id"] for s in scenes] == [c["item_id"] for c in captions]
    assert all(s["num_frames"] == s["scene"]["num_frames"] for s in scenes)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["seed"] == 7 and manifest["counts"]["qa"] == len(qa) and manifest["config"]["image_size"] == 64
    assert summary["items"] == 12 and summary["bytes"] > summary["media_bytes"] > 0


def test_words_and_vocabulary():
    assert words("Is there a red circle, maybe? yes.") == [
        "is",
        "there",
        "a",
        "red",
        "circle",
        ",",
        "maybe",
        "?",
        "yes",
        ".",
    ]
    vocab = vocabulary()
    assert vocab == sorted(set(vocab)) and {"?", ".", ",", "zero", "four"} <= set(vocab)
    assert set(answer_set("image")) < set(answer_set("video")) == set(answer_set())
    assert all(1 <= len(words(a)) <= 2 for a in answer_set())


def test_text_is_closed(items):
    vocab = set(vocabulary())
    for item in items:
        assert 40 <= len(words(item.caption)) <= 120, item.caption
        lo, hi = (4, 6) if item.kind == "image" else (6, 8)
        assert lo <= len(item.qa) <= hi
        assert len({qa.question for qa in item.qa}) == len(item.qa)
        answers = set(answer_set(item.kind))
        for text in [item.caption, *(qa.question for qa in item.qa)]:
            assert words(text) == text.split() and set(words(text)) <= vocab, text
        for qa in item.qa:
            assert qa.answer in answers and set(words(qa.answer)) <= vocab
            assert qa.type in (IMAGE_QUESTION_TYPES if item.kind == "image" else VIDEO_QUESTION_TYPES)


def test_object_geometry(items):
    for item in items:
        objects, size = item.scene["objects"], item.scene["image_size"]
        assert 1 <= len(objects) <= 4 and objects[0]["appear_frame"] == 0
        assert len({(o["colour"], o["shape"]) for o in objects}) == len(objects)
        drawn = _object_mask(item)
        for i, o in enumerate(objects):
            assert len(o["boxes"]) == len(item.frames)
            assert all(b is None for b in o["boxes"][: o["appear_frame"]])
            boxes = [b for b in o["boxes"] if b is not None]
            assert all(0 <= b[0] < b[2] <= size and 0 <= b[1] < b[3] <= size for b in boxes)
            # the pixels really drawn for the object fit its size class
            t, (x0, y0, x1, y1) = o["appear_frame"], boxes[0]
            ys, xs = np.nonzero(drawn[t, y0:y1, x0:x1])
            extent = max(xs.max() - xs.min(), ys.max() - ys.min()) + 1
            assert extent <= 9 if o["size"] == "small" else 11 <= extent <= 14
            x, y = _centre(boxes[0])
            assert o["position"] == POSITIONS[3 * min(int(3 * y // size), 2) + min(int(3 * x // size), 2)]
            for other in objects[i + 1 :]:
                for a, b in zip(o["boxes"], other["boxes"], strict=True):
                    if a and b:  # at least 2 px apart whenever both are visible
                        assert a[2] + 2 <= b[0] or b[2] + 2 <= a[0] or a[3] + 2 <= b[1] or b[3] + 2 <= a[1]


def test_blank_frames_remove_exactly_the_objects(items):
    for item in items[::10]:
        blank = blank_frames(item)
        assert blank.shape == item.frames.shape and blank.dtype == np.uint8
        assert np.array_equal((blank != item.frames).any(-1), _object_mask(item))


def test_object_index_map_labels_exactly_the_drawn_object_pixels(items):
    for item in items[::10]:
        for t in range(item.frames.shape[0]):
            index = world.object_index_map(item.scene, t)
            assert index.shape == item.frames.shape[1:3]
            assert np.array_equal(index > 0, (blank_frames(item)[t] != item.frames[t]).any(-1))
            for i, obj in enumerate(item.scene["objects"]):  # each object's pixels carry its colour
                assert (item.frames[t][index == i + 1] == world.COLOURS[obj["colour"]]).all()


@pytest.mark.parametrize("codec", [None, "mpeg4"])
def test_mp4_round_trip(tmp_path, codec):
    item = make_item(2, 0, "video")
    path = tmp_path / "clip.mp4"
    if codec is None:
        encode_mp4(item.frames, str(path), fps=8)
        buffer = io.BytesIO()
        encode_mp4(item.frames, buffer, fps=8)
        assert buffer.getvalue() == path.read_bytes()
    else:  # the fallback where libx264 is missing
        path.write_bytes(_mp4_bytes(item.frames, 8, codec))
    reader = decord.VideoReader(str(path))
    decoded = reader.get_batch(list(range(len(reader)))).asnumpy()
    assert decoded.shape == item.frames.shape
    assert np.abs(decoded.astype(int) - item.frames).mean() < 12


def test_video_answers_agree_with_scene(items):
    videos = [item for item in items if item.kind == "video"]
    for item in videos:
        sampled = sample_frame_indices(len(item.frames), 4)
        assert item.scene["order_frames"] == sampled.tolist()
        for o in item.scene["objects"]:
            assert o["appear_frame"] in (0, *sampled[1:-1])
            visible = [b for b in o["boxes"] if b is not None]
            dx, dy = _centre(visible[-1]) - _centre(visible[0])
            expected = {"left": (dx < 0 and dy == 0), "right": (dx > 0 and dy == 0), "up": (dy < 0 and dx == 0)}
            expected |= {"down": dy > 0 and dx == 0, "still": dx == dy == 0}
            assert expected[o["motion"]], (o["motion"], dx, dy)
        for qa in item.qa:
            names = _names(qa.question)
            if qa.type == "motion":
                assert qa.answer == _obj(item, names[0])["motion"]
            elif qa.type == "order":
                a, b = (_obj(item, n) for n in names)
                assert a["appear_frame"] != b["appear_frame"] and qa.answer in names
                first = names[0] if a["appear_frame"] < b["appear_frame"] else names[1]
                assert (qa.answer == first) == ("first" in words(qa.question))
            elif qa.type == "position":
                assert qa.answer == _obj(item, names[0])["position"]


def test_relation_answers_agree_with_scene(items):
    checked = 0
    for item in items:
        for qa in item.qa:
            if qa.type != "relation" or qa.answer not in ("yes", "no"):
                continue
            a, b = (_obj(item, n) for n in _names(qa.question))
            assert a["appear_frame"] == b["appear_frame"] == 0  # relations compare objects shown from frame 0
            toks = words(qa.question)
            axis, sign = next((ax, s) for w, ax, s in _PREDICATES if w in toks)
            diffs = [(_centre(p) - _centre(q))[axis] * sign for p, q in zip(a["boxes"], b["boxes"], strict=True)]
            assert all(d < 0 for d in diffs) if qa.answer == "yes" else all(d > 0 for d in diffs)
            checked += 1
    assert checked > 50


_PREDICATES = (("left", 0, 1), ("right", 0, -1), ("above", 1, 1), ("below", 1, -1))


def test_write_corpus_to_memory_filesystem():
    fs = fsspec.filesystem("memory")
    try:
        summary = write_corpus("memory://corpus-test", 3, 3, 2)
        assert summary["items"] == 5 and summary["paths"]["qa"] == "memory://corpus-test/qa.json"
        qa = json.loads(fs.cat("/corpus-test/qa.json"))
        assert len(qa) == summary["qa"] and fs.exists("/corpus-test/manifest.json")
        png = Image.open(io.BytesIO(fs.cat("/corpus-test/images/img_00000000.png")))
        assert np.array_equal(np.asarray(png), make_item(3, 0, "image").frames[0])
        assert fs.cat("/corpus-test/videos/vid_00000001.mp4")[4:8] == b"ftyp"
    finally:
        fs.rm("/corpus-test", recursive=True)


def test_answers_are_balanced(items):
    qa = [qa for item in items for qa in item.qa]
    yes_no = [q.answer for q in qa if q.answer in ("yes", "no")]
    assert 0.35 <= yes_no.count("yes") / len(yes_no) <= 0.65
    for qtype in ("yesno", "relation"):
        typed = [q.answer == "yes" for q in qa if q.type == qtype and q.answer in ("yes", "no")]
        assert 0.35 <= np.mean(typed) <= 0.65, qtype
    by_type = {t: Counter(q.answer for q in qa if q.type == t) for t in VIDEO_QUESTION_TYPES}
    assert set(by_type["motion"]) == set(MOTIONS)
    assert set(by_type["colour"]) == set(COLOURS) and set(by_type["position"]) == set(POSITIONS)
    assert max(by_type["motion"].values()) / by_type["motion"].total() < 0.35
    order = [q.answer == _names(q.question)[0] for q in qa if q.type == "order"]
    assert len(order) > 30 and 0.3 <= np.mean(order) <= 0.7  # the first-named object is no better a guess


def test_config_validation():
    with pytest.raises(ValueError):
        WorldConfig(image_size=63)
    with pytest.raises(ValueError):
        WorldConfig(max_objects=5)  # counts are answered with "zero" .. "four"
    big = make_item(0, 1, "image", WorldConfig(image_size=128))
    assert big.frames.shape == (1, 128, 128, 3)
