"""QA accuracy of an engine on shapes-world items: normalised exact match per question type."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from PIL import Image

from evaluation import scoring
from evaluation.scoring import normalise_answer, relative_accuracy  # noqa: F401  (re-exported)
from operators.engine import Engine, Request, format_prompt
from synthetic.world import Item, blank_frames, sample_frame_indices


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
    return scoring.accuracy_by_type((r.type, r.correct) for r in records)
