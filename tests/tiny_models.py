"""Tiny random-weight LLaVA-family checkpoints for the tests, built from configs in code (no downloads).

Each builder returns a ``(model, processor)`` pair with the real Hugging Face classes, so the
loading, preprocessing, pruning and generation code paths are the ones real checkpoints take.
The generic parts (tokenizer, processor, random weights) are ``training.builders``; what is here
are the test-sized presets.
"""

from __future__ import annotations

from pathlib import Path

from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
    PreTrainedTokenizerFast,
    VideoLlavaConfig,
    VideoLlavaForConditionalGeneration,
)
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

from operators.families.video_llava import FrameProcessor
from training.builders import (
    basic_tokenizer,
    copy_generation_ids,
    llama_config,
    llava_processor,
    random_init,
    random_llava,
    square_image_kwargs,
)


def tiny_tokenizer(extra_words: int = 200) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over a small English word list plus filler words."""
    return basic_tokenizer(extra_words)


def tiny_text_config(tokenizer: PreTrainedTokenizerFast, **overrides) -> LlamaConfig:
    values = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
    )
    values.update(overrides)
    return llama_config(tokenizer, **values)


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


def tiny_llava(
    seed: int = 0, image_size: int = 48, patch_size: int = 4, vision_overrides: dict | None = None, **text_overrides
):
    """LlavaForConditionalGeneration (LLaVA-1.5 layout: CLIP tower, layer -2, CLS dropped)."""
    tokenizer = tiny_tokenizer()
    vision = tiny_vision_config(image_size, patch_size, **(vision_overrides or {}))
    return random_llava(tokenizer, vision, tiny_text_config(tokenizer, **text_overrides), seed)


# One user turn then the reply, LLaVA-1.5's way; turns render as prefixes of each other.
TEXT_CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}USER : {{ m['content'] }} ASSISTANT :"
    "{% else %} {{ m['content'] }} </s>{% endif %}{% endfor %}"
)


def tiny_llama(seed: int = 0, **text_overrides):
    """A text-only LlamaForCausalLM and its tokenizer, with a chat template (``USER : q ASSISTANT :``)."""
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = TEXT_CHAT_TEMPLATE
    model = random_init(LlamaForCausalLM(tiny_text_config(tokenizer, **text_overrides)), seed)
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
    model = random_init(LlavaNextForConditionalGeneration(config), seed)
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
    model = random_init(VideoLlavaForConditionalGeneration(config), seed)
    processor = FrameProcessor(tokenizer, VideoLlavaImageProcessor(**square_image_kwargs(image_size)))
    copy_generation_ids(model, tokenizer)
    return model, processor


# LLaVA-OneVision's chat template, shortened: media tags first, then the text, Qwen2 turns.
ONEVISION_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + ' ' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
    "{% for c in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>' }}{% endfor %}"
    "{% for c in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\\n' + c['text'] }}{% endfor %}"
    "{% endif %}{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def tiny_llava_onevision(seed: int = 0, image_size: int = 32, patch_size: int = 4, **text_overrides):
    """LlavaOnevisionForConditionalGeneration: SigLIP tower (no [CLS], last layer), Qwen2 LM (GQA),
    anyres crops up to 4x4 (a 128 px image is downsampled by ``anyres_max_9``), pooled video."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        Qwen2Config,
        SiglipVisionConfig,
    )
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    from operators.families.llava_onevision import OnevisionProcessor, VideoSettings

    tokenizer = tiny_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.add_tokens(["user", "assistant", "system"])
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    text.update(text_overrides)
    vision = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
        vision_use_head=False,
    )
    pinpoints = [[image_size * r, image_size * c] for r, c in ((1, 1), (1, 2), (2, 1), (2, 2), (4, 4))]
    config = LlavaOnevisionConfig(
        vision_config=vision,
        text_config=Qwen2Config(**text),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=pinpoints,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
    )
    model = random_init(LlavaOnevisionForConditionalGeneration(config), seed)
    mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": image_size, "width": image_size},
        image_grid_pinpoints=pinpoints,
        image_mean=list(mean),
        image_std=list(std),
    )
    video = VideoSettings(image_size, image_size, mean, std)
    processor = OnevisionProcessor(tokenizer, image_processor, video, ONEVISION_CHAT_TEMPLATE)
    copy_generation_ids(model, tokenizer)
    return model, processor


BUILDERS = {
    "llava": tiny_llava,
    "llava_next": tiny_llava_next,
    "video_llava": tiny_video_llava,
    "llava_onevision": tiny_llava_onevision,
    "qwen2_5_vl": lambda seed=0, **kwargs: _qwen("tiny_qwen2_5_vl", seed, **kwargs),
    "qwen3_vl": lambda seed=0, **kwargs: _qwen("tiny_qwen3_vl", seed, **kwargs),
}


def _qwen(builder: str, seed: int, **kwargs):
    from tests import tiny_qwen  # imports this module's siblings only when a Qwen model is asked for

    return getattr(tiny_qwen, builder)(seed=seed, **kwargs)


def save_tiny(family: str, directory: str | Path, seed: int = 0, **kwargs) -> Path:
    """Build a tiny checkpoint of ``family`` and save model + processor (safetensors) to ``directory``."""
    model, processor = BUILDERS[family](seed=seed, **kwargs)
    directory = Path(directory)
    model.save_pretrained(directory, safe_serialization=True)
    processor.save_pretrained(directory)
    return directory
