"""The demo-model training job: its pieces agree with inference, and it runs end to end."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPTextModel, CLIPVisionModel

from operators.engine import Engine, EngineConfig, Request, format_prompt
from operators.loading import load_vlm
from synthetic import world
from synthetic.world import SHAPES, Item, WorldConfig, make_item, words
from training.demo_cli import main as train_main
from training.demo_model import (
    DemoModelConfig,
    build_llava,
    build_processor,
    build_tokenizer,
    clip_text_config,
    vision_config,
)
from training.train_demo import (
    ContrastivePair,
    Example,
    build_sequences,
    examples_for,
    lm_loss,
    object_regions,
    pack_items,
    pixel_tensor,
)


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


@pytest.mark.parametrize(
    "flags,expected",
    [
        ([], {"stage1_region_steps": 0, "stage2_pack": False, "stage2_steps": 4}),
        (
            ["--stage1-region-steps", "2", "--stage1-region-loss", "1", "--stage2-pack", "--stage2-steps", "3"],
            {"stage1_region_steps": 2, "stage1_region_loss": 1.0, "stage2_pack": True, "stage2_steps": 3},
        ),
    ],
)
def test_quick_training_run_writes_a_loadable_checkpoint(tmp_path, flags, expected):
    out = tmp_path / "model"
    train_main(["--out", str(out), "--quick", "--eval-seed", "5", *flags])
    report = json.loads((out / "training_report.json").read_text())
    assert {key: report["train"][key] for key in expected} == expected
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


def _scene_with(*objects: dict) -> Item:
    return Item(
        "img_0", "image", np.zeros((1, 64, 64, 3), np.uint8), "", [], {"image_size": 64, "objects": list(objects)}
    )


def test_object_regions_weigh_each_patch_by_the_objects_pixels_in_it():
    square = {"shape": "square", "colour": "blue", "size_px": 8, "boxes": [[8, 16, 16, 24]]}  # exactly patch (2, 1)
    regions, shapes = object_regions(_scene_with(square), 8, 4)
    assert regions.shape == (4, 64) and regions.dtype == np.float32
    expected = np.zeros((4, 64), np.float32)
    expected[0, 2 * 8 + 1] = 1.0
    assert np.array_equal(regions, expected)
    assert shapes.tolist() == [SHAPES.index("square"), -100, -100, -100]

    # A 12 px triangle (x 30..41, y 4..15) and a 6 px circle (x 44..49, y 6..11) 2 px apart share patch (1, 5)
    # (x 40..47, y 8..15): 4 triangle pixels and 13 circle pixels are there.
    triangle = {"shape": "triangle", "colour": "red", "size_px": 12, "boxes": [[30, 4, 42, 16]]}
    circle = {"shape": "circle", "colour": "green", "size_px": 6, "boxes": [[44, 6, 50, 12]]}
    late = {"shape": "diamond", "colour": "red", "size_px": 6, "boxes": [None]}  # appears after frame 0
    regions, shapes = object_regions(_scene_with(triangle, circle, late), 8, 4)
    index = world.object_index_map(_scene_with(triangle, circle).scene)
    pixels = [int((index == i).sum()) for i in (1, 2)]
    tri, circ = regions[0].reshape(8, 8), regions[1].reshape(8, 8)
    assert tri[1, 5] * pixels[0] == pytest.approx(4) and circ[1, 5] * pixels[1] == pytest.approx(13)
    assert set(np.flatnonzero(tri)) == {4, 8 + 3, 8 + 4, 8 + 5} and set(np.flatnonzero(circ)) == {5, 6, 8 + 5, 8 + 6}
    np.testing.assert_allclose(regions[:2].sum(1), 1.0, rtol=1e-6)
    assert not regions[2:].any()
    assert shapes.tolist() == [SHAPES.index("triangle"), SHAPES.index("circle"), -100, -100]


def test_the_region_loss_reaches_the_tower_and_learns_shapes():
    """A few steps on a handful of images fit the shapes: the loss flows through the pooling into the tower."""
    world, model_cfg = WorldConfig(), DemoModelConfig(vision_width=64, vision_layers=2, clip_text_layers=1)
    tokenizer = build_tokenizer(world)
    processor = build_processor(tokenizer, world, model_cfg)
    items = [make_item(8, i, "image", world) for i in range(12)]
    pixels = pixel_tensor(np.stack([it.frames[0] for it in items]), processor.image_processor)
    found = [object_regions(it, model_cfg.patch_size, world.max_objects) for it in items]
    regions, shapes = (torch.from_numpy(np.stack(parts)) for parts in zip(*found, strict=True))
    torch.manual_seed(0)
    vision = CLIPVisionModel(vision_config(world, model_cfg))
    pair = ContrastivePair(vision, CLIPTextModel(clip_text_config(tokenizer, model_cfg)), model_cfg.vision_width)
    stem = vision.get_input_embeddings().weight
    before = stem.detach().clone()
    optimizer = torch.optim.AdamW(pair.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = pair.region_loss(pair.patch_features(pixels), regions, shapes)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses
    assert not torch.equal(before, stem)  # the gradient reaches the tower's first layer


def _item_groups(model_cfg: DemoModelConfig, caption_share: float) -> list[list[Example]]:
    groups, row, rng = [], 0, __import__("random").Random(0)
    for kind, index in (("image", 0), ("video", 1), ("image", 2)):
        item = make_item(3, index, kind, WorldConfig())
        frames = 1 if kind == "image" else model_cfg.frames_per_video
        groups.append(examples_for(item, list(range(row, row + frames)), rng, caption_share))
        row += frames
    return groups


def test_packed_items_give_the_loss_of_their_examples_as_separate_sequences():
    """Packing shares each item's image tokens between its examples without letting them see each other:
    the loss and its gradient equal those of the same examples one sequence each."""
    world, model_cfg = WorldConfig(), DemoModelConfig(text_width=64, text_layers=2, text_ffn=128, vision_layers=1)
    tokenizer = build_tokenizer(world)
    torch.manual_seed(0)
    llava = build_llava(tokenizer, world, model_cfg)
    per_frame = (world.image_size // model_cfg.patch_size) ** 2
    groups = _item_groups(model_cfg, caption_share=0.5)
    assert sum(len(g) > len(make_item(3, 0, "image", world).qa) for g in groups) >= 2  # captions are in
    features = torch.randn(sum(len(g[0].frames) for g in groups), per_frame, model_cfg.vision_width)
    flat = [ex for g in groups for ex in g]
    image_id = llava.config.image_token_id

    def loss_and_grad(ids, target, mask, rows, positions=None):
        llava.zero_grad()
        loss = lm_loss(llava, ids, target, mask, features[torch.tensor(rows)], positions)
        loss.backward()
        return loss.detach(), llava.model.multi_modal_projector.linear_1.weight.grad.clone()

    ids, target, mask = build_sequences(tokenizer, flat, image_id, per_frame)
    expected = loss_and_grad(ids, target, mask, [r for ex in flat for r in ex.frames])
    p_ids, p_target, positions, p_mask = pack_items(tokenizer, groups, image_id, per_frame)
    got = loss_and_grad(p_ids, p_target, p_mask, [r for g in groups for r in g[0].frames], positions)

    assert p_ids.shape[0] == len(groups) and p_ids.numel() < ids.numel() / 3
    assert (p_target != -100).sum() == (target != -100).sum()  # every answer token, once
    assert (p_ids == image_id).sum() == sum(len(g[0].frames) for g in groups) * per_frame  # image tokens once
    torch.testing.assert_close(got[0], expected[0])
    torch.testing.assert_close(got[1], expected[1])


def test_packed_branches_see_the_prefix_and_themselves_only():
    world, model_cfg = WorldConfig(), DemoModelConfig()
    tokenizer = build_tokenizer(world)
    per_frame = (world.image_size // model_cfg.patch_size) ** 2
    group = _item_groups(model_cfg, caption_share=0.0)[0]
    ids, target, positions, mask = pack_items(tokenizer, [group], tokenizer.convert_tokens_to_ids("<image>"), per_frame)
    mask, positions = mask[0, 0], positions[0].tolist()
    # every branch after the first restarts its positions where the shared prefix ends
    restarts = [i for i in range(1, len(positions)) if positions[i] <= positions[i - 1]]
    prefix = positions[restarts[0]]
    starts = [prefix, *restarts]
    assert len(starts) == len(group) and all(positions[s] == prefix for s in starts)
    assert (ids[0, :prefix] == tokenizer.convert_tokens_to_ids("<image>")).sum() == per_frame
    assert (target[0, :prefix] == -100).all()
    for start, end in zip(starts, [*starts[1:], len(positions)], strict=True):
        for q in (start, end - 1):
            assert mask[q].nonzero().flatten().tolist() == list(range(prefix)) + list(range(start, q + 1))
