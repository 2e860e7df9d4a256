"""A twig's draft vocabulary: the N tokens the base outputs most often on the twig's training data.

FR-Spec (Zhao et al., 2025) and EAGLE-3 restrict the draft head to frequent tokens: on a 49k-token
head (SmolLM2) the head alone costs about eight decoder layers, and a draft only pays if it is cheap.
Tokens outside the subset can never be drafted (the base still emits them: the draft is rejected),
so the subset should cover what the base says: we count the base's own predictions along the
training replies (teacher forced: at each answer position, the base's argmax). When the replies are
the base's own greedy replies, that is exactly counting the reply tokens.

N is a trade between draft cost (``jobs/bench_draft_vocab.py``) and coverage (``coverage_curve``):
the share of the base's output tokens a draft of that vocabulary could have proposed.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from training.train_twig import IGNORE, Conversation, collate, encode, model_inputs

SIZES = (1024, 2048, 4096, 8192, 16384, 32768)  # the coverage curve the training report records


def count_tokens(sequences: Iterable[torch.Tensor], vocab_size: int) -> torch.Tensor:
    """Occurrences of each token id [V] (long) over token sequences (any shape each)."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for tokens in sequences:
        counts += torch.bincount(tokens.reshape(-1).cpu().long(), minlength=vocab_size)[:vocab_size]
    return counts


@torch.no_grad()
def base_reply_counts(
    model: nn.Module, processor, conversations: list[Conversation], batch_size: int = 16
) -> torch.Tensor:
    """How often the base outputs each token [V] along the answers of ``conversations``: its argmax
    at every answer position (teacher forced), one full base forward per batch."""
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    vocab = model.lm_head.out_features
    pad_id = processor.tokenizer.pad_token_id
    pad_id = processor.tokenizer.eos_token_id if pad_id is None else pad_id
    predictions = []
    for start in range(0, len(conversations), batch_size):
        batch = collate([encode(processor, c) for c in conversations[start : start + batch_size]], pad_id)
        logits = model(**model_inputs(batch, device, dtype), use_cache=False).logits  # [B, S, V]
        select = batch["labels"][:, 1:].to(device) != IGNORE  # position s predicts token s+1
        predictions.append(logits[:, :-1][select].argmax(dim=-1))
    return count_tokens(predictions, vocab)


def choose_draft_vocab(counts: torch.Tensor, n: int, always: Iterable[int] = ()) -> torch.Tensor:
    """The ``n`` most frequent ids [n] (most frequent first; ties: lower id first), with the ids in
    ``always`` (EOS: drafting stops there) included whatever their count."""
    vocab = counts.shape[0]
    n = min(n, vocab)
    order = torch.sort(-counts.long(), stable=True).indices.tolist()  # descending count, then ascending id
    forced = {int(a) for a in always if 0 <= int(a) < vocab}
    if len(forced) > n:
        raise ValueError(f"a draft vocabulary of {n} tokens cannot hold the {len(forced)} required ids")
    chosen = forced | set([i for i in order if i not in forced][: n - len(forced)])
    rank = {i: r for r, i in enumerate(order)}
    return torch.tensor(sorted(chosen, key=rank.__getitem__), dtype=torch.long)


def coverage(counts: torch.Tensor, draft_vocab: torch.Tensor) -> float:
    """Share of the counted tokens inside ``draft_vocab``."""
    total = int(counts.sum())
    return float(counts[draft_vocab].sum()) / total if total else 0.0


def coverage_curve(counts: torch.Tensor, sizes: Iterable[int] = SIZES) -> dict[int, float]:
    """N -> coverage of the N most frequent tokens (the upper bound on acceptance that N allows)."""
    ranked = torch.sort(counts, descending=True).values.cumsum(0)
    total = max(1, int(counts.sum()))
    return {int(n): round(float(ranked[min(n, len(ranked)) - 1]) / total, 5) for n in sizes}


def eos_ids(model: nn.Module, processor) -> list[int]:
    """The ids that end a reply: a draft vocabulary keeps them, so a draft can stop."""
    ids = model.generation_config.eos_token_id if getattr(model, "generation_config", None) else None
    ids = list(ids) if isinstance(ids, (list, tuple)) else [ids]
    ids.append(processor.tokenizer.eos_token_id)
    return sorted({int(i) for i in ids if i is not None and int(i) >= 0})


def draft_vocab_from_replies(
    model: nn.Module, processor, conversations: list[Conversation], n: int, max_items: int = 4096
) -> tuple[torch.Tensor, dict]:
    """(draft vocabulary [n], a report) from the base's outputs on at most ``max_items`` conversations
    spread evenly over the list. Deterministic, so every data-parallel worker computes the same one.
    """
    sample = conversations[:: max(1, -(-len(conversations) // max_items))]
    counts = base_reply_counts(model, processor, sample)
    vocab = choose_draft_vocab(counts, n, eos_ids(model, processor))
    report = {
        "size": len(vocab),
        "counted_tokens": int(counts.sum()),
        "counted_conversations": len(sample),
        "distinct_tokens": int((counts > 0).sum()),
        "coverage": round(coverage(counts, vocab), 5),
        "coverage_curve": coverage_curve(counts),
    }
    return vocab, report
