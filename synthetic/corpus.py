"""Write a shapes-world corpus (PNG/MP4 media and QA/caption annotations) to a local dir or any fsspec URI.

Everything streams: each media file is written as soon as its item is generated, and the JSON lists are
written record by record, so memory stays flat however large the corpus. ``manifest.json`` is written last
and marks a complete corpus. Layout under ``out``::

    images/<item_id>.png, videos/<item_id>.mp4
    qa.json          one record per QA pair (MSVD-QA / MSRVTT-QA style)
    captions.json    one record per item
    test_q.json, test_a.json   Video-ChatGPT style pair, video questions only ("type" indexes QUESTION_TYPES)
    scenes.jsonl     ground truth, one item per line
    manifest.json    seed, counts, world config, generator version
"""

from __future__ import annotations

import io
import json
import time
from collections import Counter
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict
from fractions import Fraction
from typing import IO

import av
import fsspec
import numpy as np
from PIL import Image

from synthetic.world import QUESTION_TYPES, Item, WorldConfig, iter_items

GENERATOR_VERSION = "shapes-world/1"
TYPE_CODES = {t: i for i, t in enumerate(QUESTION_TYPES)}  # the int "type" of test_a.json


def _mp4_bytes(frames: np.ndarray, fps: int, codec: str | None = None) -> bytes:
    """H.264 (libx264, yuv420p) MP4 of uint8 [T, H, W, 3] frames; MPEG-4 part 2 where libx264 is missing."""
    codec = codec or ("libx264" if "libx264" in av.codecs_available else "mpeg4")
    buffer = io.BytesIO()
    # The MP4 muxer seeks back to write its index, so encode to memory: object stores cannot seek.
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.time_base = Fraction(1, fps)
        # One thread: clips are tiny, and a fixed thread count keeps the bytes reproducible.
        stream.codec_context.thread_count = 1
        if codec == "libx264":
            stream.options = {"crf": "18", "preset": "medium"}  # near-lossless: small shapes keep their colour
        else:
            stream.bit_rate = 2_000_000
        for t, frame in enumerate(frames):
            video_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            video_frame.pts = t
            container.mux(stream.encode(video_frame))
        container.mux(stream.encode())
    return buffer.getvalue()


def encode_mp4(frames: np.ndarray, path_or_file, fps: int) -> None:
    """Write frames (uint8 [T, H, W, 3], even H and W) as an H.264 MP4 to a path, fsspec URI or binary file."""
    data = _mp4_bytes(frames, fps)
    if hasattr(path_or_file, "write"):
        path_or_file.write(data)
    else:
        with fsspec.open(str(path_or_file), "wb") as f:
            f.write(data)


def _png_bytes(frame: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format="PNG")
    return buffer.getvalue()


class _Sink:
    """A binary file written in pieces, counting bytes; ``json_list`` makes it a streamed JSON list."""

    def __init__(self, f: IO[bytes], json_list: bool = False) -> None:
        self.f, self.json_list, self.records, self.bytes = f, json_list, 0, 0
        if json_list:
            self._write(b"[")

    def _write(self, data: bytes) -> None:
        self.f.write(data)
        self.bytes += len(data)

    def add(self, record: dict) -> None:
        text = json.dumps(record).encode()
        if self.json_list:
            self._write((b"\n" if self.records == 0 else b",\n") + text)
        else:  # JSON lines
            self._write(text + b"\n")
        self.records += 1

    def close(self) -> None:
        if self.json_list:
            self._write(b"\n]\n" if self.records else b"]\n")


