"""The demo-model training job: its pieces agree with inference, and it runs end to end."""

import json

import numpy as np
import torch
from PIL import Image

from jobs.train_demo_model import main as train_main
from operators.engine import Engine, EngineConfig, Request, format_prompt
from operators.loading import load_vlm
from synthetic.demo_model import DemoModelConfig, build_processor, build_tokenizer
from synthetic.train_demo import Example, build_sequences, examples_for, pixel_tensor
from synthetic.world import WorldConfig, make_item, words


def test_pixel_tensor_equals_the_image_processor():
    world, model_cfg = WorldConfig(), DemoModelConfig()
    processor = build_processor(build_tokenizer(world), world, model_cfg)
    frames = np.stack([make_item(3, i, "image", world).frames[0] for i in range(3)])
    expected = processor.image_processor(images=[Image.fromarray(f) for f in frames], return_tensors="pt")
    torch.testing.assert_close(pixel_tensor(frames, processor.image_processor), expected["pixel_values"])


def test_training_prompts_tokenise_like_the_inference_processor():
    world, model_cfg = WorldConfig(), DemoModelConfig()
    tokenizer = build_tokenizer(world)
    processor = build_processor(tokenizer, world, model_cfg)
    per_frame = (world.image_size // model_cfg.patch_size) ** 2
    for kind in ("image", "video"):
        item = make_item(5, 0, kind, world)
        rows = [0] if kind == "image" else list(range(model_cfg.frames_per_video))
        example = examples_for(item, rows, __import__("random").Random(0), 0.0)[0]
        ids, target, mask = build_sequences(
            tokenizer, [example], processor.tokenizer.convert_tokens_to_ids("<image>"), per_frame
        )
        frames = [Image.fromarray(item.frames[0])] * len(rows)
        prompt = format_prompt(processor, item.qa[0].question, kind).replace("<video>", "<image>" * len(rows))
        inference = processor(text=prompt, images=frames, return_tensors="pt")["input_ids"][0]
        n_prompt = len(inference)
        assert ids[0, :n_prompt].tolist() == inference.tolist()
        assert (target[0, :n_prompt] == -100).all()  # loss only on the answer
        answer = tokenizer.decode(target[0, n_prompt:][target[0, n_prompt:] != -100].tolist(), skip_special_tokens=True)
        assert answer.split() == words(item.qa[0].answer)


def test_every_world_word_is_in_the_tokenizer():
    world = WorldConfig()
    tokenizer = build_tokenizer(world)
    vocab = tokenizer.get_vocab()
    for i in range(30):
        for kind in ("image", "video"):
            item = make_item(11, i, kind, world)
            texts = [item.caption] + [q.question for q in item.qa] + [q.answer for q in item.qa]
            assert all(w in vocab for t in texts for w in words(t))


def test_quick_training_run_writes_a_loadable_checkpoint(tmp_path):
    out = tmp_path / "model"
    train_main(["--out", str(out), "--quick", "--eval-seed", "5"])
    report = json.loads((out / "training_report.json").read_text())
    assert set(report["held_out"]) == {"image", "video"}
    assert 0.0 <= report["held_out"]["image"]["real"]["all"] <= 1.0
    model, processor = load_vlm(out)
    item = make_item(9, 0, "video", WorldConfig())
    request = Request(format_prompt(processor, item.qa[0].question, "video"), video=item.frames[:4])
    result = Engine(model, processor, EngineConfig("vispruner", budget=7, max_new_tokens=3)).generate([request])[0]
    assert result.visual_tokens_kept == 4 * 7


def test_examples_cover_every_qa_pair_and_a_caption():
    item = make_item(1, 2, "image", WorldConfig())
    examples = examples_for(item, [0], __import__("random").Random(0), 0.0)
    assert [e.answer for e in examples[: len(item.qa)]] == [q.answer for q in item.qa]
    assert examples[-1].answer == item.caption and isinstance(examples[-1], Example)
