"""LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``): a SigLIP tower (no [CLS]), AnyRes
crops for a single image, one pooled grid per video frame, a Qwen2 language model.

Segments, the units a budget applies to:

* a single image: its base crop and each grid crop (as LLaVA-NeXT); Hugging Face's own
  ``pack_image_features`` lays the kept tokens out (unpadding, one ``image_newline`` per grid row,
  and the ``anyres_max_9`` downsampling of large grids), so the layout is the model's;
* several images in one prompt: each image's base crop only, then one newline (as HF);
* a video: each frame's tokens *after* OneVision's 2x2 bilinear pooling (what the model sees),
  one newline after the whole video. Pruning acts on these pooled tokens; their scores are the
  per-patch scores pooled by the same bilinear interpolation, and VisPruner's diverse step
  compares the pooled, projected tokens (no per-token vision feature exists after pooling).

Importance scores: SigLIP has no [CLS], so VisPruner's score is the attention each patch receives
(:func:`operators.vision.encode_with_received_attention`), as in the authors' SigLIP code.

Preprocessing needs no torchvision: the image processor (PIL backend) for images, and
:func:`video_pixels` (torch only, the resize HF's torchvision video processor does) for frames.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from operators.families.base import FamilyAdapter, MediaInput, RowInputs, Segments, Stream, to_frames
from operators.vision import encode_with_received_attention

VIDEO_CONFIG = "video_preprocessor_config.json"
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # HF's LlavaOnevisionVideoProcessor defaults
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class VideoSettings:
    """What HF's ``LlavaOnevisionVideoProcessor`` does to frames: resize to (height, width)
    (bicubic, antialiased), scale to [0, 1], normalise by mean and std."""

    height: int = 384
    width: int = 384
    mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    std: tuple[float, ...] = OPENAI_CLIP_STD

    @classmethod
    def from_dict(cls, values: dict) -> VideoSettings:
        size = values.get("size") or {}
        return cls(
            int(size.get("height", cls.height)),
            int(size.get("width", cls.width)),
            tuple(values.get("image_mean", OPENAI_CLIP_MEAN)),
            tuple(values.get("image_std", OPENAI_CLIP_STD)),
        )

    def to_dict(self) -> dict:
        return {
            "video_processor_type": "LlavaOnevisionVideoProcessor",
            "size": {"height": self.height, "width": self.width},
            "image_mean": list(self.mean),
            "image_std": list(self.std),
            "resample": 3,
            "do_resize": True,
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "do_convert_rgb": True,
        }


def video_pixels(frames: torch.Tensor, settings: VideoSettings) -> torch.Tensor:
    """uint8 frames [T, H, W, 3] -> normalised pixel values [T, 3, height, width] (float32).

    The steps of HF's torchvision video processor on CPU: torchvision resizes uint8 frames with
    torch's native uint8 bicubic, antialiased kernel (``interpolate(..., antialias=True)``,
    leaving same-size frames untouched), then rescale and normalise are fused as
    ``(x - 255 mean) / (255 std)`` in float32.
    """
    video = frames.permute(0, 3, 1, 2).contiguous()  # [T, 3, H, W] uint8
    if tuple(video.shape[-2:]) != (settings.height, settings.width):
        video = F.interpolate(
            video, size=(settings.height, settings.width), mode="bicubic", align_corners=False, antialias=True
        )
    mean = torch.tensor(settings.mean, dtype=torch.float32)[:, None, None] * 255.0
    std = torch.tensor(settings.std, dtype=torch.float32)[:, None, None] * 255.0
    return (video.to(torch.float32) - mean) / std


@dataclass
class OnevisionProcessor:
    """OneVision preprocessing without torchvision: the tokenizer (with the chat template), the
    PIL image processor, and the video settings (HF's ``LlavaOnevisionProcessor`` cannot even be
    built without torchvision, its video processor class being torchvision-only)."""

    tokenizer: object
    image_processor: object
    video: VideoSettings = field(default_factory=VideoSettings)
    chat_template: str | None = None

    def apply_chat_template(self, messages, **kwargs):
        return self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, **kwargs)

    def save_pretrained(self, directory) -> None:
        directory = Path(directory)
        self.tokenizer.save_pretrained(directory)
        self.image_processor.save_pretrained(directory)
        (directory / VIDEO_CONFIG).write_text(json.dumps(self.video.to_dict(), indent=2))
        if self.chat_template:
            (directory / "chat_template.jinja").write_text(self.chat_template)

    @classmethod
    def from_pretrained(cls, directory) -> OnevisionProcessor:
        from transformers import AutoTokenizer
        from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
            LlavaOnevisionImageProcessorPil,
        )

        directory = Path(directory)
        tokenizer = AutoTokenizer.from_pretrained(directory)
        image_processor = LlavaOnevisionImageProcessorPil.from_pretrained(directory)
        video_file = directory / VIDEO_CONFIG
        if video_file.exists():
            video = VideoSettings.from_dict(json.loads(video_file.read_text()))
        else:  # no video config: the image processor's size and normalisation
            size = image_processor.size
            video = VideoSettings(size["height"], size["width"], image_processor.image_mean, image_processor.image_std)
        # The processor's template (it renders <image>/<video>) wins over the tokenizer's, which
        # for a Qwen2 tokenizer is the text-only one.
        template = None
        for name in ("chat_template.jinja", "chat_template.json"):
            path = directory / name
            if template is None and path.exists():
                text = path.read_text()
                template = json.loads(text)["chat_template"] if name.endswith(".json") else text
        template = template or getattr(tokenizer, "chat_template", None)
        return cls(tokenizer, image_processor, video, template)


def pool_grid(values: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """OneVision's video pooling (``apply_pooling``): [T, h*w, C] -> [T, ceil(h/2)*ceil(w/2), C],
    bilinear, on any per-patch values (features or scores)."""
    frames, _, channels = values.shape
    height, width = grid
    maps = values.reshape(frames, height, width, channels).permute(0, 3, 1, 2)  # [T, C, h, w]
    pooled = F.interpolate(maps, size=[math.ceil(height / 2), math.ceil(width / 2)], mode="bilinear")
    return pooled.permute(0, 2, 3, 1).reshape(frames, -1, channels)


class LlavaOnevisionAdapter(FamilyAdapter):
    """LLaVA-OneVision: images as AnyRes crops (budget per crop), video as pooled frames (budget per frame)."""

    family = "llava_onevision"
    model_class = "LlavaOnevisionForConditionalGeneration"

    def __init__(self, model: nn.Module, processor, pad_to_square: bool = False):
        super().__init__(model, processor)
        if pad_to_square:
            raise ValueError("model.pad_to_square applies to LLaVA-1.5 only; LLaVA-OneVision uses anyres crops")
        if self.config.vision_feature_select_strategy != "full":
            # SigLIP has no [CLS]: "default" would drop a real patch, as HF does; not supported.
            raise ValueError("llava_onevision with vision_feature_select_strategy='default' is not supported")
        self.feature_layer = self.config.vision_feature_layer
        vision = self.config.vision_config
        self.side = vision.image_size // vision.patch_size  # patches per crop side

    @classmethod
    def load_processor(cls, directory):
        return OnevisionProcessor.from_pretrained(directory)

    @property
    def placeholder_ids(self) -> set[int]:
        return {self.config.image_token_id, self.config.video_token_id}

    # --- preprocessing --------------------------------------------------------------------------

    def preprocess(self, prompt: str, images=(), video=None) -> RowInputs:
        """Media tensors, and the prompt with each ``<image>`` / ``<video>`` tag expanded to its
        token count (the packed layout's length: HF's processor counts the same)."""
        images, media = list(images), []
        if images:
            # HF: one image in a prompt gets AnyRes crops; several get their base crop each.
            nested = [images] if len(images) > 1 else images
            pixels = self.processor.image_processor(images=nested, return_tensors="pt")
            multi = len(images) > 1
            for i in range(len(images)):
                size = tuple(int(s) for s in pixels["image_sizes"][i])
                crops = 1 if multi else self._crops(size)
                values = pixels["pixel_values"][i, :crops]  # [crops, 3, H, W]
                media.append(MediaInput("image", values, size, tokens=self._image_tokens(crops, size)))
        if video is not None:
            frames = torch.from_numpy(_frame_array(video))
            values = video_pixels(frames, self.processor.video)
            pooled = math.ceil(self.side / 2) ** 2
            media.append(MediaInput("video", values, tokens=len(values) * pooled + 1))
        expanded = _expand(prompt, "<image>", [m.tokens for m in media if m.kind == "image"])
        expanded = _expand(expanded, "<video>", [m.tokens for m in media if m.kind == "video"])
        ids = self.processor.tokenizer(expanded, return_tensors="pt")["input_ids"][0]
        return RowInputs(ids, _in_prompt_order(prompt, media))

    def _crops(self, image_size: tuple[int, int]) -> int:
        from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

        vision = self.config.vision_config
        return image_size_to_num_patches(image_size, self.config.image_grid_pinpoints, vision.image_size)

    def _image_tokens(self, crops: int, image_size: tuple[int, int]) -> int:
        """Tokens the model packs an image into, counted by its own ``pack_image_features`` on a
        1-channel dummy (so the placeholder count can never disagree with the model)."""
        dummy = torch.zeros(crops, self.side * self.side, 1)
        packed, _ = self._pack(dummy, image_size, torch.zeros(1))
        return packed.shape[0]

    def _pack(self, features: torch.Tensor, image_size: tuple[int, int], newline: torch.Tensor) -> tuple:
        """HF's packing of one image: [crops, N, C] -> ([V, C], feature lengths)."""
        packed, lengths = self.model.model.pack_image_features(
            [features], torch.tensor([image_size]), image_newline=newline, vision_aspect_ratio=self._aspect_ratio
        )
        return packed[0], lengths

    @property
    def _aspect_ratio(self) -> str:
        return getattr(self.config, "vision_aspect_ratio", None) or "anyres_max_9"

    # --- vision ---------------------------------------------------------------------------------

    def encode(self, kind: str, pixel_values: torch.Tensor) -> Segments:
        """Images: per-crop SigLIP features [crops, N, C] (pre-projector) and received-attention
        scores [crops, N]. Video: pooled, projected tokens [T, n, D] and pooled scores [T, n]."""
        tower = self.model.model.vision_tower
        out = encode_with_received_attention(tower, pixel_values, self.feature_layer)
        scores = out.received_attention.mean(dim=1)  # [segments, N], heads averaged (authors' encode_images)
        grid = (self.side, self.side)
        if kind == "image":
            return Segments(patches=out.features, cls_attention=scores, cls=None, grid=grid)
        projected = self.project(out.features)  # HF pools after the projector
        pooled = pool_grid(projected, grid)  # [T, n, D]
        pooled_scores = pool_grid(scores[..., None].to(projected.dtype), grid)[..., 0]  # [T, n]
        pooled_grid = (math.ceil(self.side / 2), math.ceil(self.side / 2))
        return Segments(patches=pooled, cls_attention=pooled_scores.to(scores.dtype), cls=None, grid=pooled_grid)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return self.model.model.multi_modal_projector(features)

    def project_media(self, media: MediaInput, features: torch.Tensor) -> torch.Tensor:
        # Video tokens were projected (and pooled) in encode, as HF pools after the projector.
        return features if media.kind == "video" else self.project(features)

    def projected_tokens(self, media: MediaInput, segments: Segments, kept_per_segment: int) -> int:
        """Video frames project every patch before pooling (see encode); a pruned image whose grid
        HF downsamples projects every patch too, besides the kept ones (see assemble)."""
        count = media.pixel_values.shape[0]
        every = count * self.side * self.side
        if media.kind == "video":
            return every
        if kept_per_segment < self.side * self.side and self._downsamples(count, media.image_size):
            return every + count * kept_per_segment
        return count * kept_per_segment

    # --- layout ---------------------------------------------------------------------------------

    def assemble(self, media: MediaInput, segments: Segments, indices: torch.Tensor, tokens: torch.Tensor) -> Stream:
        if media.kind == "video":
            return self._assemble_video(tokens)
        return self._assemble_image(media, segments, indices, tokens)

    def _assemble_video(self, tokens: torch.Tensor) -> Stream:
        """tokens [T, k, D] (pooled, projected) -> T*k tokens, then the one newline (never pruned)."""
        frames, k, dim = tokens.shape
        newline = self.model.model.image_newline.to(tokens)[None]
        embeds = torch.cat([tokens.reshape(-1, dim), newline])
        prunable = torch.cat([torch.ones(frames * k, dtype=torch.bool), torch.zeros(1, dtype=torch.bool)])
        return Stream(embeds, prunable)

    def _assemble_image(
        self, media: MediaInput, segments: Segments, indices: torch.Tensor, tokens: torch.Tensor
    ) -> Stream:
        """Kept tokens [crops, k, D] through HF's packing with two flag channels, [keep, newline].

        Pruned positions are filled with zeros, kept ones with their tokens; tokens in the area
        unpadding removes vanish (as for LLaVA-NeXT). When the grid is large enough that HF
        downsamples it (``anyres_max_9``: more than ~9 crops' worth of unpadded tokens), every
        downsampled token mixes several source tokens: we then fill *every* position with its
        projected token (so a kept downsampled token is exactly HF's), and keep a downsampled token
        when more than half of its bilinear weight lies on kept sources; the kept count per crop
        is then about the budget divided by the downsampling area.
        """
        crops, n = segments.cls_attention.shape
        dim = tokens.shape[-1]
        full = tokens.new_zeros(crops, n, dim + 2)  # [crops, N, D + 2]
        if indices.shape[1] < n and self._downsamples(crops, media.image_size):
            full[..., :dim] = self.project(segments.patches).to(tokens)
        else:
            full[..., :dim].scatter_(1, indices[..., None].expand(-1, -1, dim), tokens)
        full[..., dim].scatter_(1, indices, 1.0)
        newline = torch.cat([self.model.model.image_newline.to(tokens), tokens.new_tensor([0.0, 1.0])])
        packed, _ = self._pack(full, media.image_size, newline)  # [V_full, D + 2]
        keep, is_newline = packed[:, dim] > 0.5, packed[:, dim + 1] > 0.5
        chosen = keep | is_newline
        return Stream(packed[chosen, :dim], keep[chosen])

    def _downsamples(self, crops: int, image_size: tuple[int, int]) -> bool:
        """Whether HF's packing bilinearly downsamples this image's unpadded grid (its test, as in
        ``pack_image_features``: sqrt(h w / (max_crops side^2)) > 1.1)."""
        from transformers.models.llava_onevision.modeling_llava_onevision import (
            get_anyres_image_grid_shape,
            unpad_image,
        )

        if crops == 1:
            return False
        vision = self.config.vision_config
        rows, cols = get_anyres_image_grid_shape(image_size, self.config.image_grid_pinpoints, vision.image_size)
        height, width = unpad_image(torch.zeros(1, rows * self.side, cols * self.side), image_size).shape[1:]
        max_crops = int(self._aspect_ratio.removeprefix("anyres_max_"))
        return math.sqrt(height * width / (max_crops * self.side**2)) > 1.1


