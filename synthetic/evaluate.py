"""QA accuracy of an engine on shapes-world items: normalised exact match per question type."""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from PIL import Image

from operators.engine import Engine, Request, format_prompt
from synthetic.world import Item, blank_frames, sample_frame_indices

NUMBER_WORDS = {str(i): w for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
ARTICLES = {"a", "an", "the"}


def normalise_answer(text: str) -> str:
    """Lowercase, drop punctuation and articles, spell digits: 'The 3.' -> 'three'."""
    tokens = re.sub(r"[^\w\s]", " ", text.lower()).split()
    return " ".join(NUMBER_WORDS.get(t, t) for t in tokens if t not in ARTICLES)


@dataclass
class QARecord:
    item_id: str
    kind: str
    type: str
    question: str
    answer: str
    prediction: str = ""

    @property
    def correct(self) -> bool:
        return normalise_answer(self.prediction) == normalise_answer(self.answer)


def media_for(item: Item, frames_per_video: int, blank: bool = False) -> dict:
    """Request media for an item: its image, or ``frames_per_video`` uniformly sampled frames."""
    frames = blank_frames(item) if blank else item.frames
    if item.kind == "image":
        return {"images": [Image.fromarray(frames[0])]}
    return {"video": frames[sample_frame_indices(len(frames), frames_per_video)]}


def answer_questions(
    engine: Engine, items: Iterable[Item], frames_per_video: int, blank: bool = False, batch_size: int = 32
) -> list[QARecord]:
    """Ask every QA pair of every item; predictions filled in."""
    records, requests = [], []
    for item in items:
        media = media_for(item, frames_per_video, blank)
        for qa in item.qa:
            records.append(QARecord(item.item_id, item.kind, qa.type, qa.question, qa.answer))
            requests.append(Request(format_prompt(engine.processor, qa.question, item.kind), **media))
    for start in range(0, len(requests), batch_size):
        for record, result in zip(
            records[start : start + batch_size], engine.generate(requests[start : start + batch_size]), strict=True
        ):
            record.prediction = result.text
    return records


def accuracy_by_type(records: list[QARecord]) -> dict[str, float]:
    """Accuracy per question type, plus 'all' (micro average over questions)."""
    hits: dict[str, list[bool]] = defaultdict(list)
    for r in records:
        hits[r.type].append(r.correct)
        hits["all"].append(r.correct)
    return {t: float(np.mean(v)) for t, v in sorted(hits.items())}


def relative_accuracy(method: dict[str, float], baseline: dict[str, float]) -> float:
    """RelAcc: mean over question types of method / baseline accuracy (types where baseline > 0)."""
    ratios = [method[t] / baseline[t] for t in baseline if t != "all" and baseline[t] > 0 and t in method]
    return float(np.mean(ratios)) if ratios else float("nan")
