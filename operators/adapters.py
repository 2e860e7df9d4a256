"""Per-family glue between Hugging Face LLaVA models and the pruning engine.

An adapter turns a request into token ids plus media tensors, runs the vision tower(s) to get
per-segment patch features and [CLS] attention, and lays pruned, projected tokens back out in
the order the model was trained on. A *segment* is the unit a budget applies to: the image for
LLaVA-1.5, each crop for LLaVA-NeXT, each frame for video.

Tokens that are visual but never pruned (LLaVA-NeXT's row-end ``image_newline`` and
Video-LLaVA's per-frame [CLS]) are kept and not counted against the budget.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from torch import nn

from operators.vision import encode_with_cls_attention

FAMILIES = ("llava", "llava_next", "video_llava")


@dataclass
class MediaInput:
    kind: str  # "image" or "video"
    pixel_values: torch.Tensor  # [segments, 3, H, W]
    image_size: tuple[int, int] | None = None  # original (H, W), LLaVA-NeXT only
    tokens: int | None = None  # placeholder tokens it fills unpruned; None: its whole placeholder run


@dataclass
class RowInputs:
    input_ids: torch.Tensor  # [S] prompt ids with placeholder runs, one run per media item
    media: list[MediaInput] = field(default_factory=list)


@dataclass
class Segments:
    """Vision-tower output for one media item."""

    patches: torch.Tensor  # [segments, N, C] pre-projector patch features
    cls_attention: torch.Tensor  # [segments, N] head-mean [CLS] -> patch attention
    cls: torch.Tensor | None  # [segments, C] [CLS] features when the model feeds them to the LLM
    grid: tuple[int, int]


@dataclass
class Stream:
    """Projected visual tokens for one media item, in model order."""

    embeds: torch.Tensor  # [V, D]
    prunable: torch.Tensor  # [V] bool: False for newline / CLS tokens


@dataclass
class FrameProcessor:
    """Video-LLaVA preprocessing without torchvision: its tokenizer, and its image processor
    applied to every frame (HF's own video processor needs torchvision, absent on CPU hosts)."""

    tokenizer: object
    image_processor: object

    def save_pretrained(self, directory) -> None:
        self.tokenizer.save_pretrained(directory)
        self.image_processor.save_pretrained(directory)

    @classmethod
    def from_pretrained(cls, directory) -> FrameProcessor:
        from transformers import AutoTokenizer
        from transformers.models.video_llava.image_processing_video_llava import VideoLlavaImageProcessor

        return cls(AutoTokenizer.from_pretrained(directory), VideoLlavaImageProcessor.from_pretrained(directory))


def to_frames(video) -> list[Image.Image]:
    """A video as a list of RGB PIL frames (accepts [T, H, W, 3] uint8 arrays or PIL lists)."""
    if isinstance(video, np.ndarray):
        return [Image.fromarray(frame) for frame in video]
    return [frame.convert("RGB") for frame in video]


def placeholder_spans(input_ids: torch.Tensor, token_ids: set[int], media: list[MediaInput]) -> list[tuple[int, int]]:
    """(start, end) of the placeholders each media item fills, in prompt order.

    Adjacent tags (several frames, ``<image><image>``) form one run of placeholder ids, so an item
    with a known ``tokens`` count takes that many; an item without one takes a whole run.
    """
    flags = [int(t) in token_ids for t in input_ids.tolist()]
    runs, start = [], None
    for i, flag in enumerate(flags + [False]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            runs.append([start, i])
            start = None
    spans = []
    for item in media:
        if not runs:
            raise ValueError(f"prompt has fewer media placeholders than the {len(media)} media item(s) given")
        run = runs[0]
        take = item.tokens if item.tokens is not None else run[1] - run[0]
        if take > run[1] - run[0]:
            raise ValueError(f"a media item needs {take} placeholder tokens but the prompt has {run[1] - run[0]} there")
        spans.append((run[0], run[0] + take))
        run[0] += take
        if run[0] == run[1]:
            runs.pop(0)
    if runs:
        raise ValueError(f"prompt has more media placeholders than the {len(media)} media item(s) given")
    return spans


class LlavaAdapter:
    """LLaVA-1.5 (``LlavaForConditionalGeneration``): one CLIP tower, one segment per image."""

    family = "llava"

    def __init__(self, model: nn.Module, processor, pad_to_square: bool = False):
        self.model = model
        self.processor = processor
        self.config = model.config
        self.feature_layer = self.config.vision_feature_layer
        self.keep_cls = self.config.vision_feature_select_strategy == "full"
        if pad_to_square:
            self._enable_pad_to_square()

    def _enable_pad_to_square(self) -> None:
        if not hasattr(self.processor.image_processor, "do_pad"):
            name = type(self.processor.image_processor).__name__
            raise ValueError(f"model.pad_to_square: {name} cannot pad to square")
        # A private copy: other engines sharing the caller's processor keep its setting.
        self.processor = copy.deepcopy(self.processor)
        self.processor.image_processor.do_pad = True  # original LLaVA-1.5 evaluation: expand2square, mean colour

    @property
    def placeholder_ids(self) -> set[int]:
        return {self.config.image_token_id}

    def towers(self) -> dict[str, nn.Module]:
        return {"image": self.model.model.vision_tower}

    def preprocess(self, prompt: str, images=(), video=None) -> RowInputs:
        images = list(images)
        if video is not None:
            # Image-only LLaVA models see a video as its frames, one <image> each (as video LLaVA
            # variants built on image models do); the budget then applies per frame.
            if images:
                raise ValueError(f"{self.family}: a request carries either images or a video, not both")
            images = to_frames(video)
            prompt = prompt.replace("<video>", "<image>" * len(images))
        inputs = self.processor(text=prompt, images=images or None, return_tensors="pt")
        per_image = self.tokens_per_segment(inputs["pixel_values"]) if images else 0
        media = [MediaInput("image", inputs["pixel_values"][i : i + 1], tokens=per_image) for i in range(len(images))]
        return RowInputs(inputs["input_ids"][0], media)

    def tokens_per_segment(self, pixel_values: torch.Tensor, keep_cls: bool | None = None) -> int:
        """Visual tokens one image or frame contributes unpruned: its patches (+ CLS if kept)."""
        patch = self.config.vision_config.patch_size
        height, width = pixel_values.shape[-2:]
        keep = self.keep_cls if keep_cls is None else keep_cls
        return (height // patch) * (width // patch) + int(keep)

    def encode(self, kind: str, pixel_values: torch.Tensor) -> Segments:
        out = encode_with_cls_attention(self.towers()[kind], pixel_values, self.feature_layer)
        n = out.cls_attention.shape[-1]
        side = int(round(n**0.5))
        keep_cls = self.keep_cls or kind == "video"
        return Segments(
            patches=out.features[:, 1:],
            cls_attention=out.cls_attention.mean(dim=1),
            cls=out.features[:, 0] if keep_cls else None,
            grid=(side, n // side),
        )

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return self.model.model.multi_modal_projector(features)

    def assemble(self, media: MediaInput, segments: Segments, indices: torch.Tensor, tokens: torch.Tensor) -> Stream:
        """tokens [segments, k, D] projected; each segment becomes [CLS?] + kept tokens."""
        count, k, dim = tokens.shape
        prunable = torch.ones(count, k, dtype=torch.bool)
        if segments.cls is not None:
            cls = self.project(segments.cls)[:, None]  # [segments, 1, D]
            tokens = torch.cat([cls, tokens], dim=1)
            prunable = torch.cat([torch.zeros(count, 1, dtype=torch.bool), prunable], dim=1)
        return Stream(tokens.reshape(-1, dim), prunable.reshape(-1))


class LlavaNextAdapter(LlavaAdapter):
    """LLaVA-NeXT (``LlavaNextForConditionalGeneration``): anyres crops pruned one by one.

    Masks go through Hugging Face's own ``pack_image_features`` (unpad + newline per row) as
    two extra channels, so the kept layout matches the model's exactly; as in the authors' code,
    kept tokens that fall in the unpadded area vanish and newline tokens are always kept.
    """

    family = "llava_next"

    def _enable_pad_to_square(self) -> None:
        raise ValueError("model.pad_to_square applies to LLaVA-1.5 only; LLaVA-NeXT uses anyres crops")

    def preprocess(self, prompt: str, images=(), video=None) -> RowInputs:
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        if video is not None:
            raise ValueError("llava_next models take images, not video")
        inputs = self.processor(text=prompt, images=list(images) or None, return_tensors="pt")
        media = []
        for i in range(len(images)):
            size = tuple(int(s) for s in inputs["image_sizes"][i])
            crops = image_size_to_num_patches(
                size, self.config.image_grid_pinpoints, self.config.vision_config.image_size
            )
            media.append(MediaInput("image", inputs["pixel_values"][i, :crops], size))
        return RowInputs(inputs["input_ids"][0], media)

    def assemble(self, media: MediaInput, segments: Segments, indices: torch.Tensor, tokens: torch.Tensor) -> Stream:
        if segments.cls is not None:
            raise ValueError("llava_next with vision_feature_select_strategy='full' is not supported")
        count, n = segments.cls_attention.shape
        dim = tokens.shape[-1]
        # Scatter kept tokens into full crops with [keep, newline] flag channels.
        full = tokens.new_zeros(count, n, dim + 2)
        full.scatter_(1, indices[..., None].expand(-1, -1, dim), tokens)
        full[..., dim].scatter_(1, indices, 1.0)
        newline = torch.cat([self.model.model.image_newline.to(tokens), tokens.new_tensor([0.0, 1.0])])
        packed, _ = self.model.model.pack_image_features(
            [full], torch.tensor([media.image_size]), self.config.vision_feature_select_strategy, newline
        )
        packed = packed[0]  # [V_full, D + 2]
        keep, is_newline = packed[:, dim] > 0.5, packed[:, dim + 1] > 0.5
        chosen = packed[keep | is_newline]
        return Stream(chosen[:, :dim], keep[keep | is_newline])


class VideoLlavaAdapter(LlavaAdapter):
    """Video-LLaVA (``VideoLlavaForConditionalGeneration``): image tower, and a video tower
    whose features keep each frame's [CLS] token (257 per frame for 224 px CLIP-L/14).

    We prune the 256 patches of each frame by its own [CLS] attention and always keep that
    frame's [CLS] token in front of them, as the model was trained with it; VisPruner/FasterVLM
    instead removed CLS and changed the model's input. Preprocessing is done here with the
    image processor on each frame because HF's video processor needs torchvision.
    """

    family = "video_llava"

    def _enable_pad_to_square(self) -> None:
        raise ValueError("model.pad_to_square applies to LLaVA-1.5 only")

    @property
    def placeholder_ids(self) -> set[int]:
        return {self.config.image_token_id, self.config.video_token_id}

    def towers(self) -> dict[str, nn.Module]:
        return {"image": self.model.model.image_tower, "video": self.model.model.video_tower}

    def preprocess(self, prompt: str, images=(), video=None) -> RowInputs:
        tokenizer = self.processor.tokenizer
        image_processor = self.processor.image_processor
        media = []
        image_token, video_token = "<image>", "<video>"
        if images:
            pixels = image_processor(images=list(images), return_tensors="pt", return_legacy_image_output=False)
            pixel_values = pixels["pixel_values"]
            tokens = self.tokens_per_segment(pixel_values)
            media += [MediaInput("image", pixel_values[i : i + 1], tokens=tokens) for i in range(len(images))]
            prompt = prompt.replace(image_token, image_token * tokens)
        if video is not None:
            frames = to_frames(video)
            pixels = image_processor(images=frames, return_tensors="pt", return_legacy_image_output=False)
            frame_tokens = self.tokens_per_segment(pixels["pixel_values"], keep_cls=True)
            media.append(MediaInput("video", pixels["pixel_values"], tokens=frame_tokens * len(frames)))
            prompt = prompt.replace(video_token, video_token * (frame_tokens * len(frames)))
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"][0]
        return RowInputs(ids, media)


ADAPTERS = {"llava": LlavaAdapter, "llava_next": LlavaNextAdapter, "video_llava": VideoLlavaAdapter}


def make_adapter(model: nn.Module, processor, pad_to_square: bool = False) -> LlavaAdapter:
    family = model.config.model_type
    if family not in ADAPTERS:
        raise ValueError(f"unsupported model_type {family!r}; supported: {', '.join(FAMILIES)}")
    return ADAPTERS[family](model, processor, pad_to_square)
