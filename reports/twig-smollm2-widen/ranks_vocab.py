"""Scratch: teacher-forced ranks of the base's greedy token among a twig's draft scores on the held-out
file, for the committed twig and for it with its head widened (operators.twig.extend_vocab) to each N,
optionally after --steps of training on the replies (the 4,096-token twig too, as the control,
unless --no-control).

python reports/twig-smollm2-widen/ranks_vocab.py REPLIES_JSONL OUT_JSON N [N ...] [--steps S --lr LR]
REPLIES_JSONL: the base's replies that order the added tokens and are trained on (replies.py's; its
last 64, the validation instructions, are left out as training leaves them out).
The held-out greedy replies are cached next to OUT_JSON (heldout_replies.json)."""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from evaluation.bench_twig_lm import (  # noqa: E402
    TextProcessor,
    conversations_of,
    extend_to_replies,
    greedy_replies,
    load_text_lm,
)
from operators.twig import load_twig  # noqa: E402
from training.instructions import read_prompts  # noqa: E402
from training.train_twig import TwigTrainConfig, collate, encode, train_twig, twig_logits  # noqa: E402

torch.set_num_threads(2)
parser = argparse.ArgumentParser()
parser.add_argument("replies", type=Path)
parser.add_argument("out", type=Path)
parser.add_argument("sizes", type=int, nargs="+")
parser.add_argument("--steps", type=int, default=0)
parser.add_argument("--lr", type=float, default=5e-4)
parser.add_argument("--no-control", action="store_true", help="--steps: do not train the 4,096-token twig")
args = parser.parse_args()
replies_path, out_path, sizes = args.replies, args.out, args.sizes
model, tok = load_text_lm(None, Path.home() / ".cache/vlm-batch/smollm2-135m-instruct")
processor = TextProcessor(tok)
prompts = read_prompts(Path("evaluation/data/heldout_instructions.txt"))
cache = out_path.parent / "heldout_replies.json"
if not cache.exists():
    cache.write_text(json.dumps(greedy_replies(model, tok, prompts, 96, batch=16)))
replies = json.loads(cache.read_text())
rows = [{"text": p, "reply": r, "source": "heldout"} for p, r in zip(prompts, replies, strict=True)]
held = [encode(processor, c) for c in conversations_of(rows)]
records = [json.loads(line) for line in replies_path.read_text().splitlines()]
train = conversations_of(records[:-64])  # the last 64 are the validation instructions, as in training


def ranks(twig) -> list[int]:
    out = []
    for s in range(0, len(held), 8):
        batch = collate(held[s : s + 8], tok.pad_token_id)
        with torch.no_grad():
            tl, _, bl = twig_logits(model, twig, twig.K, batch, torch.device("cpu"), with_base=True, feature_drop=1.0)
        idx = twig.draft_index(bl.argmax(-1))
        score = tl.gather(1, idx.clamp(min=0)[:, None])
        rank = torch.where(idx < 0, 10**6, (tl > score).sum(1))
        out += rank.tolist()
    return out


results = {}
for n in [4096, *sizes]:
    twig = load_twig("models/smollm2-twig", model)
    info = extend_to_replies(model, twig, processor, train, n, held) if n > 4096 else {"size": 4096}
    trained = args.steps and not (n == 4096 and args.no_control)
    if trained:  # as bench_twig_lm trains: distilled, cosine schedule with warm-up
        cfg = TwigTrainConfig(
            K=twig.K, T=twig.T, steps=args.steps, lr=args.lr, warmup=max(1, min(50, args.steps // 10)), distill=1.0
        )
        info["training"] = {
            k: v for k, v in train_twig(model, processor, twig.float(), train, cfg).items() if k != "losses"
        }
    r = ranks(twig)
    row = {k: round(sum(x < k for x in r) / len(r), 4) for k in (1, 2, 4, 8)}
    row["outside"] = round(sum(x >= 10**6 for x in r) / len(r), 4)
    results[n] = {
        "ranks_summary": row,
        "steps": args.steps if trained else 0,
        "vocab": {k: v for k, v in info.items() if k != "coverage_curve"},
        "ranks": r,
    }
    print(n, row, {k: v for k, v in info.items() if k != "coverage_curve"}, flush=True)
out_path.write_text(json.dumps(results))
