"""Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``): a windowed ViT whose merger turns each 2x2
group of patches into one language-model token, and multimodal RoPE (t, h, w) positions.

A *segment* (budget unit) is the image, or one temporal step of a video (2 frames). Pruning acts
on merged tokens; :meth:`Qwen2_5_VLAdapter.project` is then the identity. The tower has no [CLS],
so VisPruner's importance here is the attention each patch *receives* in the tower's last
full-attention block, averaged over the queries of its own image (or temporal step) and over heads,
then over each 2x2 merge group (the analogue of the authors' SigLIP variant, ``attentions[-1]
.mean(dim=-2)``). It is computed from a hook on that block, chunked over queries; the tower keeps
its SDPA attention.

Preprocessing is done without torchvision (HF's Qwen video processor needs it): the tokenizer and
the PIL image processor are loaded separately, and a video's frames go through the image processor
one by one and are packed two per temporal patch here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from operators.families.base import FamilyAdapter, MediaInput, RowInputs, Segments, Stream, placeholder_spans, to_frames

# Frame rate assumed for videos given as frame arrays (no timestamps reach the engine): Qwen's
# processor then spaces temporal patches by temporal_patch_size / fps = 1 s, its own default.
VIDEO_FPS = 2.0
# Query rows per chunk of attention probabilities in the VisPruner score: at most about
# SCORE_CHUNK_ELEMENTS floats [heads, rows, keys] live at once.
SCORE_CHUNK_ELEMENTS = 1 << 24


@dataclass
class QwenProcessor:
    """Qwen-VL preprocessing without torchvision: the tokenizer (with the chat template) and the
    PIL image processor, loaded separately (``AutoProcessor`` needs torchvision for video)."""

    tokenizer: object
    image_processor: object

    @property
    def chat_template(self) -> str | None:
        return getattr(self.tokenizer, "chat_template", None)

    def apply_chat_template(self, messages, **kwargs):
        return self.tokenizer.apply_chat_template(messages, **kwargs)

    def save_pretrained(self, directory) -> None:
        self.tokenizer.save_pretrained(directory)
        self.image_processor.save_pretrained(directory)

    @classmethod
    def from_pretrained(cls, directory) -> QwenProcessor:
        from transformers import AutoImageProcessor, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(directory)
        # The processor-level template (chat_template.jinja/.json) wins, as in Hugging Face's
        # AutoProcessor: it is the one that places media; a tokenizer's may be text-only.
        tokenizer.chat_template = processor_chat_template(Path(directory)) or getattr(tokenizer, "chat_template", None)
        return cls(tokenizer, AutoImageProcessor.from_pretrained(directory))


def processor_chat_template(directory: Path) -> str | None:
    """The chat template a checkpoint keeps beside its processor (chat_template.jinja or .json), if any."""
    if (directory / "chat_template.jinja").is_file():
        return (directory / "chat_template.jinja").read_text()
    if (directory / "chat_template.json").is_file():
        return json.loads((directory / "chat_template.json").read_text()).get("chat_template")
    return None


def pack_video_patches(frame_patches: list[torch.Tensor], channels: int, temporal: int, patch: int) -> torch.Tensor:
    """Per-frame image-processor patches -> video patches, ``temporal`` frames per temporal patch.

    The image processor gives each frame as [N, C * temporal * P * P] with the frame repeated over
    the temporal axis. We take one copy per frame and stack ``temporal`` consecutive frames along
    that axis, repeating the last frame to fill the last step (as HF's video processor does).
    Returns [steps, N, C * temporal * P * P].
    """
    if not frame_patches:
        raise ValueError("a video needs at least one frame")
    n = frame_patches[0].shape[0]
    if any(f.shape[0] != n for f in frame_patches):
        raise ValueError("all frames of a video must have the same size")
    frames = [f.view(n, channels, temporal, patch, patch)[:, :, 0] for f in frame_patches]  # each [N, C, P, P]
    frames += [frames[-1]] * (-len(frames) % temporal)
    stacked = torch.stack(frames).view(-1, temporal, n, channels, patch, patch)  # [steps, temporal, N, C, P, P]
    return stacked.permute(0, 2, 3, 1, 4, 5).reshape(stacked.shape[0], n, -1)


def mrope_positions(
    input_ids: torch.Tensor,
    spans: list[tuple[int, int]],
    media: list[MediaInput],
    merge: int,
    tokens_per_second: float,
) -> torch.Tensor:
    """3-axis (t, h, w) RoPE positions [S, 3] of one unpadded prompt, as HF's ``get_rope_index``.

    Text runs count on from the current position on all three axes. A media item with patch grid
    (t, h, w) gets t/h/w = start + (step * interval, row, col) over its merged grid (interval:
    tokens_per_second * seconds per temporal patch for video, 1 for images); text after it resumes
    at start + max(rows, cols).
    """
    parts, cursor, current = [], 0, 0
    for (start, end), item in zip(spans, media, strict=True):
        parts.append(torch.arange(start - cursor).view(-1, 1).expand(-1, 3) + current)
        current += start - cursor
        steps, rows, cols = item.grid[0], item.grid[1] // merge, item.grid[2] // merge
        if end - start != steps * rows * cols:
            raise ValueError(f"a media item has {end - start} placeholder tokens, its grid needs {steps * rows * cols}")
        interval = tokens_per_second * item.seconds_per_step if item.kind == "video" else 1
        t = (torch.arange(steps) * interval).long() + current
        grid = torch.meshgrid(t, torch.arange(rows) + current, torch.arange(cols) + current, indexing="ij")
        parts.append(torch.stack(grid, dim=-1).reshape(-1, 3))
        current += max(rows, cols)
        cursor = end
    parts.append(torch.arange(len(input_ids) - cursor).view(-1, 1).expand(-1, 3) + current)
    return torch.cat(parts).long()  # [S, 3]


def attention_received(
    attn: nn.Module, normed: torch.Tensor, cu_seqlens: torch.Tensor, position_embeddings, rotary
) -> torch.Tensor:
    """Mean attention each token receives from the queries of its own attention chunk, head mean.

    ``attn``: a Qwen vision attention module; normed [L, C] its input; chunks [cu_seqlens[i],
    cu_seqlens[i+1]) attend among themselves (one image or temporal step in a full-attention
    block); ``rotary``: the HF function that applies the tower's (cos, sin). Probabilities are
    built for a few query rows at a time, so no [H, n, n] map is kept. -> [L] float32.
    """
    length = normed.shape[0]
    heads = attn.num_heads
    q, k, _ = attn.qkv(normed).reshape(length, 3, heads, -1).permute(1, 0, 2, 3).unbind(0)  # [L, H, Dh] each
    q, k = rotary(q, k, *position_embeddings)
    scores = torch.zeros(length, dtype=torch.float32, device=normed.device)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        n = end - start
        keys = k[start:end].transpose(0, 1).float()  # [H, n, Dh]
        received = torch.zeros(heads, n, device=normed.device)
        rows = max(1, SCORE_CHUNK_ELEMENTS // (heads * n))
        for q_start in range(start, end, rows):
            queries = q[q_start : min(q_start + rows, end)].transpose(0, 1).float()  # [H, r, Dh]
            probs = (queries @ keys.transpose(1, 2) * attn.scaling).softmax(dim=-1)  # [H, r, n]
            received += probs.sum(dim=1)
        scores[start:end] = received.mean(dim=0) / n
    return scores


class Qwen2_5_VLAdapter(FamilyAdapter):
    """Qwen2.5-VL: merged 2x2 tokens, M-RoPE positions, windowed tower scored in a full-attention block."""

    family = "qwen2_5_vl"
    model_class = "Qwen2_5_VLForConditionalGeneration"
    image_tag, video_tag = "<|image_pad|>", "<|video_pad|>"

    def __init__(self, model: nn.Module, processor, pad_to_square: bool = False):
        super().__init__(model, processor)
        if pad_to_square:
            raise ValueError("model.pad_to_square applies to LLaVA-1.5 only")
        vision = self.config.vision_config
        self.merge = vision.spatial_merge_size
        self.temporal = vision.temporal_patch_size
        self.patch = vision.patch_size
        self.channels = vision.in_channels

    @classmethod
    def load_processor(cls, directory):
        return QwenProcessor.from_pretrained(directory)

    @property
    def placeholder_ids(self) -> set[int]:
        return {self.config.image_token_id, self.config.video_token_id}

    @property
    def tower(self) -> nn.Module:
        return self.model.model.visual

    # --- preprocessing ------------------------------------------------------------------------

    def _patches(self, images: list) -> tuple[torch.Tensor, tuple[int, int, int]]:
        out = self.processor.image_processor(images=images, return_tensors="pt")
        grid = tuple(int(v) for v in out["image_grid_thw"][0])
        return out["pixel_values"], grid  # [N, C * temporal * P * P], (1, h, w)

    def image_input(self, image) -> MediaInput:
        """One image: a single temporal step (HF repeats the image over temporal_patch_size)."""
        pixels, grid = self._patches([image])
        return MediaInput("image", pixels[None], tokens=pixels.shape[0] // self.merge**2, grid=grid)

    def video_input(self, video) -> MediaInput:
        """A video as [steps, N, C * temporal * P * P]: every frame through the image processor,
        then packed ``temporal_patch_size`` frames per step (:func:`pack_video_patches`)."""
        frames = to_frames(video)
        if not frames:
            raise ValueError(f"{self.family}: a video needs at least one frame")
        per_frame = [self._patches([frame]) for frame in frames]
        grids = {grid for _, grid in per_frame}
        if len(grids) != 1:
            raise ValueError(f"{self.family}: all frames of a video must have the same size")
        _, h, w = grids.pop()
        pixels = pack_video_patches([p for p, _ in per_frame], self.channels, self.temporal, self.patch)
        steps = pixels.shape[0]
        tokens = steps * h * w // self.merge**2
        seconds = self.temporal / VIDEO_FPS
        return MediaInput("video", pixels, tokens=tokens, grid=(steps, h, w), seconds_per_step=seconds)

    def video_items(self, prompt: str, video) -> tuple[str, list[MediaInput]]:
        """The prompt with its video tag(s) as the model expects, and the media filling them in order."""
        return prompt, [self.video_input(video)]

    def preprocess(self, prompt: str, images=(), video=None) -> RowInputs:
        images = list(images)
        # LLaVA-style tags (format_prompt_text) become Qwen's vision blocks.
        for tag, pad in (("<image>", self.image_tag), ("<video>", self.video_tag)):
            prompt = prompt.replace(tag, f"<|vision_start|>{pad}<|vision_end|>")
        if prompt.count(self.image_tag) != len(images):
            raise ValueError(
                f"{self.family}: the prompt has {prompt.count(self.image_tag)} image tag(s) for {len(images)} image(s)"
            )
        if prompt.count(self.video_tag) != (video is not None):
            raise ValueError(
                f"{self.family}: the prompt has {prompt.count(self.video_tag)} video tag(s) for "
                f"{int(video is not None)} video(s)"
            )
        items = {self.image_tag: [self.image_input(image) for image in images], self.video_tag: []}
        if video is not None:
            prompt, items[self.video_tag] = self.video_items(prompt, video)
        media, pieces = [], []
        # Expand each tag to its token count, keeping the media in prompt order.
        for piece in _split_tags(prompt, (self.image_tag, self.video_tag)):
            if piece in items:
                item = items[piece].pop(0)
                media.append(item)
                pieces.append(piece * item.tokens)
            else:
                pieces.append(piece)
        ids = self.processor.tokenizer("".join(pieces), return_tensors="pt", add_special_tokens=False)["input_ids"][0]
        spans = placeholder_spans(ids, self.placeholder_ids, media)
        tokens_per_second = getattr(self.config.vision_config, "tokens_per_second", 1)
        positions = mrope_positions(ids, spans, media, self.merge, tokens_per_second)
        return RowInputs(ids, media, positions=positions)

    # --- vision -------------------------------------------------------------------------------

    def encode_items(self, kind: str, media: list[MediaInput]) -> list[Segments]:
        """One tower pass over every item; per item its merged tokens [steps, N, D] (N = merged
        tokens per step, raster order) and their VisPruner scores [steps, N]."""
        pixels = torch.cat([m.pixel_values.reshape(-1, m.pixel_values.shape[-1]) for m in media])
        device = next(self.tower.parameters()).device
        grid_thw = torch.tensor([m.grid for m in media], device=device)
        merged, scores, deepstack = self.encode_with_scores(pixels.to(device), grid_thw)
        out, offset = [], 0
        for item in media:
            steps, h, w = item.grid
            n = (h // self.merge) * (w // self.merge)
            out.append(
                Segments(
                    patches=merged[offset : offset + steps * n].view(steps, n, -1),
                    cls_attention=scores[offset : offset + steps * n].view(steps, n),
                    cls=None,
                    grid=(h // self.merge, w // self.merge),
                    deepstack=None
                    if deepstack is None
                    else deepstack[offset : offset + steps * n].view(steps, n, *deepstack.shape[1:]),
                )
            )
            offset += steps * n
        return out

    def score_block(self) -> int:
        """The tower block whose attention ranks patches: the last full-attention one."""
        return self.config.vision_config.fullatt_block_indexes[-1]

    def window_index(self, grid_thw: torch.Tensor) -> torch.Tensor | None:
        """Merge-unit order the tower runs in (its windows), or None when it keeps raster order."""
        from transformers.vision_utils import get_vision_window_index

        vision = self.config.vision_config
        index, _ = get_vision_window_index(grid_thw, self.merge, vision.window_size, self.patch)
        return index.to(grid_thw.device)

    @staticmethod
    def rotary():
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

        return apply_rotary_pos_emb_vision

    @torch.no_grad()
    def encode_with_scores(
        self, pixels: torch.Tensor, grid_thw: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The tower over patches [P, C*T*p*p] -> (merged tokens [P/4, D], scores [P/4], DeepStack
        features [P/4, levels, D] or None), all in the merger's output (raster) order."""
        tower = self.tower
        captured: dict[str, torch.Tensor] = {}
        rotary = self.rotary()

        def score(module, args, kwargs):
            normed = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            captured["scores"] = attention_received(
                module, normed, kwargs["cu_seqlens"], kwargs["position_embeddings"], rotary
            )

        handle = tower.blocks[self.score_block()].attn.register_forward_pre_hook(score, with_kwargs=True)
        try:
            out = tower(pixels.to(tower.dtype), grid_thw=grid_thw)
        finally:
            handle.remove()
        unit = self.merge**2
        groups = captured["scores"].view(-1, unit).mean(dim=1)  # [P/4] in the tower's run order
        order = self.window_index(grid_thw)
        if order is not None:  # run position i holds merge unit order[i]: scatter back to raster
            groups = torch.empty_like(groups).index_copy_(0, order, groups)
        levels = getattr(out, "deepstack_features", None)
        deepstack = torch.stack(levels, dim=1) if levels else None  # [P/4, levels, D]
        return out.pooler_output, groups, deepstack

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return features  # the merger already produced language-model embeddings

    def assemble(self, media: MediaInput, segments: Segments, indices: torch.Tensor, tokens: torch.Tensor) -> Stream:
        """Kept merged tokens [steps, k, D] at ``indices`` [steps, k]; ``source`` says which of the
        item's unpruned tokens each is, so it keeps its M-RoPE position."""
        steps, k, dim = tokens.shape
        per_step = segments.patches.shape[1]
        offsets = torch.arange(steps, device=indices.device)[:, None] * per_step
        deepstack = None
        if segments.deepstack is not None:  # the same kept tokens at every DeepStack level
            deep = segments.deepstack  # [steps, N, levels, D]
            gather = indices[..., None, None].expand(-1, -1, *deep.shape[2:])
            deepstack = torch.gather(deep, 1, gather).reshape(steps * k, *deep.shape[2:])
        return Stream(
            tokens.reshape(-1, dim),
            torch.ones(steps * k, dtype=torch.bool),
            source=(indices + offsets).reshape(-1).cpu(),
            deepstack=deepstack,
        )

    def vision_flops(self, media: MediaInput, segments: Segments, kept_per_segment: int, rows_sharing: int) -> float:
        """Tower FLOPs, charged in shares: per segment (image or temporal step) of n patches, every
        block's projections and MLP over n; attention over n in full-attention blocks and over a
        window's patches in windowed ones (Qwen2.5-VL); the patch embedding and the 2x2 merger.
        Qwen3-VL's DeepStack mergers are left out."""
        vision = self.config.vision_config
        count, n, per_patch_in = media.pixel_values.shape  # segments, patches per segment, C*T*P*P
        c, f = vision.hidden_size, vision.intermediate_size
        ffn_matrices = 3 if hasattr(self.model.model.visual.blocks[0].mlp, "gate_proj") else 2
        full = set(getattr(vision, "fullatt_block_indexes", None) or range(vision.depth))
        window = (getattr(vision, "window_size", 0) or 0) // vision.patch_size
        window_patches = min(n, window * window) if window else n
        dense = vision.depth * (8.0 * n * c * c + 2.0 * ffn_matrices * n * c * f)
        attention = sum(4.0 * n * (n if block in full else window_patches) * c for block in range(vision.depth))
        wide = c * self.merge**2
        merger = 2.0 * (n // self.merge**2) * (wide * wide + wide * vision.out_hidden_size)
        return count * (dense + attention + 2.0 * n * per_patch_in * c + merger) / rows_sharing


def _split_tags(text: str, tags: tuple[str, ...]) -> list[str]:
    """``text`` cut into pieces where each tag is a piece of its own, in order."""
    pieces, start, i = [], 0, 0
    while i < len(text):
        tag = next((t for t in tags if text.startswith(t, i)), None)
        if tag is None:
            i += 1
            continue
        pieces += [text[start:i], tag]
        i += len(tag)
        start = i
    pieces.append(text[start:])
    return [p for p in pieces if p]
