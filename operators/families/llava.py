"""LLaVA-1.5 (``LlavaForConditionalGeneration``): a CLIP tower with [CLS], layer -2 features, an MLP
projector; each image is one segment. Image-only, so a video is fed as its frames, one ``<image>``
each, and the budget applies per frame."""

from __future__ import annotations

import copy

import torch
from torch import nn

from operators.families.base import FamilyAdapter, MediaInput, RowInputs, Segments, Stream, to_frames
from operators.vision import encode_with_cls_attention


class LlavaAdapter(FamilyAdapter):
    """LLaVA-1.5 (``LlavaForConditionalGeneration``): one CLIP tower, one segment per image."""

    family = "llava"
    model_class = "LlavaForConditionalGeneration"

    def __init__(self, model: nn.Module, processor, pad_to_square: bool = False):
        super().__init__(model, processor)
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
