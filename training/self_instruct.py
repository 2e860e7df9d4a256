"""Instructions written by the base model itself (Magpie, Xu et al. 2024).

An instruction-tuned model given only its chat template's text up to the user's turn (the system
message and ``<|im_start|>user``) continues it with a user request like those it was tuned on. Sampled
at temperature 1, these are everyday requests of every kind: advice, code, plans, trivia, writing.
That is the distribution a deployed model's users bring, and the one the hand-written held-out file
(``evaluation/data/heldout_instructions.txt``) stands for, where the template-built set
(``training.instructions``) leaves the twig at acceptance 0.30 against 0.57 on its own kind.

A request is kept when the model ended the turn itself (not cut at ``max_tokens``), it has a few words
and mostly letters, and it is new: normalised duplicates and any instruction in ``exclude`` (the
held-out file) are dropped. Sampling is seeded per row (``operators.decoding.sampling``), and the
kept requests go to a JSONL, so a rerun reads them back instead of sampling again.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn

from operators.batch import text_batch
from operators.decoding.autoregressive import Autoregressive
from operators.decoding.sampling import Sampler
from operators.language_model import text_model
from operators.prefill import LayerPlan
from operators.settings import EngineConfig

SOURCE = "self"
MARKER = "\x00REQUEST\x00"


def query_prefix(tokenizer) -> str:
    """The chat template's text before a user's words: the default system turn and the user header."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": MARKER}], tokenize=False)
    if MARKER not in text:
        raise ValueError("the tokenizer's chat template does not render the user's message verbatim")
    return text[: text.index(MARKER)]


def normalise(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def acceptable(text: str, min_words: int = 4, max_chars: int = 600) -> bool:
    """A request worth answering: a few words, not too long, mostly letters (no code dumps or noise)."""
    if len(text.split()) < min_words or len(text) > max_chars:
        return False
    letters = sum(ch.isalpha() for ch in text)
    ascii_letters = sum(ch.isascii() and ch.isalpha() for ch in text)
    return letters >= 0.6 * len(text.replace(" ", "")) and ascii_letters >= 0.9 * letters


@torch.no_grad()
def sample_requests(
    model: nn.Module,
    tokenizer,
    n: int,
    seed: int = 0,
    batch: int = 32,
    max_tokens: int = 64,
    temperature: float = 1.0,
    top_p: float = 0.95,
    exclude: Iterable[str] = (),
    path: Path | None = None,
    log: Callable[[str], None] = print,
    max_draws: int | None = None,
) -> list[dict]:
    """``n`` new user requests ({"text", "source": "self"}) sampled from ``model`` after the query
    prefix, in batches of ``batch`` rows. With ``path`` (JSONL) the kept requests are appended as they
    come and read back first, so a rerun resumes. After ``max_draws`` samples (default 20 per request
    asked) it stops with what it has, saying so: a model that never ends a user turn writes none."""
    kept: list[dict] = []
    if path is not None and path.exists():
        kept = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    seen = {normalise(t) for t in exclude} | {normalise(r["text"]) for r in kept}
    end_ids = [t for t in {tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id} if t is not None]
    end_ids = [t for t in end_ids if t != tokenizer.unk_token_id]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_ids[0]
    prefix = tokenizer(query_prefix(tokenizer), return_tensors="pt", add_special_tokens=False)["input_ids"]
    lm, layers = text_model(model), len(text_model(model).layers)
    config = EngineConfig(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p)
    decoder = Autoregressive(config, end_ids, pad)
    drawn = len(kept) * 2  # row keys go on from a resumed run's (about half the draws are kept)
    limit = drawn + (max_draws if max_draws is not None else 20 * n)
    sink = path.open("a") if path is not None else None
    try:
        while len(kept) < n:
            if drawn >= limit:
                log(f"  self-written requests: stopping with {len(kept)} after {drawn} draws (too few end their turn)")
                break
            keys = [f"{SOURCE}/{drawn + row}" for row in range(batch)]
            drawn += batch
            sampler = Sampler.for_rows(temperature, None, top_p, seed, keys, prefix.device)
            ids = prefix.repeat(batch, 1)
            prompts = text_batch(lm.embed_tokens, ids, torch.ones_like(ids))
            gen = decoder.generate(model, prompts, LayerPlan(layers), sampler=sampler)
            for row in range(batch):
                tokens = gen.tokens[row, : int(gen.lengths[row])].tolist()
                if not tokens or tokens[-1] not in end_ids:  # cut at max_tokens: an unfinished request
                    continue
                text = tokenizer.decode(tokens[:-1], skip_special_tokens=True).strip()
                key = normalise(text)
                if not acceptable(text) or key in seen:
                    continue
                seen.add(key)
                record = {"text": text, "source": SOURCE}
                kept.append(record)
                if sink is not None:
                    sink.write(json.dumps(record) + "\n")
            if sink is not None:
                sink.flush()
            log(f"  self-written requests: {min(len(kept), n)}/{n} kept of {drawn} drawn")
    finally:
        if sink is not None:
            sink.close()
    return kept[:n]
