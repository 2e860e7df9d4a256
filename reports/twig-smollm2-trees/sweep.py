"""Scratch: greedy once and SSD under several draft settings, prompt by prompt, in one process."""

import json
import sys

import torch

sys.path.insert(0, "/work/main")
from pathlib import Path

from evaluation.bench_twig_lm import _decode, load_text_lm
from operators.cpu_linear import apply_cpu_linear
from operators.decoding.sampling import Sampler
from operators.twig import load_twig
from training.instructions import read_prompts

torch.set_num_threads(2)
twig_dir, prompts_file, limit, max_new, B = (
    sys.argv[1],
    sys.argv[2],
    int(sys.argv[3]),
    int(sys.argv[4]),
    int(sys.argv[5]),
)
settings = [(json.loads(a)[0], json.loads(a)[1], tuple(json.loads(a)[2])) for a in sys.argv[6:]]  # e.g. "[5,0.6,[]]"
model, tok = load_text_lm(None, Path.home() / ".cache/vlm-batch/smollm2-135m-instruct")
twig = load_twig(twig_dir, model)
apply_cpu_linear("onednn", model, twig)
prompts = read_prompts(Path(prompts_file))[:limit]
g = Sampler()
_decode(model, twig, tok, prompts[:1], 8, False, g, 5, 0.6)
_decode(model, twig, tok, prompts[:1], 8, True, g, 5, 0.6, (3, 1))
t = {"greedy": 0.0}
toks = {"greedy": 0}
res = {}
for k in settings:
    t[k] = 0.0
    res[k] = dict(same=0, acc=0, drafted=0, rounds=0, gen=0)
for i in range(0, len(prompts), B):
    chunk = prompts[i : i + B]
    gen, s = _decode(model, twig, tok, chunk, max_new, False, g, 5, 0.6)
    refs = [gen.tokens[r, : int(gen.lengths[r])].tolist() for r in range(len(chunk))]
    t["greedy"] += s
    toks["greedy"] += sum(map(len, refs))
    for k in settings:
        md, th, alts = k[0], k[1], tuple(k[2])
        gen, s = _decode(model, twig, tok, chunk, max_new, True, g, md, th, alts)
        outs = [gen.tokens[r, : int(gen.lengths[r])].tolist() for r in range(len(chunk))]
        t[k] += s
        r = res[k]
        r["same"] += sum(a == b for a, b in zip(outs, refs, strict=True))
        r["gen"] += sum(map(len, outs))
        r["acc"] += int(gen.stats.accepted.sum())
        r["drafted"] += int(gen.stats.drafted.sum())
        r["rounds"] += int(gen.stats.rounds.sum())
g_rate = toks["greedy"] / t["greedy"]
print(
    json.dumps(
        {
            "greedy_tok_s": round(g_rate, 2),
            "prompts": len(prompts),
            "twig": twig_dir,
            "file": prompts_file,
            "max_new": max_new,
            "batch": B,
        }
    )
)
for k in settings:
    r = res[k]
    rate = r["gen"] / t[k]
    print(
        json.dumps(
            {
                "max_draft": k[0],
                "threshold": k[1],
                "alternatives": k[2],
                "speedup": round(rate / g_rate, 3),
                "ssd_tok_s": round(rate, 2),
                "identical": r["same"] / len(prompts),
                "tokens_per_round": round(r["gen"] / r["rounds"], 3),
                "accepted_per_draft": round(r["acc"] / max(1, r["drafted"]), 3),
            }
        )
    )
