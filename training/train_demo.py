"""Training the demo VLM on the shapes world, in two stages, on a CPU.

Stage 1: contrastive image-caption pretraining (CLIP's symmetric InfoNCE) of a small ViT with a
[CLS] token against a small causal text transformer, so the tower's features, and its [CLS]
attention, are about the objects captions mention. Contrastive learning alone leaves the objects'
shapes out of the patch features (a linear probe reads shape near chance, colour at 0.99:
jobs/probe_tower.py). Stage 1 can add a region loss, as region-level pretraining does: each
object's layer -2 patch features (the ones the projector reads), averaged with weights equal to
the object's pixels in each patch, must name its shape through a linear head (ground truth from
the generator); the tower first learns it alone for a few cheap steps, then beside the contrastive
loss. It is off by default: it lifts the shape probe from 0.33/0.47 to 0.84/0.98 (small/large),
but the language model trained on that tower answered no better (BENCHMARKS.md, demo model), so
the committed model is trained without it. What did not work for the region loss itself: asking
every patch for the shape of the object covering it (held-out 0.39 after 150 steps, chance 0.25:
most patches see an uninformative fragment), and adding a colour head to it (shape stayed on its
plateau through the warm-up: loss 1.15 after 200 steps, against 0.37 without).

Stage 2: LLaVA-style training of the projector and a small Llama from scratch on captions and
QA pairs, next-token loss on the answer tokens only, with the tower frozen (as LLaVA does). Because
the tower is frozen, its layer -2 patch features are computed once and cached, which is what makes
this fit a 2-core CPU. Videos are fed as ``frames_per_video`` uniformly sampled frames, one
``<image>`` each. Optionally (``stage2_pack``) a batch is whole items, each packed into one row
(``pack_items``): the image tokens once, then every caption and QA pair of the item as a branch that
sees only them and itself. That is the loss of separate sequences at a fraction of the tokens (image
tokens are 64 of a QA sequence's ~80): 2.3x (images) to 5.3x (videos) the answer tokens per second.
It is off by default: with 1300 packed steps in the same budget the model answered a little better
(held-out images 0.504 against 0.473) but the gap to blank media did not grow, so it did not replace
the committed model (BENCHMARKS.md, demo model).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPTextModel, CLIPVisionModel, LlavaForConditionalGeneration

from operators.engine import format_prompt_text
from operators.vision import encode_with_cls_attention
from synthetic.world import SHAPES, Item, WorldConfig, make_item, object_index_map, sample_frame_indices
from training.demo_model import CAPTION_PROMPT, DemoModelConfig, build_llava, clip_text_config, vision_config

Log = Callable[[str], None]


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    stage1_images: int = 8000
    stage1_steps: int = 300
    stage1_batch: int = 128
    stage1_lr: float = 2e-3
    # The region loss (off by default) learns shapes slowly beside the contrastive one (its gradient is
    # the smaller and both are clipped together), so the tower first learns it alone for a few steps.
    # Tried: 200 steps, then weight 2.0 (BENCHMARKS.md, demo model).
    stage1_region_steps: int = 0  # region loss only (no text tower: about 0.5 s a step)
    stage1_region_loss: float = 0.0  # its weight beside the contrastive loss in the stage1_steps after
    stage2_images: int = 12000
    stage2_videos: int = 3000
    stage2_steps: int = 1000
    stage2_image_batch: int = 48  # examples (separate sequences) per image step
    stage2_video_batch: int = 12
    # Packed (off by default; tried in BENCHMARKS.md, demo model): a step takes whole items, each one
    # row whose examples share its image tokens (pack_items), so the batch sizes count items.
    stage2_pack: bool = False
    stage2_image_items: int = 12
    stage2_video_items: int = 3
    stage2_lr: float = 1.5e-3
    video_share: float = 0.35  # share of stage-2 steps that are video batches
    caption_share: float = 0.3  # per QA pair, the chance of one more copy of the item's caption
    warmup: int = 40
    log_every: int = 25


def pixel_tensor(frames: np.ndarray, image_processor) -> torch.Tensor:
    """uint8 [N, H, W, 3] frames already at the model's size -> normalised [N, 3, H, W].

    Equal to what the checkpoint's image processor produces for such frames (resize and crop are
    no-ops at the native size; tested), without a PIL round trip per frame.
    """
    mean = torch.tensor(image_processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(image_processor.image_std).view(1, 3, 1, 1)
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() * image_processor.rescale_factor
    return (x - mean) / std


def cosine_lr(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


# --- stage 1 -------------------------------------------------------------------------------------


class ContrastivePair(nn.Module):
    """Vision tower + text tower + projections + temperature (CLIP's loss), and the heads of the region loss."""

    def __init__(self, vision: CLIPVisionModel, text: CLIPTextModel, dim: int):
        super().__init__()
        self.vision = vision
        self.text = text
        self.visual_projection = nn.Linear(vision.config.hidden_size, dim, bias=False)
        self.text_projection = nn.Linear(text.config.hidden_size, dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.shape_head = nn.Linear(vision.config.hidden_size, len(SHAPES))

    def forward(self, pixels: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(contrastive loss, [B, P, C] layer -2 patch features for region_loss())."""
        out = self.vision(pixel_values=pixels, output_hidden_states=True)  # hidden_states[-2]: patch_features()
        image = self.visual_projection(out.pooler_output)
        hidden = self.text(input_ids=ids, attention_mask=mask).last_hidden_state
        last = mask.sum(dim=1) - 1  # each caption ends with </s>: pool there
        text = self.text_projection(hidden[torch.arange(len(ids)), last])
        image, text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
        logits = self.logit_scale.exp().clamp(max=100) * image @ text.T
        target = torch.arange(len(ids))
        contrastive = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        return contrastive, out.hidden_states[-2][:, 1:]

    def patch_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, P, C] layer -2 patch features: what LLaVA's vision_feature_layer=-2 reads."""
        return self.vision(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]

    def region_loss(self, patches: torch.Tensor, regions: torch.Tensor, shapes: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of each object's shape from its pooled patch features (object_regions(), batched)."""
        pooled = regions @ patches  # [B, objects, C]
        return F.cross_entropy(self.shape_head(pooled).flatten(0, 1), shapes.flatten(), ignore_index=-100)


def object_regions(item: Item, patch: int, max_objects: int) -> tuple[np.ndarray, np.ndarray]:
    """Where each object of frame 0 is, in patches, and what shape it is.

    Returns float32 [max_objects, patches]: the share of the object's pixels in each patch (rows sum
    to 1; patches row-major, as the tower's), and int64 [max_objects]: shape ids, -100 for padding rows.
    """
    index = object_index_map(item.scene, 0)
    side = index.shape[0] // patch
    blocks = index.reshape(side, patch, side, patch).transpose(0, 2, 1, 3).reshape(side * side, -1)
    regions = np.zeros((max_objects, side * side), np.float32)
    shapes = np.full(max_objects, -100, np.int64)
    for i, obj in enumerate(item.scene["objects"]):
        pixels = (blocks == i + 1).sum(1)
        if pixels.sum():  # a video's late object is not in frame 0: leave it a padding row
            regions[i] = pixels / pixels.sum()
            shapes[i] = SHAPES.index(obj["shape"])
    return regions, shapes


def encode_captions(tokenizer, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    batch = tokenizer([c + " </s>" for c in captions], padding=True, return_tensors="pt")
    return batch["input_ids"], batch["attention_mask"]


def train_stage1(
    tokenizer, image_processor, world: WorldConfig, model_cfg: DemoModelConfig, cfg: TrainConfig, log: Log
) -> CLIPVisionModel:
    torch.manual_seed(cfg.seed)
    log(f"stage 1: rendering {cfg.stage1_images} images")
    items = [make_item(cfg.seed, i, "image", world) for i in range(cfg.stage1_images)]
    pixels = pixel_tensor(np.stack([it.frames[0] for it in items]), image_processor)
    ids, mask = encode_captions(tokenizer, [it.caption for it in items])
    use_regions = bool(cfg.stage1_region_steps or cfg.stage1_region_loss)
    if use_regions:
        found = [object_regions(it, model_cfg.patch_size, world.max_objects) for it in items]
        regions, shapes = (torch.from_numpy(np.stack(parts)) for parts in zip(*found, strict=True))
    vision = CLIPVisionModel(vision_config(world, model_cfg))
    text = CLIPTextModel(clip_text_config(tokenizer, model_cfg))
    pair = ContrastivePair(vision, text, model_cfg.vision_width).train()
    optimizer = torch.optim.AdamW(pair.parameters(), lr=cfg.stage1_lr, weight_decay=0.05)
    generator = torch.Generator().manual_seed(cfg.seed)
    start = time.perf_counter()
    region_params = [*vision.parameters(), *pair.shape_head.parameters()]
    warm = torch.optim.AdamW(region_params, lr=cfg.stage1_lr, weight_decay=0.05) if use_regions else None
    for step in range(cfg.stage1_region_steps):
        set_lr(warm, cosine_lr(step, cfg.stage1_region_steps, cfg.stage1_lr, cfg.warmup))
        batch = torch.randperm(len(items), generator=generator)[: cfg.stage1_batch]
        region = pair.region_loss(pair.patch_features(pixels[batch]), regions[batch], shapes[batch])
        warm.zero_grad(set_to_none=True)
        region.backward()
        torch.nn.utils.clip_grad_norm_(region_params, 1.0)
        warm.step()
        if step % cfg.log_every == 0 or step == cfg.stage1_region_steps - 1:
            log(
                f"stage 1 regions step {step:4d}/{cfg.stage1_region_steps} region loss {region.item():.3f} "
                f"({time.perf_counter() - start:.0f}s)"
            )
    for step in range(cfg.stage1_steps):
        set_lr(optimizer, cosine_lr(step, cfg.stage1_steps, cfg.stage1_lr, cfg.warmup))
        batch = torch.randperm(len(items), generator=generator)[: cfg.stage1_batch]
        width = int(mask[batch].sum(dim=1).max())
        contrastive, patches = pair(pixels[batch], ids[batch, :width], mask[batch, :width])
        loss, note = contrastive, ""
        if cfg.stage1_region_loss:
            region = pair.region_loss(patches, regions[batch], shapes[batch])
            loss, note = loss + cfg.stage1_region_loss * region, f"region loss {region.item():.3f} "
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(pair.parameters(), 1.0)
        optimizer.step()
        if step % cfg.log_every == 0 or step == cfg.stage1_steps - 1:
            log(
                f"stage 1 step {step:4d}/{cfg.stage1_steps} contrastive {contrastive.item():.3f} "
                f"{note}({time.perf_counter() - start:.0f}s)"
            )
    return vision.eval()


# --- stage 2 -------------------------------------------------------------------------------------


@dataclass
class Example:
    frames: list[int]  # rows of the feature cache, one per frame (one for images)
    kind: str
    prompt: str
    answer: str


def examples_for(item: Item, rows: list[int], rng: random.Random, caption_share: float) -> list[Example]:
    """Every QA pair of the item, plus its caption with probability ``caption_share`` per QA."""

    def prompt(text: str) -> str:
        # what the engine's adapter builds at inference: a video's tag becomes one <image> per frame
        return format_prompt_text(text, item.kind).replace("<video>", "<image>" * len(rows))

    out = [Example(rows, item.kind, prompt(qa.question), qa.answer) for qa in item.qa]
    captions = max(1, sum(rng.random() < caption_share for _ in item.qa))
    out += [Example(rows, item.kind, prompt(CAPTION_PROMPT[item.kind]), item.caption) for _ in range(captions)]
    return out


def sampled_frames(item: Item, count: int) -> np.ndarray:
    if item.kind == "image":
        return item.frames[:1]
    return item.frames[sample_frame_indices(len(item.frames), count)]


@torch.no_grad()
def cache_features(vision: CLIPVisionModel, frames: np.ndarray, image_processor, batch: int = 512) -> torch.Tensor:
    """Layer -2 patch features (CLS dropped) of every frame: [N, patches, C] in bfloat16."""
    out = []
    for start in range(0, len(frames), batch):
        pixels = pixel_tensor(frames[start : start + batch], image_processor)
        out.append(encode_with_cls_attention(vision, pixels, -2).features[:, 1:].to(torch.bfloat16))
    return torch.cat(out)


def tokenize_example(tokenizer, ex: Example, tokens_per_frame: int) -> tuple[list[int], list[int]]:
    """Token ids (image placeholders expanded) and labels (answer + </s> only) of one example."""
    prompt = ex.prompt.replace("<image>", "<image>" * tokens_per_frame)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(" " + ex.answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt_ids + answer_ids, [-100] * len(prompt_ids) + answer_ids


def _right_pad(rows: list[list[int]], value: int) -> torch.Tensor:
    out = torch.full((len(rows), max(map(len, rows))), value)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row)
    return out


def build_sequences(tokenizer, examples: list[Example], image_token_id: int, tokens_per_frame: int):
    """Token ids, labels and masks of the examples as separate sequences, right-padded (what
    ``pack_items`` must be equivalent to; the prompt tokens match the inference processor's)."""
    seqs, labels = zip(*(tokenize_example(tokenizer, ex, tokens_per_frame) for ex in examples), strict=True)
    ids = _right_pad(seqs, tokenizer.pad_token_id)
    assert bool((ids == image_token_id).any()), "no image placeholders in a training batch"
    return ids, _right_pad(labels, -100), _right_pad([[1] * len(s) for s in seqs], 0)


def _shared_prefix(seqs: list[list[int]], labels: list[list[int]]) -> int:
    """Length of the tokens every sequence starts with, stopping before any sequence's last prompt token
    (each branch must hold the token that predicts its first answer token)."""
    n = 0
    while all(n < len(s) and s[n] == seqs[0][n] for s in seqs):
        n += 1
    first_answer = min(next(i for i, t in enumerate(lab) if t != -100) for lab in labels)
    return min(n, first_answer - 1)


def pack_items(tokenizer, groups: list[list[Example]], image_token_id: int, tokens_per_frame: int):
    """One row per item: the shared prefix (``USER:`` and the image tokens) once, then every example's
    remainder as a branch that attends only to the prefix and to itself, with the positions it would
    have alone. The loss over a packed batch therefore equals the loss over the same examples as
    separate sequences (tests/test_demo_training.py), while the image tokens, most of a QA sequence,
    are computed once per item instead of once per example.

    Returns ids, labels, position ids [B, L] and a boolean attention mask [B, 1, L, L] (True = attend).
    """
    row_ids, row_labels, row_positions, row_segments = [], [], [], []
    for group in groups:
        seqs, labels = zip(*(tokenize_example(tokenizer, ex, tokens_per_frame) for ex in group), strict=True)
        p = _shared_prefix(list(seqs), list(labels))
        ids, lab, pos, seg = list(seqs[0][:p]), list(labels[0][:p]), list(range(p)), [0] * p
        for branch, (s, lb) in enumerate(zip(seqs, labels, strict=True), start=1):
            assert image_token_id not in s[p:], "image placeholders outside the shared prefix"
            ids += s[p:]
            lab += lb[p:]
            pos += range(p, len(s))
            seg += [branch] * (len(s) - p)
        row_ids.append(ids)
        row_labels.append(lab)
        row_positions.append(pos)
        row_segments.append(seg)
    ids, target = _right_pad(row_ids, tokenizer.pad_token_id), _right_pad(row_labels, -100)
    positions = _right_pad(row_positions, 0)
    segment = _right_pad(row_segments, -1)  # 0 prefix, k branch k, -1 padding
    width = ids.shape[1]
    q, k = segment[:, :, None], segment[:, None, :]  # [B, L, 1], [B, 1, L]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    mask = causal & (k >= 0) & ((k == 0) | (k == q))
    mask |= torch.eye(width, dtype=torch.bool)  # padding rows attend to themselves (no empty softmax)
    assert bool((ids == image_token_id).any()), "no image placeholders in a training batch"
    return ids, target, positions, mask[:, None]


def lm_loss(
    llava: LlavaForConditionalGeneration, ids, target, mask, features: torch.Tensor, positions=None
) -> torch.Tensor:
    """Next-token loss with projected cached features spliced over the placeholders. ``mask`` is a
    [B, L] padding mask or a [B, 1, L, L] attention mask (with ``positions``, for packed rows)."""
    embeds = llava.model.language_model.embed_tokens(ids)
    projected = llava.model.multi_modal_projector(features.float())  # [frames, patches, D]
    placeholder = ids == llava.config.image_token_id
    embeds = embeds.masked_scatter(placeholder[..., None], projected.reshape(-1, projected.shape[-1]))
    hidden = llava.model.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions)
    logits = llava.lm_head(hidden.last_hidden_state[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target[:, 1:].reshape(-1), ignore_index=-100)


def train_stage2(
    tokenizer,
    image_processor,
    vision: CLIPVisionModel,
    world: WorldConfig,
    model_cfg: DemoModelConfig,
    cfg: TrainConfig,
    log: Log,
) -> LlavaForConditionalGeneration:
    torch.manual_seed(cfg.seed + 1)
    rng = random.Random(cfg.seed + 1)
    log(f"stage 2: rendering {cfg.stage2_images} images and {cfg.stage2_videos} videos")
    frames, pools = [], {"image": [], "video": []}
    for kind, count in (("image", cfg.stage2_images), ("video", cfg.stage2_videos)):
        for i in range(count):
            # Stage 2 uses items stage 1 never saw (indices offset past stage 1's).
            item = make_item(cfg.seed, cfg.stage1_images + i, kind, world)
            picked = sampled_frames(item, model_cfg.frames_per_video)
            rows = list(range(len(frames), len(frames) + len(picked)))
            frames.extend(picked)
            pools[kind].append(examples_for(item, rows, rng, cfg.caption_share))
    if not cfg.stage2_pack:  # sample examples, not items
        pools = {kind: [ex for group in groups for ex in group] for kind, groups in pools.items()}
    log(f"stage 2: caching layer -2 features of {len(frames)} frames")
    t0 = time.perf_counter()
    features = cache_features(vision, np.stack(frames), image_processor)
    log(
        f"stage 2: cached {tuple(features.shape)} in {time.perf_counter() - t0:.0f}s; "
        f"{len(pools['image'])} image and {len(pools['video'])} video {'items' if cfg.stage2_pack else 'examples'}"
    )

    llava = build_llava(tokenizer, world, model_cfg)
    llava.model.vision_tower.load_state_dict(vision.state_dict())
    llava.model.vision_tower.requires_grad_(False)
    trainable = [p for n, p in llava.named_parameters() if not n.startswith("model.vision_tower")]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.stage2_lr, weight_decay=0.0)
    llava.train()
    tokens_per_frame = (world.image_size // model_cfg.patch_size) ** 2
    start, running = time.perf_counter(), []
    for step in range(cfg.stage2_steps):
        set_lr(optimizer, cosine_lr(step, cfg.stage2_steps, cfg.stage2_lr, cfg.warmup))
        kind = "video" if rng.random() < cfg.video_share else "image"
        if cfg.stage2_pack:
            groups = rng.sample(pools[kind], cfg.stage2_video_items if kind == "video" else cfg.stage2_image_items)
            ids, target, positions, mask = pack_items(tokenizer, groups, llava.config.image_token_id, tokens_per_frame)
            rows = torch.tensor([r for group in groups for r in group[0].frames])
        else:
            batch = rng.sample(pools[kind], cfg.stage2_video_batch if kind == "video" else cfg.stage2_image_batch)
            ids, target, mask = build_sequences(tokenizer, batch, llava.config.image_token_id, tokens_per_frame)
            positions, rows = None, torch.tensor([r for ex in batch for r in ex.frames])
        loss = lm_loss(llava, ids, target, mask, features[rows], positions)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        running.append(loss.item())
        if step % cfg.log_every == 0 or step == cfg.stage2_steps - 1:
            log(
                f"stage 2 step {step:4d}/{cfg.stage2_steps} loss {np.mean(running):.3f} "
                f"({time.perf_counter() - start:.0f}s)"
            )
            running = []
    return llava.eval()
