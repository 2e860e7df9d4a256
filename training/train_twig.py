"""Training a TwigVLM twig on a frozen base VLM: data, batching, the loop and the held-out agreement.

The base (vision tower, projector, embeddings, every decoder layer, norm and head) stays frozen;
only the twig (``operators.twig.Twig``, grown from base layers K+1..K+T) trains. For each batch the
base runs layers 1..K under ``no_grad`` (Hugging Face does the embedding and the media merge; a hook
stops the forward after layer K), the twig runs on that hidden state, and the loss is next-token
cross-entropy on the assistant's tokens only, averaged over tokens, with every visual token kept
(TwigVLM's recipe). Optionally (``distill`` > 0) a KL(base || twig) term on the same tokens pulls
the twig's argmax towards the base's, which is what draft acceptance needs (TwigVLM++'s PredKL).

Data are conversations: one or more (human, gpt) turns about zero or one media item (an image, or a
video fed as frames, one ``<image>`` each, as the engine does for LLaVA-1.5-style models). Sources:
the shapes world generated in memory, a shapes-world corpus written by ``jobs/make_corpus.py``, and
LLaVA-665K's conversation JSON. Prompts are the engine's (``operators.engine.format_prompt``).

Used by ``jobs/train_twig.py``; no Ray import at module level (the Ray Train worker loop imports it).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import random
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from operators.engine import format_prompt, format_prompt_text
from operators.language_model import text_model
from operators.twig import Twig, hidden_after_layer

Log = Callable[[str], None]
IGNORE = -100


# --- data ------------------------------------------------------------------------------------------


@dataclass
class Conversation:
    """(human, gpt) turns about zero or one media item; the human text carries no media tag."""

    id: str
    turns: list[tuple[str, str]]
    kind: str | None = None  # "image", "video" or None (text only)
    load_media: Callable[[], list[Image.Image]] | None = None  # the image, or the video's sampled frames
    source: str = "conversation"  # reporting group: "caption", "qa", "llava", ...


@dataclass
class Encoded:
    """One tokenised sequence: media placeholders expanded, labels on the assistant's tokens."""

    input_ids: torch.Tensor  # [S]
    labels: torch.Tensor  # [S], IGNORE except on answer tokens (and each answer's EOS)
    media: dict = field(default_factory=dict)  # processor tensors: pixel_values [n, ...], image_sizes [n, 2]
    source: str = "conversation"


def _frames_to_images(frames: np.ndarray) -> list[Image.Image]:
    return [Image.fromarray(np.ascontiguousarray(frame)) for frame in frames]


def shapes_conversations(
    seed: int,
    n_images: int,
    n_videos: int,
    frames_per_video: int,
    qa_per_item: int = 1,
    start: int = 0,
    world=None,
) -> list[Conversation]:
    """Shapes-world items ``start .. start+n-1`` of ``seed``, generated in memory: per item its caption
    (prompt ``CAPTION_PROMPT``) plus ``qa_per_item`` of its QA pairs (-1: all), single-turn each."""
    from synthetic.world import WorldConfig, iter_items, sample_frame_indices
    from training.demo_model import CAPTION_PROMPT

    world = world or WorldConfig()
    rng = random.Random(seed * 1_000_003 + start)
    out = []
    for kind, count in (("image", n_images), ("video", n_videos)):
        for item in iter_items(seed, count, kind, world, start=start):
            frames = (
                item.frames[:1]
                if kind == "image"
                else item.frames[sample_frame_indices(len(item.frames), frames_per_video)]
            )

            def load(frames=frames):
                return _frames_to_images(frames)

            qa_pairs = [(qa.question, qa.answer) for qa in item.qa]
            out += _item_conversations(
                item.item_id, kind, load, item.caption, qa_pairs, qa_per_item, rng, CAPTION_PROMPT
            )
    return out


def _item_conversations(item_id, kind, load, caption, qa_pairs, qa_per_item, rng, caption_prompt) -> list[Conversation]:
    out = []
    if caption is not None:
        out.append(Conversation(f"{item_id}/caption", [(caption_prompt[kind], caption)], kind, load, "caption"))
    chosen = qa_pairs if qa_per_item < 0 else rng.sample(qa_pairs, min(qa_per_item, len(qa_pairs)))
    for k, (question, answer) in enumerate(chosen):
        out.append(Conversation(f"{item_id}/qa{k}", [(question, answer)], kind, load, "qa"))
    return out