def _frame_array(video) -> np.ndarray:
    """[T, H, W, 3] uint8 array of a video given as an array or a list of PIL frames."""
    if isinstance(video, np.ndarray):
        return np.ascontiguousarray(video)
    return np.stack([np.asarray(frame) for frame in to_frames(video)])


def _in_prompt_order(prompt: str, media: list[MediaInput]) -> list[MediaInput]:
    """Media sorted by where their tags stand in the prompt (placeholder runs are matched in order):
    images keep their order, the video goes where its ``<video>`` tag is."""
    if not any(m.kind == "video" for m in media) or not any(m.kind == "image" for m in media):
        return media
    tags = [(i, "image") for i in _find_all(prompt, "<image>")] + [(i, "video") for i in _find_all(prompt, "<video>")]
    queues = {"image": [m for m in media if m.kind == "image"], "video": [m for m in media if m.kind == "video"]}
    return [queues[kind].pop(0) for _, kind in sorted(tags)]


def _find_all(text: str, tag: str) -> list[int]:
    positions, start = [], text.find(tag)
    while start >= 0:
        positions.append(start)
        start = text.find(tag, start + len(tag))
    return positions


def _expand(prompt: str, tag: str, counts: list[int]) -> str:
    """Replace the i-th ``tag`` with ``counts[i]`` copies of it."""
    parts = prompt.split(tag)
    if len(parts) - 1 != len(counts):
        raise ValueError(f"prompt has {len(parts) - 1} {tag} tag(s) for {len(counts)} media item(s)")
    out = parts[0]
    for count, part in zip(counts, parts[1:], strict=True):
        out += tag * count + part
    return out