def write_corpus(
    out: str,
    seed: int,
    n_images: int,
    n_videos: int,
    config: WorldConfig = WorldConfig(),
    storage_options: dict | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Generate and write images 0..n_images-1 and videos 0..n_videos-1 of ``seed`` under ``out``.

    ``progress(done, total)`` is called after every item. Returns a summary: counts of items and QA pairs
    (per type), bytes written, seconds, and the path of every annotation file.
    """
    start = time.perf_counter()
    out = out.rstrip("/")
    fs, root = fsspec.core.url_to_fs(out, **(storage_options or {}))
    for sub, count in (("images", n_images), ("videos", n_videos)):
        if count:
            fs.makedirs(f"{root}/{sub}", exist_ok=True)
    names = ("qa.json", "captions.json", "test_q.json", "test_a.json", "scenes.jsonl")
    total, done, media_bytes, qa_id = n_images + n_videos, 0, 0, 0
    qa_types = {"image": Counter(), "video": Counter()}
    with ExitStack() as stack:
        sinks = {
            name: _Sink(stack.enter_context(fs.open(f"{root}/{name}", "wb")), json_list=name.endswith(".json"))
            for name in names
        }
        for kind, count in (("image", n_images), ("video", n_videos)):
            for item in iter_items(seed, count, kind, config):
                media_bytes += _write_media(fs, root, item, config.fps)
                qa_id = _add_records(sinks, item, qa_id)
                qa_types[kind].update(qa.type for qa in item.qa)
                done += 1
                if progress is not None:
                    progress(done, total)
        for sink in sinks.values():
            sink.close()
    counts = {
        "images": n_images,
        "videos": n_videos,
        "items": total,
        "qa": qa_id,
        "qa_image": qa_types["image"].total(),
        "qa_video": qa_types["video"].total(),
        "qa_by_type": {kind: dict(sorted(c.items())) for kind, c in qa_types.items()},
    }
    manifest = {
        "generator": GENERATOR_VERSION,
        "seed": seed,
        "counts": counts,
        "config": asdict(config),
        "question_types": list(QUESTION_TYPES),  # decodes test_a.json's int "type"
    }
    manifest_bytes = json.dumps(manifest, indent=2).encode() + b"\n"
    with fs.open(f"{root}/manifest.json", "wb") as f:
        f.write(manifest_bytes)
    seconds = time.perf_counter() - start
    return {
        "out": out,
        "seed": seed,
        **counts,
        "media_bytes": media_bytes,
        "bytes": media_bytes + sum(s.bytes for s in sinks.values()) + len(manifest_bytes),
        "seconds": round(seconds, 3),
        "items_per_second": round(total / seconds, 1) if seconds > 0 else None,
        "paths": {name.split(".")[0]: f"{out}/{name}" for name in ("images", "videos", *names, "manifest.json")},
    }


def _media_file(item: Item) -> str:
    return f"images/{item.item_id}.png" if item.kind == "image" else f"videos/{item.item_id}.mp4"


def _write_media(fs, root: str, item: Item, fps: int) -> int:
    data = _png_bytes(item.frames[0]) if item.kind == "image" else _mp4_bytes(item.frames, fps)
    with fs.open(f"{root}/{_media_file(item)}", "wb") as f:
        f.write(data)
    return len(data)


def _add_records(sinks: dict[str, _Sink], item: Item, qa_id: int) -> int:
    """Append the item's records to every annotation file; returns the next running QA id."""
    file = _media_file(item)
    media_key, media_name = file.split("/")
    media_key = media_key[:-1]  # "image" / "video"
    for k, qa in enumerate(item.qa):
        question_id = f"{item.item_id}_q{k}"
        sinks["qa.json"].add(
            {
                "id": qa_id,
                media_key: media_name,
                "question": qa.question,
                "answer": qa.answer,
                "question_id": question_id,
                "type": qa.type,
                "item_id": item.item_id,
            }
        )
        qa_id += 1
        if item.kind == "video":
            sinks["test_q.json"].add({"video_name": item.item_id, "question": qa.question, "question_id": question_id})
            sinks["test_a.json"].add({"answer": qa.answer, "type": TYPE_CODES[qa.type], "question_id": question_id})
    sinks["captions.json"].add({"item_id": item.item_id, "kind": item.kind, "file": file, "caption": item.caption})
    sinks["scenes.jsonl"].add(
        {"item_id": item.item_id, "kind": item.kind, "file": file, "num_frames": len(item.frames), "scene": item.scene}
    )
    return qa_id
