"""Each newer model family through the caption job (real local Ray), as a user would run it:
``configs/demo.yaml model.path=DIR`` with a saved tiny checkpoint (random weights, a word-level
tokenizer, the image processor, a chat template). Unpruned captions equal Hugging Face ``generate``
with the folder's own chat template; pruned runs keep exactly the budget of merged visual tokens
per segment; ``visual_tokens_total`` counts what the unpruned language model sees; every row ok."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from pipeline.config import load_config
from pipeline.output import read_output
from pipeline.run import run
from synthetic.corpus import write_corpus
from tests.tiny_models import save_tiny

pytestmark = pytest.mark.timeout(600)
PROMPT = "describe the image ."
BUDGET = 3


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    directory = tmp_path_factory.mktemp("corpus")
    write_corpus(str(directory), seed=5, n_images=3, n_videos=1)
    return directory


def caption(directory, corpus, out, *overrides):
    keys = [
        f"model.path='{directory}'",
        f"input.uri='{corpus}'",
        f"output.uri='{out}'",
        f"prompt.caption='{PROMPT}'",
        "ray.progress_bars=false",
        "decode.max_new_tokens=6",
        "media.num_frames=4",
        *overrides,
    ]
    summary = run(load_config("configs/demo.yaml", keys), log=lambda *_: None)
    rows = {r["item_id"]: r for r in read_output(str(out)).to_pylist()}
    assert (summary.ok, summary.errors) == (4, 0) and all(r["status"] == "ok" for r in rows.values())
    return rows


def hf_qwen_caption(directory, image: Image.Image) -> tuple[str, int]:
    """Hugging Face's own model and generate, prompted as its processor does: the folder's chat template,
    then one <|image_pad|> per merged token, with the token types it returns. -> (text, merged tokens)."""
    from transformers import AutoModelForImageTextToText

    from operators.families.qwen2_5_vl import QwenProcessor

    processor = QwenProcessor.from_pretrained(directory)
    model = AutoModelForImageTextToText.from_pretrained(directory).eval()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    pixels = processor.image_processor(images=[image], return_tensors="pt")
    merged = int(pixels["image_grid_thw"].prod()) // model.config.vision_config.spatial_merge_size**2
    prompt = prompt.replace("<|image_pad|>", "<|image_pad|>" * merged)
    ids = processor.tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            mm_token_type_ids=(ids == model.config.image_token_id).long(),  # as the processor returns them
            pixel_values=pixels["pixel_values"],
            image_grid_thw=pixels["image_grid_thw"],
            max_new_tokens=6,
            do_sample=False,
        )
    return processor.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True), merged


@pytest.mark.parametrize("family", ["qwen2_5_vl", pytest.param("qwen3_vl", marks=pytest.mark.slow)])
def test_a_qwen_checkpoint_through_the_caption_job(family, ray_local, corpus, tmp_path):
    directory = save_tiny(family, tmp_path / family)
    unpruned = caption(directory, corpus, tmp_path / "none", "pruning.method=none", "pruning.budget=null")
    for row in unpruned.values():
        assert row["visual_tokens_kept"] == row["visual_tokens_total"] > 0
        if row["media_type"] == "image":
            image = Image.open(row["uri"].removeprefix("file://")).convert("RGB")
            text, merged = hf_qwen_caption(directory, image)
            assert row["text"] == text.strip()
            assert row["visual_tokens_total"] == merged  # merged tokens, what the LM sees
    video = next(r for r in unpruned.values() if r["media_type"] == "video")
    steps = 2  # 4 frames, 2 per temporal step: the video's budget segments
    for method in ("vispruner", "fastv"):
        pruned = caption(directory, corpus, tmp_path / method, f"pruning.method={method}", f"pruning.budget={BUDGET}")
        for item, row in pruned.items():
            segments = steps if row["media_type"] == "video" else 1
            assert row["visual_tokens_total"] == unpruned[item]["visual_tokens_total"]
            assert row["visual_tokens_kept"] == BUDGET * segments, (method, row["media_type"])
    assert video["visual_tokens_total"] % steps == 0


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava_onevision"])
def test_a_dry_run_says_how_the_visual_tokens_of_an_image_are_counted(family, corpus, tmp_path):
    from pipeline.api import dry_run

    directory = save_tiny(family, tmp_path / family)
    text = dry_run("configs/demo.yaml", [f"model.path='{directory}'"], input=str(corpus), output=str(tmp_path / "o"))
    line = next(line for line in text.splitlines() if line.startswith("model:"))
    assert f"model_type {family}" in line and "pruning keeps 21 (kept)" in line
    if family == "qwen2_5_vl":
        assert "one per 8x8 px of the image" in line and "per temporal step" in line
    else:
        assert "per crop" in line and "AnyRes" in line
    assert not (tmp_path / "o").exists()