def corpus_conversations(
    corpus: str,
    frames_per_video: int,
    qa_per_item: int = 1,
    seed: int = 0,
    storage_options: dict | None = None,
) -> list[Conversation]:
    """A shapes-world corpus written by ``jobs/make_corpus.py`` (local dir or fsspec URI): captions.json
    and qa.json; media are read and decoded (``pipeline.media.decode``, uniform frames) when a batch
    needs them."""
    import fsspec

    from training.demo_model import CAPTION_PROMPT

    fs, root = fsspec.core.url_to_fs(corpus, **(storage_options or {}))
    root = root.rstrip("/")
    captions = json.loads(fs.cat_file(f"{root}/captions.json"))
    qa = json.loads(fs.cat_file(f"{root}/qa.json"))
    by_item = defaultdict(list)
    for record in qa:
        by_item[record["item_id"]].append((record["question"], record["answer"]))
    rng = random.Random(seed)
    out = []
    for record in captions:
        path = f"{root}/{record['file']}"

        def load(path=path):
            return decode_media(fs.cat_file(path), path, frames_per_video)

        out += _item_conversations(
            record["item_id"],
            record["kind"],
            load,
            record["caption"],
            by_item.get(record["item_id"], []),
            qa_per_item,
            rng,
            CAPTION_PROMPT,
        )
    return out


def decode_media(data: bytes, name: str, frames_per_video: int) -> list[Image.Image]:
    """An image (one frame) or a video's ``frames_per_video`` uniformly sampled frames, as the job decodes."""
    from pipeline.media import MediaOptions, decode

    return _frames_to_images(decode(data, name, MediaOptions(num_frames=frames_per_video)).frames)


def read_llava_json(
    path: str,
    image_folder: str | None = None,
    frames_per_video: int = 8,
    storage_options: dict | None = None,
) -> tuple[list[Conversation], dict]:
    """LLaVA-665K layout: ``[{"id", "image": "rel/path.jpg" (optional), "conversations": [{"from":
    "human", "value": "<image>\\nQuestion"}, {"from": "gpt", "value": "Answer"}, ...]}]``.

    Every (human, gpt) pair is a turn (loss on every gpt turn); the ``<image>`` tag is dropped from
    the text and the prompt puts it first, as LLaVA's preprocessing and the engine do. A ``video``
    key is read as a video. Records whose turns do not alternate human/gpt are skipped; returns
    (conversations, {"records", "skipped"}).
    """
    import fsspec

    with fsspec.open(path, "rb", **(storage_options or {})) as f:
        records = json.load(f)
    folder = (image_folder or str(Path(path).parent)).rstrip("/")
    fs, folder_root = fsspec.core.url_to_fs(folder, **(storage_options or {}))
    out, skipped = [], 0
    for n, record in enumerate(records):
        turns = _llava_turns(record.get("conversations", []))
        if not turns:
            skipped += 1
            continue
        kind, load = None, None
        media = record.get("image") or record.get("video")
        if isinstance(media, list):  # multi-image records are not in LLaVA-665K; not supported
            skipped += 1
            continue
        if media:
            kind = "image" if record.get("image") else "video"
            media_path = f"{folder_root}/{media}"

            def load(media_path=media_path, kind=kind):
                data = fs.cat_file(media_path)
                if kind == "image":
                    with Image.open(io.BytesIO(data)) as image:
                        return [image.convert("RGB")]
                return decode_media(data, media_path, frames_per_video)

        out.append(Conversation(str(record.get("id", n)), turns, kind, load, "llava"))
    return out, {"records": len(records), "skipped": skipped}


def _llava_turns(messages: list[dict]) -> list[tuple[str, str]]:
    roles = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt"}
    turns = []
    messages = [m for m in messages if roles.get(m.get("from")) is not None]
    if len(messages) % 2:
        messages = messages[:-1]  # a trailing question without an answer teaches nothing
    for human, gpt in zip(messages[0::2], messages[1::2], strict=True):
        if roles[human["from"]] != "human" or roles[gpt["from"]] != "gpt":
            return []
        question = human["value"].replace("<image>", "").replace("<video>", "").strip()
        turns.append((question, gpt["value"].strip()))
    return turns


def held_out(conversation: Conversation, percent: float) -> bool:
    """A deterministic split by item (the id before any '/'), so an item's captions and QA stay together."""
    key = conversation.id.split("/")[0]
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % 10_000 < percent * 100


# --- tokenisation ----------------------------------------------------------------------------------


