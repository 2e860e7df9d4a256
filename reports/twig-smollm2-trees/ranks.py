"""Scratch: ranks of the base's greedy token in the twig's draft scores, teacher-forced, on held-out
(and validation) greedy replies. Saves per-reply rank sequences for tree simulation."""

import json
import sys

import torch

sys.path.insert(0, "/work/main")
from pathlib import Path

from evaluation.bench_twig_lm import engine_inputs, greedy_decode, load_text_lm, prompt_batch
from operators.twig import load_twig
from training.instructions import read_prompts
from training.train_twig import IGNORE, twig_logits

torch.set_num_threads(2)
model, tok = load_text_lm(None, Path.home() / ".cache/vlm-batch/smollm2-135m-instruct")
twig = load_twig("/work/main/models/smollm2-twig", model)
out = {}
for name, path in [
    ("heldout", "/work/main/evaluation/data/heldout_instructions.txt"),
    ("validation", "/work/main/reports/twig-smollm2-distilled/validation_prompts.txt"),
]:
    prompts = read_prompts(Path(path))
    seqs = []
    for s in range(0, len(prompts), 8):
        ids, mask = prompt_batch(tok, prompts[s : s + 8])
        gen = greedy_decode(model, engine_inputs(model, ids, mask), 96, tok.eos_token_id, tok.pad_token_id)
        for r in range(len(ids)):
            p = ids[r][mask[r].bool()]
            g = gen.tokens[r, : int(gen.lengths[r])]
            seqs.append((p, g))
        print(name, s, flush=True)
    allranks = []
    for s in range(0, len(seqs), 8):
        chunk = seqs[s : s + 8]
        W = max(len(p) + len(g) for p, g in chunk)
        input_ids = torch.full((len(chunk), W), tok.pad_token_id)
        labels = torch.full((len(chunk), W), IGNORE)
        am = torch.zeros(len(chunk), W, dtype=torch.long)
        for r, (p, g) in enumerate(chunk):
            n = len(p) + len(g)
            input_ids[r, :n] = torch.cat([p, g])
            labels[r, len(p) : n] = g
            am[r, :n] = 1
        batch = {"input_ids": input_ids, "attention_mask": am, "labels": labels}
        with torch.no_grad():
            tl, target, bl = twig_logits(
                model, twig, twig.K, batch, torch.device("cpu"), with_base=True, feature_drop=1.0
            )
        base = bl.argmax(-1)
        idx = twig.draft_index(base)
        score = tl.gather(1, idx.clamp(min=0)[:, None])
        rank = (tl > score).sum(1)
        rank = torch.where(idx < 0, 10**6, rank)
        # split per row (row-major order)
        sel = labels[:, 1:] != IGNORE
        counts = sel.sum(1).tolist()
        pos = 0
        for c in counts:
            allranks.append(rank[pos : pos + c].tolist())
            pos += c
    out[name] = allranks
    flat = [x for r in allranks for x in r]
    for k in (1, 2, 3, 4, 8):
        print(name, "top", k, sum(x < k for x in flat) / len(flat))
json.dump(out, open("ranks.json", "w"))
