"""Tiny random-weight LLaVA-family checkpoints built from configs in code (no downloads).

Used by the tests, the engine benchmark and the demo until the trained demo model exists.
Each builder returns a ``(model, processor)`` pair with the real Hugging Face classes, so the
loading, preprocessing, pruning and generation code paths are the ones real checkpoints take.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    VideoLlavaConfig,
    VideoLlavaForConditionalGeneration,
)
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

from operators.families.video_llava import FrameProcessor

SPECIAL = ["<unk>", "<s>", "</s>", "<pad>", "<image>", "<video>"]
WORDS = (
    "USER ASSISTANT : . , ? ! a an the is are of in on to and what which where how many color colour shape "
    "image video picture describe there red green blue yellow circle square triangle left right top bottom "
    "small large one two three four five yes no moving up down first then"
).split()


def tiny_tokenizer(extra_words: int = 200) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over a small English word list plus filler words."""
    return word_tokenizer(WORDS + [f"w{i}" for i in range(extra_words)])


def word_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer with LLaVA's special tokens (whitespace and punctuation split);
    unknown words map to <unk>."""
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(SPECIAL + list(words)))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="isolated")]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>", "video_token": "<video>"},
    )
    tokenizer.padding_side = "left"
    return tokenizer


def tiny_text_config(tokenizer: PreTrainedTokenizerFast, **overrides) -> LlamaConfig:
    values = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    values.update(overrides)
    return LlamaConfig(**values)


def tiny_vision_config(image_size: int = 48, patch_size: int = 4, **overrides) -> CLIPVisionConfig:
    values = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=32,
    )
    values.update(overrides)
    return CLIPVisionConfig(**values)


def _finish(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Give the random model non-trivial weights deterministically and put it in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if "norm" in name and name.endswith("weight"):
                param.copy_(1.0 + 0.1 * noise)  # layer/RMS norm gains near 1
            elif param.dim() == 1:
                param.copy_(0.02 * noise)  # biases
            else:
                param.copy_(noise / param.shape[-1] ** 0.5)  # unit-variance activations
    return model.eval()


def square_image_kwargs(image_size: int) -> dict:
    """Image-processor sizes for square inputs of ``image_size`` pixels."""
    return dict(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_center_crop=True,
    )


def tiny_llava(
    seed: int = 0, image_size: int = 48, patch_size: int = 4, vision_overrides: dict | None = None, **text_overrides
):
    """LlavaForConditionalGeneration (LLaVA-1.5 layout: CLIP tower, layer -2, CLS dropped)."""
    tokenizer = tiny_tokenizer()
    config = LlavaConfig(
        vision_config=tiny_vision_config(image_size, patch_size, **(vision_overrides or {})),
        text_config=tiny_text_config(tokenizer, **text_overrides),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    model = _finish(LlavaForConditionalGeneration(config), seed)
    processor = llava_processor(
        LlavaProcessor, LlavaImageProcessorPil(**square_image_kwargs(image_size)), tokenizer, patch_size
    )
    copy_generation_ids(model, tokenizer)
    return model, processor


# One user turn then the reply, LLaVA-1.5's way; turns render as prefixes of each other.
TEXT_CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}USER : {{ m['content'] }} ASSISTANT :"
    "{% else %} {{ m['content'] }} </s>{% endif %}{% endfor %}"
)


def tiny_llama(seed: int = 0, **text_overrides):
    """A text-only LlamaForCausalLM and its tokenizer, with a chat template (``USER : q ASSISTANT :``)."""
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = TEXT_CHAT_TEMPLATE
    model = _finish(LlamaForCausalLM(tiny_text_config(tokenizer, **text_overrides)), seed)
    copy_generation_ids(model, tokenizer)
    return model, tokenizer


def tiny_llava_next(seed: int = 0, image_size: int = 32, patch_size: int = 4, **text_overrides):
    """LlavaNextForConditionalGeneration (anyres crops, unpadding, image_newline)."""
    tokenizer = tiny_tokenizer()
    pinpoints = [[image_size, image_size * 2], [image_size * 2, image_size], [image_size * 2, image_size * 2]]
    config = LlavaNextConfig(
        vision_config=tiny_vision_config(image_size, patch_size),
        text_config=tiny_text_config(tokenizer, **text_overrides),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=pinpoints,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    model = _finish(LlavaNextForConditionalGeneration(config), seed)
    image_processor = LlavaNextImageProcessorPil(image_grid_pinpoints=pinpoints, **square_image_kwargs(image_size))
    processor = llava_processor(LlavaNextProcessor, image_processor, tokenizer, patch_size)
    copy_generation_ids(model, tokenizer)
    return model, processor


def tiny_video_llava(seed: int = 0, image_size: int = 32, patch_size: int = 4, **text_overrides):
    """VideoLlavaForConditionalGeneration (separate image and video towers; video keeps CLS)."""
    from transformers.models.video_llava.image_processing_video_llava import VideoLlavaImageProcessor

    tokenizer = tiny_tokenizer()
    config = VideoLlavaConfig(
        vision_config=tiny_vision_config(image_size, patch_size),
        text_config=tiny_text_config(tokenizer, **text_overrides),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<video>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    model = _finish(VideoLlavaForConditionalGeneration(config), seed)
    processor = FrameProcessor(tokenizer, VideoLlavaImageProcessor(**square_image_kwargs(image_size)))
    copy_generation_ids(model, tokenizer)
    return model, processor


def llava_processor(processor_cls, image_processor, tokenizer, patch_size: int):
    """A LLaVA(-NeXT) processor that expands <image> to the patch count (CLS dropped, as LLaVA does)."""
    return processor_cls(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )


def copy_generation_ids(model, tokenizer) -> None:
    """Make ``generate`` stop and pad with the tokenizer's special ids."""
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id


BUILDERS = {"llava": tiny_llava, "llava_next": tiny_llava_next, "video_llava": tiny_video_llava}


def save_tiny(family: str, directory: str | Path, seed: int = 0, **kwargs) -> Path:
    """Build a tiny checkpoint of ``family`` and save model + processor (safetensors) to ``directory``."""
    model, processor = BUILDERS[family](seed=seed, **kwargs)
    directory = Path(directory)
    model.save_pretrained(directory, safe_serialization=True)
    processor.save_pretrained(directory)
    return directory
