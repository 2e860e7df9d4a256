"""Building Hugging Face LLaVA-family models and processors from configs in code (no downloads).

A word-level tokenizer with LLaVA's special tokens, the processor that expands ``<image>`` to the
patch count, deterministic random weights, and a random-weight ``LlavaForConditionalGeneration``
(LLaVA-1.5 layout) from explicit vision and text configs. The results are the real Hugging Face
classes, so loading, preprocessing, pruning and generation take the code paths real checkpoints
take. Used by the demo model (``training.demo_model``), the engine benchmark
(``evaluation.bench_engine``) and the tests' tiny models (``tests/tiny_models.py``).
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

SPECIAL = ["<unk>", "<s>", "</s>", "<pad>", "<image>", "<video>"]
WORDS = (
    "USER ASSISTANT : . , ? ! a an the is are of in on to and what which where how many color colour shape "
    "image video picture describe there red green blue yellow circle square triangle left right top bottom "
    "small large one two three four five yes no moving up down first then"
).split()


def basic_tokenizer(extra_words: int = 200) -> PreTrainedTokenizerFast:
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


def llama_config(tokenizer: PreTrainedTokenizerFast, **values) -> LlamaConfig:
    """A Llama text config with the tokenizer's vocabulary size and special ids; ``values`` set the rest."""
    config = dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config.update(values)
    return LlamaConfig(**config)


def random_init(model: torch.nn.Module, seed: int) -> torch.nn.Module:
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


def random_llava(
    tokenizer: PreTrainedTokenizerFast, vision: CLIPVisionConfig, text: LlamaConfig, seed: int = 0
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """LlavaForConditionalGeneration (LLaVA-1.5 layout: CLIP tower, layer -2, CLS dropped) with
    ``random_init`` weights, and its processor (square images of the tower's size)."""
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    model = random_init(LlavaForConditionalGeneration(config), seed)
    processor = llava_processor(
        LlavaProcessor, LlavaImageProcessorPil(**square_image_kwargs(vision.image_size)), tokenizer, vision.patch_size
    )
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


# --- Qwen-VL: a word-level tokenizer with Qwen's special tokens and chat template, its image processor

QWEN_SPECIAL = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]

# Qwen's chat template, cut down: media first in the user turn, as <|vision_start|><|pad|><|vision_end|>.
QWEN_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def qwen_tokenizer(extra_words: int = 200):
    tokenizer = word_tokenizer(WORDS + ["user", "assistant", "system"] + [f"w{i}" for i in range(extra_words)])
    tokenizer.add_tokens(QWEN_SPECIAL, special_tokens=True)
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    return tokenizer


def qwen_image_processor(patch_size: int, min_tokens: int = 4, max_tokens: int = 64):
    """Qwen's PIL image processor (images resized to multiples of 2 patches, between ``min_tokens`` and
    ``max_tokens`` merged tokens)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    factor = patch_size * 2
    return Qwen2VLImageProcessorPil(
        patch_size=patch_size,
        merge_size=2,
        temporal_patch_size=2,
        size={"shortest_edge": min_tokens * factor * factor, "longest_edge": max_tokens * factor * factor},
    )


def random_qwen_vl(model_class, tokenizer, text: dict, vision: dict, image_processor, seed: int = 0):
    """A Qwen-VL model (``model_class``: ``Qwen2_5_VLForConditionalGeneration`` or
    ``Qwen3VLForConditionalGeneration``) with ``random_init`` weights, the tokenizer's ids for its
    special tokens and vocabulary, and its torchvision-free processor. ``text`` / ``vision``: the
    sizes of its text and vision configs."""
    from operators.families.qwen2_5_vl import QwenProcessor

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL}
    special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    text = {"vocab_size": len(tokenizer), **special, "pad_token_id": tokenizer.pad_token_id, **text}
    config = model_class.config_class(
        text_config=text,
        vision_config={"out_hidden_size": text["hidden_size"], **vision},
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    model = random_init(model_class(config), seed)
    copy_generation_ids(model, tokenizer)
    return model, QwenProcessor(tokenizer, image_processor)
