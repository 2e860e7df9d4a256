"""What a reduced draft vocabulary saves: a twig's draft step against a base decode step, by head size N.

A SmolLM2-135M-shaped Llama (49,152 tokens, hidden 576, 30 layers, random weights, fp32) with a twig
on layer K (K + T = 5 layers, as K=2, T=3), a context of ``--context`` tokens in the KV cache, on
``--threads`` CPU threads. One base step is what greedy decoding pays per token: one token through
the 30 layers, the final norm and the 49k-row head. One draft step is what SSD pays per drafted
token: through base layers 1..K, the T twig layers and the twig's head of N rows. Steps alternate
(base, draft at each N) in one process and every figure is a median over ``--repeats``; each step is
rolled back, so the context stays the same.

    python jobs/bench_draft_vocab.py [--batch 1 8] [--sizes 1024 2048 4096 8192 16384 0] [--json FILE]

N = 0 means the full head. Random weights cost what trained ones cost; only the shapes matter.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from operators.batch import text_batch
from operators.decoding.speculative import _run_groups
from operators.kv_cache import CacheGroup
from operators.language_model import base_logits, decode_step, run_layers, text_model
from operators.prefill import LayerPlan, PrefillState, prefill
from operators.twig import Twig, grow_twig, restrict_vocab

SMOLLM2 = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
)


def smollm2_shaped(layers: int = 30, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**{**SMOLLM2, "num_hidden_layers": layers}, attn_implementation="sdpa")
    return LlamaForCausalLM(config).eval()


def _groups(state: PrefillState) -> list[CacheGroup]:
    return [*state.base.groups, *state.twig.groups]


def _timed(step, state: PrefillState) -> float:
    """Seconds of one ``step()``; the caches are rolled back after it (same context every time)."""
    lengths = [g.length for g in _groups(state)]
    t0 = time.perf_counter()
    step()
    seconds = time.perf_counter() - t0
    for group, length in zip(_groups(state), lengths, strict=True):
        group.length = length
    return seconds


@torch.no_grad()
def measure(model, twigs: dict[int, Twig], batch: int, context: int, repeats: int) -> dict:
    """Median ms of a base step and of a draft step per head size, at one batch size."""
    lm = text_model(model)
    K = next(iter(twigs.values())).K
    vocab = lm.embed_tokens.num_embeddings
    ids = torch.randint(0, vocab, (batch, context))
    prompt = text_batch(lm.embed_tokens, ids, torch.ones_like(ids))
    plan = LayerPlan(len(lm.layers), twig_layer=K)
    state = prefill(model, prompt, plan, 8, next(iter(twigs.values())))  # the twigs share K: one cache fits all
    token = torch.randint(0, vocab, (batch,))
    position = state.next_position[:, None]
    valid = torch.ones(batch, 1, dtype=torch.bool)

    def base_step():
        hidden = decode_step(lm, lm.embed_tokens(token)[:, None], position, state.base)
        return base_logits(model, hidden).argmax(dim=-1)  # as greedy decoding computes it

    def draft_step(twig: Twig):
        def run():
            hidden_k = _run_groups(lm, lm.embed_tokens(token)[:, None], position, valid, state.base, state.shallow)
            hidden = run_layers(
                lm, hidden_k, position, valid, state.twig, state.twig.groups[0], None, twig.modules_by_id
            )
            logits = twig.head(twig.norm(hidden[:, -1])).float()  # [B, N]
            return twig.full_ids(logits.softmax(dim=-1).argmax(dim=-1))

        return run

    for _ in range(2):  # warm-up
        _timed(base_step, state)
        for twig in twigs.values():
            _timed(draft_step(twig), state)
    base, draft = [], {n: [] for n in twigs}
    for _ in range(repeats):
        base.append(_timed(base_step, state))
        for n, twig in twigs.items():
            draft[n].append(_timed(draft_step(twig), state))
    base_ms = statistics.median(base) * 1e3
    return {
        "batch": batch,
        "base_ms": round(base_ms, 2),
        "draft_ms": {n: round(statistics.median(v) * 1e3, 2) for n, v in draft.items()},
        "ratio": {n: round(statistics.median(v) * 1e3 / base_ms, 3) for n, v in draft.items()},
    }


def table(rows: list[dict], sizes: list[int]) -> str:
    header = ["N"] + [f"draft ms (b{r['batch']})" for r in rows] + [f"draft/base (b{r['batch']})" for r in rows]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for n in sizes:
        label = "full (49152)" if n == 0 else str(n)
        cells = [str(r["draft_ms"][n]) for r in rows] + [str(r["ratio"][n]) for r in rows]
        lines.append("| " + " | ".join([label, *cells]) + " |")
    lines.append("")
    lines.append("base step: " + ", ".join(f"{r['base_ms']} ms at batch {r['batch']}" for r in rows))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 0])
    parser.add_argument("--K", type=int, default=2)
    parser.add_argument("--T", type=int, default=3)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--context", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = smollm2_shaped(args.layers)
    base_twig = grow_twig(model, args.K, args.T)
    twigs = {}
    for n in args.sizes:
        twig = grow_twig(model, args.K, args.T)
        # Which ids does not matter for cost; a real twig takes the base's most frequent outputs.
        twigs[n] = restrict_vocab(twig, torch.arange(n)) if 0 < n < base_twig.vocab_size else twig
    rows = [measure(model, twigs, b, args.context, args.repeats) for b in args.batch]
    print(table(rows, args.sizes))
    if args.json:
        report = {
            "command": "python jobs/bench_draft_vocab.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "model": "SmolLM2-135M-shaped Llama, random weights, fp32",
            "K": args.K,
            "T": args.T,
            "context": args.context,
            "threads": args.threads,
            "repeats": args.repeats,
            "torch": torch.__version__,
            "results": rows,
        }
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