def conversation_text(processor, conversation: Conversation, n_frames: int) -> tuple[str, list[tuple[int, int]]]:
    """Full text of a conversation and the character spans that are labels (answers and their EOS).

    The first turn's prompt is exactly the engine's ``format_prompt(processor, question, kind)``; a
    video becomes ``n_frames`` ``<image>`` tags for LLaVA-1.5-style models, as the engine's adapter
    does. Without a chat template, later turns follow LLaVA-1.5 (``... ASSISTANT: A</s>USER: Q2
    ASSISTANT: A2</s>``); with one, the template renders them and an EOS follows each answer.
    """
    eos = processor.tokenizer.eos_token
    if getattr(processor, "chat_template", None):
        return _chat_template_text(processor, conversation, n_frames, eos)
    text, spans = "", []
    for t, (question, answer) in enumerate(conversation.turns):
        if t == 0:
            prompt = (
                format_prompt_text(question, conversation.kind) if conversation.kind else f"USER: {question} ASSISTANT:"
            )
        else:
            prompt = f"USER: {question} ASSISTANT:"
        text += _expand_video(prompt, conversation.kind, n_frames)
        start = len(text)
        text += f" {answer}{eos}"
        spans.append((start, len(text)))
    return text, spans


def _expand_video(prompt: str, kind: str | None, n_frames: int) -> str:
    return prompt.replace("<video>", "<image>" * n_frames) if kind == "video" else prompt


def _chat_template_text(processor, conversation: Conversation, n_frames: int, eos: str):
    """Render turn by turn; each prompt (the engine's for turn 1) and reply is the template's text
    beyond the previous render, so the template must render turns as prefixes of each other."""
    messages, rendered, spans, previous = [], "", [], ""
    for t, (question, answer) in enumerate(conversation.turns):
        content = [{"type": "text", "text": question}]
        if t == 0 and conversation.kind:
            content.insert(0, {"type": conversation.kind})
        messages.append({"role": "user", "content": content})
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        if t == 0 and conversation.kind:
            assert prompt == format_prompt(processor, question, conversation.kind)  # the engine's prompt
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        full = processor.apply_chat_template(messages, tokenize=False)
        if not (prompt.startswith(previous) and full.startswith(prompt)):
            raise ValueError(f"{conversation.id}: the chat template does not render turns as prefixes; cannot label")
        reply = full[len(prompt) :]
        at = reply.find(answer)
        if at < 0:
            raise ValueError(f"{conversation.id}: the chat template does not render the answer verbatim")
        end = at + len(answer)
        while at > 0 and reply[at - 1].isspace():
            at -= 1
        if eos in reply[end:]:
            end = reply.index(eos, end) + len(eos)
        else:
            reply = reply[:end] + eos + reply[end:]
            end += len(eos)
        rendered += _expand_video(prompt[len(previous) :], conversation.kind, n_frames)
        spans.append((len(rendered) + at, len(rendered) + end))
        rendered += reply
        previous = full
    return rendered, spans


def encode(processor, conversation: Conversation) -> Encoded:
    """Tokenise one conversation with the processor (media placeholders expanded, pixels made)."""
    images = conversation.load_media() if conversation.load_media else []
    text, spans = conversation_text(processor, conversation, len(images))
    if conversation.kind == "video" and "<video>" in text:
        raise ValueError("video conversations need an image-based LLaVA processor (frames as <image> tags)")
    tokenizer = processor.tokenizer
    plain = tokenizer(text, return_offsets_mapping=True)
    labels = [
        token if any(lo <= start < hi for lo, hi in spans) and end > start else IGNORE
        for token, (start, end) in zip(plain["input_ids"], plain["offset_mapping"], strict=True)
    ]
    inputs = processor(text=text, images=images or None, return_tensors="pt")
    input_ids = inputs["input_ids"][0]
    image_ids = {tokenizer.convert_tokens_to_ids(t) for t in ("<image>", "<video>")} - {tokenizer.unk_token_id, None}
    is_media = torch.tensor([int(t) in image_ids for t in input_ids.tolist()], dtype=torch.bool)
    text_ids = [t for t in plain["input_ids"] if t not in image_ids]
    if input_ids[~is_media].tolist() != text_ids:
        raise ValueError(f"{conversation.id}: the processor's tokens differ from the tokenizer's; cannot label")
    full_labels = torch.full_like(input_ids, IGNORE)
    full_labels[~is_media] = torch.tensor(
        [lab for t, lab in zip(plain["input_ids"], labels, strict=True) if t not in image_ids], dtype=torch.long
    )
    media = {k: v for k, v in inputs.items() if k in ("pixel_values", "image_sizes")}
    return Encoded(input_ids, full_labels, media, conversation.source)


