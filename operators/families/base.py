"""What every model-family adapter provides, and the types adapters and the engine share.

A family adapter (one file per family in this package, registered by ``model_type`` in
``operators.registry``) is the glue between a Hugging Face model class and the engine. It turns
a request into token ids plus media tensors, runs the vision tower(s) to get per-segment patch
features and importance scores ([CLS] attention; for towers without [CLS], the attention each
patch receives), and lays pruned, projected tokens back out in the order the model was trained
on. A *segment* is the unit a budget applies to: the image for LLaVA-1.5, each crop for
LLaVA-NeXT and LLaVA-OneVision, each frame for video (OneVision: each frame's pooled grid).

Tokens that are visual but never pruned (LLaVA-NeXT's row-end ``image_newline`` and
Video-LLaVA's per-frame [CLS]) are kept and not counted against the budget.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from torch import nn

from operators import registry


@dataclass
class MediaInput:
    kind: str  # "image" or "video"
    pixel_values: torch.Tensor  # [segments, 3, H, W]
    image_size: tuple[int, int] | None = None  # original (H, W), LLaVA-NeXT only
    tokens: int | None = None  # placeholder tokens it fills unpruned; None: its whole placeholder run
    # Qwen-VL: pixel_values are [segments, patches, C * temporal * P * P] flattened patches, grid is
    # the (t, h, w) patch grid, seconds_per_step the time one temporal patch spans (video).
    grid: tuple[int, int, int] | None = None
    seconds_per_step: float = 1.0


@dataclass
class RowInputs:
    input_ids: torch.Tensor  # [S] prompt ids with placeholder runs, one run per media item
    media: list[MediaInput] = field(default_factory=list)
    # [S, 3] multimodal-RoPE (t, h, w) positions of the unpruned prompt (Qwen-VL); None: 1-D positions
    positions: torch.Tensor | None = None


@dataclass
class Segments:
    """Vision-tower output for one media item."""

    patches: torch.Tensor  # [segments, N, C] pre-projector patch features
    cls_attention: torch.Tensor  # [segments, N] head-mean [CLS] -> patch attention
    cls: torch.Tensor | None  # [segments, C] [CLS] features when the model feeds them to the LLM
    grid: tuple[int, int]
    # [segments, N, levels, D] Qwen3-VL DeepStack: features of several tower layers, one per
    # patch, added to the visual tokens' hidden states after the first ``levels`` LM layers
    deepstack: torch.Tensor | None = None


@dataclass
class Stream:
    """Projected visual tokens for one media item, in model order."""

    embeds: torch.Tensor  # [V, D]
    prunable: torch.Tensor  # [V] bool: False for newline / CLS tokens
    # [V] long: which token of the item's unpruned placeholder run each is (M-RoPE families: its
    # position comes from there); None: the stream fills the run in order
    source: torch.Tensor | None = None
    deepstack: torch.Tensor | None = None  # [V, levels, D] the kept tokens' DeepStack features


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


class FamilyAdapter:
    """The interface the engine uses; each family subclasses it (see ``operators.families.llava``).

    Class attributes say how to load a checkpoint of the family: ``model_class`` is the name of its
    ``transformers`` class; :meth:`load_processor` reads its processor from a checkpoint directory.
    """

    family: str = ""  # the model_type it is registered under
    model_class: str = ""

    def __init__(self, model: nn.Module, processor, pad_to_square: bool = False):
        self.model = model
        self.processor = processor
        self.config = model.config

    @classmethod
    def load_processor(cls, directory):
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(directory, trust_remote_code=False)

    @property
    def placeholder_ids(self) -> set[int]:
        """Token ids a prompt uses for the places visual tokens go."""
        raise NotImplementedError

    def preprocess(self, prompt: str, images=(), video=None) -> RowInputs:
        """Token ids with placeholder runs, and the media tensors that fill them."""
        raise NotImplementedError

    def encode(self, kind: str, pixel_values: torch.Tensor) -> Segments:
        """Vision tower(s) over ``pixel_values`` [segments, 3, H, W]: features and importance scores."""
        raise NotImplementedError

    def encode_items(self, kind: str, media: list[MediaInput]) -> list[Segments]:
        """Per media item (all of ``kind``), its Segments: one :meth:`encode` over all their pixels,
        split by segment counts. Families whose items differ in shape override this."""
        pixels = torch.cat([item.pixel_values for item in media])
        segs = self.encode(kind, pixels)
        out, offset = [], 0
        for item in media:
            count = item.pixel_values.shape[0]
            out.append(
                Segments(
                    patches=segs.patches[offset : offset + count],
                    cls_attention=segs.cls_attention[offset : offset + count],
                    cls=None if segs.cls is None else segs.cls[offset : offset + count],
                    grid=segs.grid,
                    deepstack=None if segs.deepstack is None else segs.deepstack[offset : offset + count],
                )
            )
            offset += count
        return out

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Vision features [..., C] -> language-model embeddings [..., D]."""
        raise NotImplementedError

    def project_media(self, media: MediaInput, features: torch.Tensor) -> torch.Tensor:
        """Kept features of ``media`` -> language-model embeddings. A family whose tokens are already
        projected when pruned (OneVision's video pools after its projector) overrides this."""
        return self.project(features)

    def projected_tokens(self, media: MediaInput, segments: Segments, kept_per_segment: int) -> int:
        """Tokens the projector ran on for one media item (FLOPs accounting): the kept ones, + [CLS]."""
        return media.pixel_values.shape[0] * (kept_per_segment + (1 if segments.cls is not None else 0))

    def assemble(self, media: MediaInput, segments: Segments, indices: torch.Tensor, tokens: torch.Tensor) -> Stream:
        """Kept, projected tokens [segments, k, D] at ``indices`` [segments, k] -> the item's visual stream."""
        raise NotImplementedError


def adapter_class(model_type: str) -> type[FamilyAdapter]:
    """The adapter registered for ``model_type``; ValueError naming the supported ones otherwise."""
    try:
        return registry.load(registry.family_spec(model_type))
    except KeyError as e:
        raise ValueError(e.args[0]) from None


def make_adapter(model: nn.Module, processor, pad_to_square: bool = False) -> FamilyAdapter:
    return adapter_class(model.config.model_type)(model, processor, pad_to_square)
