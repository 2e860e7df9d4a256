"""Offline VideoQA scoring: normalised exact match per question type, and RelAcc.

No GPT judge: answers in these corpora are single words or short phrases, so exact match after
normalisation is deterministic and, for pruning, RelAcc (method ÷ unpruned, same scorer) cancels
most of a scorer's bias.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable

NUMBER_WORDS = {str(i): w for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
ARTICLES = {"a", "an", "the"}


def normalise_answer(text: str) -> str:
    """Lowercase, drop punctuation and articles, spell digits: 'The 3.' -> 'three'."""
    tokens = re.sub(r"[^\w\s]", " ", text.lower()).split()
    return " ".join(NUMBER_WORDS.get(t, t) for t in tokens if t not in ARTICLES)


def is_correct(prediction: str | None, answer: str) -> bool:
    return prediction is not None and normalise_answer(prediction) == normalise_answer(answer)


def accuracy_by_type(records: Iterable[tuple[str, bool]]) -> dict[str, float]:
    """(question type, correct) pairs -> accuracy per type plus 'all' (micro average over questions)."""
    hits: dict[str, list[bool]] = defaultdict(list)
    for qtype, correct in records:
        hits[str(qtype)].append(bool(correct))
        hits["all"].append(bool(correct))
    return {t: sum(v) / len(v) for t, v in sorted(hits.items())}


def relative_accuracy(method: dict[str, float], baseline: dict[str, float]) -> float:
    """RelAcc: mean over question types of method / baseline accuracy (types where baseline > 0)."""
    ratios = [method[t] / baseline[t] for t in baseline if t != "all" and baseline[t] > 0 and t in method]
    return sum(ratios) / len(ratios) if ratios else float("nan")
