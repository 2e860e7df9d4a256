"""The demo VLM's architecture, tokenizer and processor (LLaVA-1.5 layout, shapes-world sized).

A CLIP-style ViT with a [CLS] token (so [CLS] attention means something), a 2-layer MLP
projector and a small Llama, assembled as a real ``LlavaForConditionalGeneration`` so the engine,
the pipeline and ``from_pretrained`` treat it exactly like a downloaded LLaVA checkpoint. Videos
are fed as several frames, one ``<image>`` each.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import (
    CLIPTextConfig,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

from synthetic.world import WorldConfig, vocabulary
from training.builders import copy_generation_ids, llava_processor, square_image_kwargs, word_tokenizer

# Words of the prompts the demo model is trained and served with (besides the world's own).
PROMPT_WORDS = ["USER", "ASSISTANT", ":", "describe", "the", "image", "video", "."]
CAPTION_PROMPT = {"image": "describe the image .", "video": "describe the video ."}


@dataclass(frozen=True)
class DemoModelConfig:
    """Sizes of the demo model. Defaults fit a 2-core CPU training budget and a < 25 MB checkpoint."""

    patch_size: int = 8
    vision_width: int = 128
    vision_layers: int = 4
    vision_heads: int = 4
    text_width: int = 192
    text_layers: int = 4
    text_heads: int = 4
    text_kv_heads: int = 4
    text_ffn: int = 512
    clip_text_width: int = 128
    clip_text_layers: int = 2
    frames_per_video: int = 4
    max_positions: int = 1024


def build_tokenizer(world: WorldConfig = WorldConfig()) -> PreTrainedTokenizerFast:
    return word_tokenizer(PROMPT_WORDS + vocabulary(world))


def build_processor(tokenizer: PreTrainedTokenizerFast, world: WorldConfig, model: DemoModelConfig) -> LlavaProcessor:
    image_processor = LlavaImageProcessorPil(**square_image_kwargs(world.image_size))
    return llava_processor(LlavaProcessor, image_processor, tokenizer, model.patch_size)


def vision_config(world: WorldConfig, model: DemoModelConfig) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=model.vision_width,
        intermediate_size=4 * model.vision_width,
        num_hidden_layers=model.vision_layers,
        num_attention_heads=model.vision_heads,
        image_size=world.image_size,
        patch_size=model.patch_size,
        projection_dim=model.vision_width,
    )


def clip_text_config(tokenizer: PreTrainedTokenizerFast, model: DemoModelConfig) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=model.clip_text_width,
        intermediate_size=4 * model.clip_text_width,
        num_hidden_layers=model.clip_text_layers,
        num_attention_heads=4,
        max_position_embeddings=160,
        projection_dim=model.vision_width,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def llava_config(tokenizer: PreTrainedTokenizerFast, world: WorldConfig, model: DemoModelConfig) -> LlavaConfig:
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=model.text_width,
        intermediate_size=model.text_ffn,
        num_hidden_layers=model.text_layers,
        num_attention_heads=model.text_heads,
        num_key_value_heads=model.text_kv_heads,
        max_position_embeddings=model.max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    return LlavaConfig(
        vision_config=vision_config(world, model),
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )


def build_llava(tokenizer, world: WorldConfig, model: DemoModelConfig) -> LlavaForConditionalGeneration:
    llava = LlavaForConditionalGeneration(llava_config(tokenizer, world, model))
    copy_generation_ids(llava, tokenizer)
    return llava
