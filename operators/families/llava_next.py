"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``): anyres crops, each crop one segment."""

from __future__ import annotations

import torch

from operators.families.base import MediaInput, RowInputs, Segments, Stream
from operators.families.llava import LlavaAdapter


class LlavaNextAdapter(LlavaAdapter):
    """LLaVA-NeXT (``LlavaNextForConditionalGeneration``): anyres crops pruned one by one.

    Masks go through Hugging Face's own ``pack_image_features`` (unpad + newline per row) as
    two extra channels, so the kept layout matches the model's exactly; as in the authors' code,
    kept tokens that fall in the unpadded area vanish and newline tokens are always kept.
    """

    family = "llava_next"
    model_class = "LlavaNextForConditionalGeneration"

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
