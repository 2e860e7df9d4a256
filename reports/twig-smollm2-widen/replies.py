"""Scratch: the base's fp32 greedy replies (96 tokens) to the first 576 self-written requests of
reports/twig-smollm2-self/self_instructions.jsonl and the 64 template-built validation
instructions: bench_twig_lm's data step alone, the records in the order its training run would build.

python reports/twig-smollm2-widen/replies.py   (resumes; writes reports/twig-smollm2-widen/replies.jsonl)"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from evaluation.bench_twig_lm import load_text_lm, write_replies  # noqa: E402
from operators.cpu_linear import apply_cpu_linear  # noqa: E402
from training import instructions  # noqa: E402

torch.set_num_threads(2)
here = Path(__file__).resolve().parent
model, tok = load_text_lm(None, Path.home() / ".cache/vlm-batch/smollm2-135m-instruct")
apply_cpu_linear("onednn", model)
written = [json.loads(line) for line in (here.parent / "twig-smollm2-self/self_instructions.jsonl").open()][:576]
records = [*written, *instructions.build(64, 0)]
records = write_replies(model, tok, records, 96, 32, here / "replies.jsonl")
print(len(records), "replies")