def collate(encoded: list[Encoded], pad_id: int) -> dict:
    """Right-padded batch: input_ids / attention_mask / labels [B, S], media tensors concatenated."""
    width = max(len(e.input_ids) for e in encoded)
    batch = len(encoded)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    labels = torch.full((batch, width), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros(batch, width, dtype=torch.long)
    for row, e in enumerate(encoded):
        n = len(e.input_ids)
        input_ids[row, :n], labels[row, :n], attention_mask[row, :n] = e.input_ids, e.labels, 1
    out = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    pixels = [e.media["pixel_values"] for e in encoded if "pixel_values" in e.media]
    if pixels:
        out["pixel_values"] = _cat_padded(pixels)
    sizes = [e.media["image_sizes"] for e in encoded if "image_sizes" in e.media]
    if sizes:
        out["image_sizes"] = torch.cat(sizes)
    return out


def _cat_padded(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate on dim 0, zero-padding dim 1 (LLaVA-NeXT's crops per image) to the longest."""
    if tensors[0].dim() == 5:
        most = max(t.shape[1] for t in tensors)
        tensors = [F.pad(t, (0, 0, 0, 0, 0, 0, 0, most - t.shape[1])) for t in tensors]
    return torch.cat(tensors)


# --- the step --------------------------------------------------------------------------------------


def model_inputs(batch: dict, device: torch.device, dtype: torch.dtype) -> dict:
    inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    return inputs


@torch.no_grad()
def base_pass(
    model: nn.Module, K: int, inputs: dict, full: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Hidden state after base layer K [B, S, D]; with ``full``, also the base logits [B, S, V] and
    its final hidden states after the final norm [B, S, D] (the whole forward runs; hooks keep
    them), else layers after K never run and both are None."""
    if not full:
        return hidden_after_layer(model, K, **inputs), None, None
    captured: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(module, args, output):
            captured[name] = output[0] if isinstance(output, tuple) else output

        return hook

    lm = text_model(model)
    handles = [lm.layers[K - 1].register_forward_hook(keep("layer")), lm.norm.register_forward_hook(keep("final"))]
    try:
        logits = model(**inputs, use_cache=False).logits
    finally:
        for handle in handles:
            handle.remove()
    return captured["layer"], logits, captured["final"]


def previous_features(final: torch.Tensor, drop: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """The base-feature input of a twig (``operators.twig.add_base_features``) for teacher forcing:
    at position s the base's final state at s - 1 (zeros at s = 0). final [B, S, D] -> [B, S, D].
    ``drop``: the fraction of positions, drawn at random, given zeros instead, as at inference where
    only the first input of a round has the base's state."""
    features = F.pad(final[:, :-1], (0, 0, 1, 0))
    if drop > 0:
        keep = torch.rand(features.shape[:2], generator=generator, device=final.device) >= drop
        features = features * keep[..., None].to(features.dtype)
    return features


def twig_logits(
    model: nn.Module,
    twig: nn.Module,
    K: int,
    batch: dict,
    device: torch.device,
    with_base: bool = False,
    feature_drop: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Twig logits at every position that predicts a label.

    -> (twig logits [N, V], targets [N], base logits [N, V] if ``with_base`` else None). ``twig`` may
    be DDP-wrapped. Right padding, so a causal mask is exact for every real token. A twig with base
    features gets them (``previous_features``, ``feature_drop`` of them zeroed; 1.0: none).
    """
    uses_features = getattr(getattr(twig, "module", twig), "base_features", False) and feature_drop < 1.0
    hidden, base_logits, final = base_pass(
        model, K, model_inputs(batch, device, next(model.parameters()).dtype), with_base or uses_features
    )
    labels = batch["labels"].to(device)
    select = labels[:, 1:] != IGNORE  # [B, S-1]: position s predicts token s+1
    positions = torch.arange(hidden.shape[1], device=device)[None].expand(hidden.shape[0], -1)
    twig_dtype = next(twig.parameters()).dtype
    features = previous_features(final, feature_drop).to(twig_dtype) if uses_features else None
    rotary = text_model(model).rotary_emb
    logits = twig(hidden.to(twig_dtype), positions, None, rotary, select=_pad_select(select), features=features)
    base = base_logits[:, :-1][select] if with_base else None
    return logits, labels[:, 1:][select], base


def _pad_select(select: torch.Tensor) -> torch.Tensor:
    return F.pad(select, (0, 1))  # [B, S]: the last position predicts nothing


# --- training --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TwigTrainConfig:
    K: int = 2
    T: int = 2
    steps: int = 300
    batch_size: int = 16
    lr: float = 1e-3
    warmup: int = 20
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 10
    distill: float = 0.0  # weight of KL(base || twig) on the answer tokens (TwigVLM++'s PredKL; TwigVLM: 0)
    feature_drop: float = 0.5  # twigs with base features: the fraction of positions trained without them


def cosine_lr(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def batches(conversations: list[Conversation], batch_size: int, seed: int) -> Iterator[list[Conversation]]:
    """Endless epochs; each epoch shuffled, batches of one media kind (similar lengths, little padding)."""
    rng = random.Random(seed)
    epoch = 0
    while True:
        groups = defaultdict(list)
        for conversation in rng.sample(conversations, len(conversations)):
            groups[conversation.kind].append(conversation)
        chunks = [g[i : i + batch_size] for g in groups.values() for i in range(0, len(g), batch_size)]
        rng.shuffle(chunks)
        yield from chunks
        epoch += 1


def _distributed() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def train_twig(
    model: nn.Module,
    processor,
    twig: nn.Module,
    conversations: list[Conversation],
    cfg: TwigTrainConfig,
    log: Log = print,
    device: torch.device | None = None,
) -> dict:
    """Train ``twig`` (maybe DDP-wrapped; each process passes its own shard) on the frozen base.

    Token-averaged loss over every process's answer tokens (the token count is all-reduced when
    torch.distributed is initialised): cross-entropy against the answers (TwigVLM), plus, with
    ``cfg.distill`` > 0, that weight times KL(base || twig) (needs the whole base forward). The
    logged and returned losses are the cross-entropy part. AdamW, cosine schedule with linear warm-up, gradient
    clipping. Returns {"steps", "seconds", "final_loss", "losses", "tokens", "answer_tokens"}.
    """
    if not conversations:
        raise ValueError("no training conversations")
    device = device or next(model.parameters()).device
    rank, world = _distributed()
    model.eval().requires_grad_(False)
    twig.train().requires_grad_(True)
    params = [p for p in twig.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    autocast = _autocast(model, device)
    stream = batches(conversations, cfg.batch_size, cfg.seed + rank)
    pad_id = processor.tokenizer.pad_token_id
    if pad_id is None:
        pad_id = processor.tokenizer.eos_token_id
    start = time.perf_counter()
    window = {"loss": 0.0, "answer": 0, "tokens": 0, "time": start}
    losses, total_tokens, total_answer = [], 0, 0
    for step in range(cfg.steps):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, cfg.steps, cfg.lr, cfg.warmup)
        batch = collate([encode(processor, c) for c in next(stream)], pad_id)
        with autocast:
            logits, targets, base_logits = twig_logits(
                model, twig, cfg.K, batch, device, with_base=cfg.distill > 0, feature_drop=cfg.feature_drop
            )
            targets, base_logits = _to_draft_vocab(getattr(twig, "module", twig), targets, base_logits)
            ce_sum = F.cross_entropy(logits.float(), targets, ignore_index=IGNORE, reduction="sum")
            loss_sum = ce_sum
            if cfg.distill > 0:
                log_p_twig, log_p_base = F.log_softmax(logits.float(), -1), F.log_softmax(base_logits.float(), -1)
                loss_sum = ce_sum + cfg.distill * F.kl_div(log_p_twig, log_p_base, log_target=True, reduction="sum")
        count = torch.tensor(float(len(targets)), device=device)
        if world > 1:
            torch.distributed.all_reduce(count)
        # DDP averages gradients over processes, so scaling by world/global_count gives the global token mean.
        loss = loss_sum * world / count.clamp(min=1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        token_loss = ce_sum.item() / max(1, len(targets))  # the cross-entropy part: comparable across runs
        losses.append(token_loss)
        window["loss"] += ce_sum.item()
        window["answer"] += len(targets)
        window["tokens"] += int(batch["attention_mask"].sum())
        total_tokens += int(batch["attention_mask"].sum())
        total_answer += len(targets)
        if (step + 1) % cfg.log_every == 0 or step == cfg.steps - 1:
            now = time.perf_counter()
            rate = window["tokens"] / max(now - window["time"], 1e-9)
            eta = (now - start) / (step + 1) * (cfg.steps - step - 1)
            log(
                f"step {step + 1}/{cfg.steps} loss {window['loss'] / max(1, window['answer']):.4f} "
                f"lr {optimizer.param_groups[0]['lr']:.2e} {rate:.0f} tokens/s "
                f"elapsed {now - start:.0f}s eta {eta:.0f}s"
            )
            window = {"loss": 0.0, "answer": 0, "tokens": 0, "time": now}
    twig.eval()
    tail = losses[-max(1, min(len(losses), cfg.log_every)) :]
    return {
        "steps": cfg.steps,
        "seconds": round(time.perf_counter() - start, 1),
        "final_loss": round(float(np.mean(tail)), 4),
        "first_loss": round(losses[0], 4),
        "losses": [round(v, 4) for v in losses],
        "tokens": total_tokens,
        "answer_tokens": total_answer,
    }


def _to_draft_vocab(
    twig: Twig, targets: torch.Tensor, base_logits: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Targets [N] and base logits [N, V] in the twig's head coordinates. With a draft vocabulary,
    a target outside it is ignored (the twig cannot draft it) and the base's distribution is taken
    over the vocabulary's tokens (renormalised by the log-softmax): what the twig can match."""
    if twig.draft_vocab is None:
        return targets, base_logits
    index = twig.draft_index(targets)
    index = index.masked_fill(index < 0, IGNORE)
    return index, None if base_logits is None else base_logits[:, twig.draft_vocab]


def _autocast(model: nn.Module, device: torch.device):
    """Half-precision autocast when the base runs in half precision (the twig keeps fp32 weights):
    bf16/fp16 on CUDA; bf16 on CPUs too, where bf16 matmuls are about twice as fast (avx512_bf16)."""
    dtype = next(model.parameters()).dtype
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        return torch.autocast("cuda", dtype=dtype)
    if device.type == "cpu" and dtype == torch.bfloat16:
        return torch.autocast("cpu", dtype=dtype)
    return torch.autocast(device.type, enabled=False)


# --- held-out agreement ----------------------------------------------------------------------------


@torch.no_grad()
def agreement(
    model: nn.Module,
    processor,
    twig: Twig,
    encoded: list[Encoded],
    K: int,
    batch_size: int = 16,
    feature_drop: float = 0.0,
) -> dict:
    """How often the twig's argmax equals the base's on answer tokens (teacher-forced): the expected
    per-token draft acceptance. Also each one's accuracy against the labels. Per source and "all".
    A twig with base features gets them at every position (a round's first draft), or with
    ``feature_drop`` 1.0 at none (its later drafts)."""
    device = next(model.parameters()).device
    pad_id = processor.tokenizer.pad_token_id
    pad_id = processor.tokenizer.eos_token_id if pad_id is None else pad_id
    counts = defaultdict(lambda: np.zeros(4, dtype=np.int64))  # tokens, agree, twig correct, base correct
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        batch = collate(chunk, pad_id)
        twig_logit, target, base_logit = twig_logits(
            model, twig, K, batch, device, with_base=True, feature_drop=feature_drop
        )
        twig_pred, base_pred = twig.full_ids(twig_logit.argmax(-1)), base_logit.argmax(-1)
        select = batch["labels"][:, 1:].to(device) != IGNORE
        row_of = torch.arange(len(chunk), device=device)[:, None].expand_as(select)[select]
        for row, e in enumerate(chunk):
            mine = row_of == row
            stats = np.array(
                [
                    int(mine.sum()),
                    int((twig_pred[mine] == base_pred[mine]).sum()),
                    int((twig_pred[mine] == target[mine]).sum()),
                    int((base_pred[mine] == target[mine]).sum()),
                ]
            )
            counts[e.source] += stats
            counts["all"] += stats
    return {
        source: {
            "tokens": int(c[0]),
            "twig_base_agreement": round(float(c[1]) / max(1, int(c[0])), 4),
            "twig_accuracy": round(float(c[2]) / max(1, int(c[0])), 4),
            "base_accuracy": round(float(c[3]) / max(1, int(c[0])), 4),
        }
        for source, c in sorted(counts.items())
    }


@torch.no_grad()
def base_greedy_references(
    model: nn.Module, processor, conversations: list[Conversation], max_new_tokens: int
) -> list[Encoded]:
    """The base's own greedy replies to each conversation's first question, as labelled sequences.

    Speculative decoding drafts along the base's greedy path, so agreement on these sequences is a
    closer estimate of acceptance than agreement on the reference answers. One row at a time.
    """
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    eos_id = processor.tokenizer.eos_token_id
    out = []
    for conversation in conversations:
        images = conversation.load_media() if conversation.load_media else []
        first = Conversation(conversation.id, conversation.turns[:1], conversation.kind, None, conversation.source)
        text, spans = conversation_text(processor, first, len(images))
        inputs = processor(text=text[: spans[0][0]], images=images or None, return_tensors="pt")
        prompt_ids = inputs["input_ids"][0]
        generated = model.generate(
            **model_inputs(dict(inputs), device, dtype), max_new_tokens=max_new_tokens, do_sample=False
        )[0, len(prompt_ids) :].cpu()
        stop = (generated == eos_id).nonzero()
        if len(stop):
            generated = generated[: int(stop[0]) + 1]
        ids = torch.cat([prompt_ids, generated])
        labels = torch.cat([torch.full_like(prompt_ids, IGNORE), generated])
        media = {k: v for k, v in inputs.items() if k in ("pixel_values", "image_sizes")}
        out.append(Encoded(ids, labels, media, conversation.source))
    return out


# --- the whole job (one process, or one Ray Train worker) -----------------------------------------


def frames_per_video_of(model_path: str, default: int = 8) -> int:
    """``model.frames_per_video`` from a local checkpoint's training_report.json (the demo's is 4)."""
    report = Path(str(model_path)) / "training_report.json"
    if report.exists():
        return int(json.loads(report.read_text()).get("model", {}).get("frames_per_video", default))
    return default


def load_conversations(options: dict) -> tuple[list[Conversation], list[Conversation], dict]:
    """(train, held-out, data summary) from the job options (see jobs/train_twig.py)."""
    frames = options["frames_per_video"]
    qa_per_item = options["qa_per_item"]
    if options.get("llava_json"):
        conversations, info = read_llava_json(options["llava_json"], options.get("image_folder"), frames)
        source = {"llava_json": options["llava_json"], "image_folder": options.get("image_folder"), **info}
    elif options.get("corpus"):
        conversations = corpus_conversations(options["corpus"], frames, qa_per_item, options["seed"])
        source = {"corpus": options["corpus"]}
    else:
        n_images, n_videos = options["images"], options["videos"]
        train = shapes_conversations(options["seed"], n_images, n_videos, frames, qa_per_item)
        heldout = shapes_conversations(options["seed"], options["eval_images"], 0, frames, -1, start=n_images)
        videos = shapes_conversations(options["seed"], 0, options["eval_videos"], frames, -1, start=n_videos)
        source = {
            "generated": {"seed": options["seed"], "images": n_images, "videos": n_videos},
            "held_out": "items of the same seed after the training ones, every QA pair",
        }
        return train, heldout + videos, _summary(source, train, heldout + videos)
    percent = options["eval_percent"]
    train = [c for c in conversations if not held_out(c, percent)]
    heldout = [c for c in conversations if held_out(c, percent)]
    source["held_out"] = f"{percent}% of items by id hash"
    return train, heldout, _summary(source, train, heldout)


def _summary(source: dict, train: list[Conversation], heldout: list[Conversation]) -> dict:
    def count(items):
        out = defaultdict(int)
        for c in items:
            out[c.source] += 1
        return dict(sorted(out.items()))

    return {**source, "train_conversations": count(train), "held_out_conversations": count(heldout)}


def run_job(
    options: dict,
    log: Log = print,
    device: torch.device | None = None,
    prepare: Callable[[nn.Module], nn.Module] | None = None,
) -> dict | None:
    """Load the base, grow the twig, train it on this process's shard, and (rank 0) evaluate the
    held-out agreement before and after and save the twig. Returns the report on rank 0, else None."""
    from operators.loading import load_vlm
    from operators.twig import grow_twig, save_twig

    torch.manual_seed(options["seed"])
    rank, world = _distributed()
    device = device or torch.device(options.get("device") or "cpu")
    model, processor = load_vlm(options["model"], dtype=options.get("dtype", "auto"), device=device)
    if options.get("pad_to_square"):
        processor.image_processor.do_pad = True  # as the engine's model.pad_to_square does
    base_dtype = next(model.parameters()).dtype
    n_base = len(text_model(model).layers)
    K = options["K"]
    T = options["T"] if options.get("T") else max(1, min(3, n_base - K - 1))  # K + T < L: a real shortcut
    cfg = TwigTrainConfig(
        K=K,
        T=T,
        steps=options["steps"],
        batch_size=options["batch_size"],
        lr=options["lr"],
        warmup=options["warmup"],
        seed=options["seed"],
        log_every=options["log_every"],
        distill=options.get("distill", 0.0),
        feature_drop=options.get("feature_drop", TwigTrainConfig.feature_drop),
    )
    train, heldout, data = load_conversations(options)
    heldout = heldout[: options["eval_max"]]
    twig = grow_twig(model, K, T).float()
    report: dict = {}
    if options.get("draft_vocab"):
        # Before sharding and before training: every worker trains the same restricted head.
        from operators.twig import restrict_vocab
        from training.draft_vocab import draft_vocab_from_replies

        vocab, report["draft_vocab"] = draft_vocab_from_replies(model, processor, train, options["draft_vocab"])
        restrict_vocab(twig, vocab)
        log(f"draft vocabulary: {len(vocab)} tokens, {report['draft_vocab']['coverage']:.4f} of the base's outputs")
    if options.get("base_features"):
        from operators.twig import add_base_features

        add_base_features(twig)  # zero-initialised: held_out_before is the plain twig's
    train = train[rank::world]
    if rank == 0:
        log(f"base: {n_base} layers; twig K={K} T={T}; {len(train)} training conversations on rank 0 of {world}")
        evaluated = [encode(processor, c) for c in heldout]
        captions = [c for c in heldout if c.source == "caption"][: options["eval_generated"]]
        generated = base_greedy_references(model, processor, captions, options["max_new_tokens"]) if captions else []
        report["held_out_before"] = agreement(model, processor, twig, evaluated, K)
        if generated:
            report["base_greedy_before"] = agreement(model, processor, twig, generated, K)
        log(f"held-out twig/base agreement at init: {report['held_out_before']['all']['twig_base_agreement']:.4f}")
    trainable = prepare(twig) if prepare else twig.to(device)
    stats = train_twig(model, processor, trainable, train, cfg, log, device)
    if rank != 0:
        return None
    twig = getattr(trainable, "module", trainable)
    report["held_out"] = agreement(model, processor, twig, evaluated, K)
    if generated:
        report["base_greedy"] = agreement(model, processor, twig, generated, K)
    log(f"held-out twig/base agreement after training: {report['held_out']['all']['twig_base_agreement']:.4f}")
    report.update(
        {
            "config": asdict(cfg),
            "data": data,
            "world_size": world,
            "train": stats,
            "twig_parameters": sum(p.numel() for p in twig.parameters()),
            "base_model": str(options["model"]),
        }
    )
    trained = {
        "command": options.get("command"),
        "steps": stats["steps"],
        "final_loss": stats["final_loss"],
        "held_out_agreement": report["held_out"]["all"]["twig_base_agreement"],
        "data": data,
    }
    if "draft_vocab" in report:
        trained["draft_vocab_coverage"] = report["draft_vocab"]["coverage"]
    save_twig(twig.to(base_dtype), options["out"], model, trained=trained)
    return report


def ray_worker_loop(options: dict) -> None:
    """Ray Train worker (``TorchTrainer``): the same job on this worker's shard, the twig under DDP."""
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    rank = context.get_world_rank()

    def log(message: str) -> None:
        if rank == 0:
            print(f"[train_twig] {message}", flush=True)

    torch.set_num_threads(options.get("threads") or 1)
    report = run_job(options, log, ray.train.torch.get_device(), ray.train.torch.prepare_model)
    if report is not None:  # rank 0: the report goes beside the twig (reachable by the driver, as the twig must be)
        write_text(f"{options['out'].rstrip('/')}/{REPORT_NAME}", json.dumps(report, indent=2) + "\n")
    ray.train.report({"rank": rank})


REPORT_NAME = "training_report.json"


def write_text(path: str, text: str) -> None:
    """Write a small text file to a local path (temp name + rename) or an fsspec URI (one PUT)."""
    from operators.loading import is_remote

    if is_remote(path):
        import fsspec

        with fsspec.open(path, "w") as f:
            f.write(text)
        return
    target = Path(path.removeprefix("file://"))
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial")
    partial.write_text(text)
    partial.replace(target)


def read_text(path: str) -> str:
    import fsspec

    with fsspec.open(path, "r") as f:
        return f.read()
