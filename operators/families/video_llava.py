"""Video-LLaVA (``VideoLlavaForConditionalGeneration``): an image tower and a video tower; each
frame is one segment and keeps its [CLS] token."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from operators.families.base import MediaInput, RowInputs, to_frames
from operators.families.llava import LlavaAdapter


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


class VideoLlavaAdapter(LlavaAdapter):
    """Video-LLaVA (``VideoLlavaForConditionalGeneration``): image tower, and a video tower
    whose features keep each frame's [CLS] token (257 per frame for 224 px CLIP-L/14).

    We prune the 256 patches of each frame by its own [CLS] attention and always keep that
    frame's [CLS] token in front of them, as the model was trained with it; VisPruner/FasterVLM
    instead removed CLS and changed the model's input. Preprocessing is done here with the
    image processor on each frame because HF's video processor needs torchvision.
    """

    family = "video_llava"
    model_class = "VideoLlavaForConditionalGeneration"

    @classmethod
    def load_processor(cls, directory):
        return FrameProcessor.from_pretrained(directory)

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
