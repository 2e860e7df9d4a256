"""Qwen2.5-VL through the engine, on a tiny random-weight model: M-RoPE positions, greedy equal to
HF ``generate``, pruning budgets with original positions, SSD, and the CLS-free VisPruner score."""

import copy

import numpy as np
import pytest
import torch
import transformers.models.qwen2_5_vl.modeling_qwen2_5_vl as hf_qwen

from operators import prefill as prefill_module
from operators.engine import Engine, EngineConfig, Request, format_prompt
from operators.twig import grow_twig
from tests.conftest import random_image, random_video
from tests.tiny_qwen import tiny_qwen2_5_vl

QUESTIONS = ["what is this ?", "describe the image in one two three words please", "red ?", "how many ?"]


@pytest.fixture(scope="module")
def qwen():
    return tiny_qwen2_5_vl(seed=0)


def requests_mixed(processor, count=4):
    """Images of different sizes and a video (odd frame count: the last step repeats its frame)."""
    out = []
    for i in range(count):
        question = QUESTIONS[i % len(QUESTIONS)]
        if i % 3 == 2:
            out.append(Request(format_prompt(processor, question, "video"), video=random_video(i, frames=5)))
        else:
            image = random_image(i, height=40 + 16 * i, width=56 - 8 * i)
            out.append(Request(format_prompt(processor, question), images=[image]))
    return out


def hf_inputs(model, row):
    """HF forward/generate kwargs for one preprocessed row (flattened patches, grids, token types)."""
    ids = row.input_ids[None]
    types = torch.zeros_like(ids)
    types[ids == model.config.image_token_id] = 1
    types[ids == model.config.video_token_id] = 2
    kwargs = {"input_ids": ids, "mm_token_type_ids": types}
    for kind, pixels_key, grid_key in (
        ("image", "pixel_values", "image_grid_thw"),
        ("video", "pixel_values_videos", "video_grid_thw"),
    ):
        items = [m for m in row.media if m.kind == kind]
        if items:
            kwargs[pixels_key] = torch.cat([m.pixel_values.reshape(-1, m.pixel_values.shape[-1]) for m in items])
            kwargs[grid_key] = torch.tensor([m.grid for m in items])
    return kwargs


def hf_generate(model, adapter, request, max_new_tokens):
    row = adapter.preprocess(request.prompt, request.images, request.video)
    out = model.generate(**hf_inputs(model, row), max_new_tokens=max_new_tokens, do_sample=False)
    tokens = out[0, row.input_ids.shape[0] :].tolist()
    eos = model.generation_config.eos_token_id
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


# --- (a) positions -------------------------------------------------------------------------------


def test_positions_equal_hf_get_rope_index(qwen):
    model, processor = qwen
    engine = Engine(model, processor, EngineConfig(max_new_tokens=4))
    two_images = Request(
        "<|vision_start|><|image_pad|><|vision_end|> left and <|vision_start|><|image_pad|><|vision_end|> right ?",
        images=[random_image(7, 32, 64), random_image(8, 48, 40)],
    )
    requests = [*requests_mixed(processor), two_images]
    for request in requests:
        row = engine.adapter.preprocess(request.prompt, request.images, request.video)
        kwargs = hf_inputs(model, row)
        reference, _ = model.model.get_rope_index(
            kwargs["input_ids"],
            kwargs["mm_token_type_ids"],
            image_grid_thw=kwargs.get("image_grid_thw"),
            video_grid_thw=kwargs.get("video_grid_thw"),
        )
        assert torch.equal(row.positions, reference[:, 0].T)
    # The left-padded batch keeps each row's positions on its real tokens.
    batch = engine.prompt_batch(requests)
    assert batch.positions.shape == (len(requests), batch.embeds.shape[1], 3)
    for b, request in enumerate(requests):
        row = engine.adapter.preprocess(request.prompt, request.images, request.video)
        assert torch.equal(batch.positions[b][batch.valid[b]], row.positions)


def test_video_temporal_positions_are_spaced_by_seconds_per_step(qwen):
    model, processor = qwen
    engine = Engine(model, processor, EngineConfig(max_new_tokens=4))
    row = engine.adapter.preprocess(format_prompt(processor, "red ?", "video"), video=random_video(1, frames=4))
    item = row.media[0]
    assert item.grid[0] == 2 and item.pixel_values.shape[0] == 2  # 4 frames -> 2 temporal steps (segments)
    visual = row.input_ids == model.config.video_token_id
    t = row.positions[visual, 0]
    interval = model.config.vision_config.tokens_per_second * item.seconds_per_step
    assert t.max() - t.min() == interval


# --- video patches without torchvision ----------------------------------------------------------


def test_two_identical_frames_equal_the_image_path(qwen):
    model, processor = qwen
    engine = Engine(model, processor, EngineConfig(max_new_tokens=4))
    image = random_image(3, 40, 56)
    video = np.stack([np.asarray(image)] * 2)
    as_image = engine.adapter.image_input(image)
    as_video = engine.adapter.video_input(video)
    assert as_video.grid == as_image.grid
    assert torch.equal(as_video.pixel_values, as_image.pixel_values)


def test_video_steps_pack_consecutive_frames(qwen):
    model, processor = qwen
    adapter = Engine(model, processor, EngineConfig(max_new_tokens=4)).adapter
    frames = random_video(5, frames=3)
    video = adapter.video_input(frames)
    singles = [adapter.image_input(frame) for frame in [*frames, frames[-1]]]  # odd count: last frame repeats
    vision = model.config.vision_config
    shape = (-1, vision.in_channels, vision.temporal_patch_size, vision.patch_size, vision.patch_size)
    for step in range(2):
        packed = video.pixel_values[step].view(shape)
        for t in range(2):
            assert torch.equal(packed[:, :, t], singles[2 * step + t].pixel_values[0].view(shape)[:, :, 0])


def test_prompt_and_media_must_agree(qwen):
    model, processor = qwen
    adapter = Engine(model, processor, EngineConfig(max_new_tokens=4)).adapter
    with pytest.raises(ValueError, match="image tag"):
        adapter.preprocess(format_prompt(processor, "what ?"), images=[])
    with pytest.raises(ValueError, match="video tag"):
        adapter.preprocess("what ?", video=random_video(0))
    with pytest.raises(ValueError, match="pad_to_square"):
        Engine(model, processor, EngineConfig(max_new_tokens=4, pad_to_square=True))


# --- (b) greedy equals HF generate ---------------------------------------------------------------


def test_unpruned_greedy_equals_hf_generate_batch_1_and_4(qwen):
    model, processor = qwen
    engine = Engine(model, processor, EngineConfig(max_new_tokens=8))
    requests = requests_mixed(processor, 4)
    references = [hf_generate(model, engine.adapter, r, 8) for r in requests]
    batched = engine.generate(requests)
    for request, result, reference in zip(requests, batched, references, strict=True):
        assert result.token_ids == reference
        assert result.visual_tokens_kept == result.visual_tokens_total
        assert engine.generate([request])[0].token_ids == reference


# --- (c) pruning keeps the budget with original positions ----------------------------------------


def kept_positions_are_original(engine, requests, batch_positions, batch_valid, batch_visual):
    """Every kept visual token's (t, h, w) is one of its row's unpruned visual positions, once."""
    for b, request in enumerate(requests):
        row = engine.adapter.preprocess(request.prompt, request.images, request.video)
        visual_ids = torch.isin(row.input_ids, torch.tensor(sorted(engine.adapter.placeholder_ids)))
        original = {tuple(p) for p in row.positions[visual_ids].tolist()}
        kept = [tuple(p) for p in batch_positions[b][batch_valid[b] & batch_visual[b]].tolist()]
        assert len(set(kept)) == len(kept) and set(kept) <= original
        text = batch_positions[b][batch_valid[b] & ~batch_visual[b]]
        assert torch.equal(text, row.positions[~visual_ids])  # text keeps its own positions


@pytest.mark.parametrize("method", ["vispruner", "random", "pool"])
def test_before_llm_methods_keep_the_budget_per_segment(qwen, method):
    model, processor = qwen
    budget = 4
    engine = Engine(model, processor, EngineConfig(method, budget=budget, max_new_tokens=4))
    requests = requests_mixed(processor, 3)
    batch = engine.prompt_batch(requests)
    for b, segments in enumerate(batch.segments):
        assert int((batch.visual[b] & batch.valid[b]).sum()) == budget * segments
    kept_positions_are_original(engine, requests, batch.positions, batch.valid, batch.visual)
    results = engine.generate(requests)
    for result, segments in zip(results, batch.segments, strict=True):
        assert result.visual_tokens_kept == budget * segments


def record_compactions(monkeypatch):
    seen = []
    original = prefill_module._compact

    def recording(keep, hidden, positions, visual, prunable):
        out = original(keep, hidden, positions, visual, prunable)
        seen.append(out)
        return out

    monkeypatch.setattr(prefill_module, "_compact", recording)
    return seen


@pytest.mark.parametrize("method", ["fastv", "ttp"])
def test_in_llm_methods_keep_the_budget_with_original_positions(qwen, method, monkeypatch):
    model, processor = qwen
    budget = 3
    twig = grow_twig(model, K=2, T=1) if method == "ttp" else None
    config = EngineConfig(method, budget=budget, max_new_tokens=4, fastv_layer=2, finalwipe_layer=4)
    engine = Engine(model, processor, config, twig=twig)
    requests = requests_mixed(processor, 3)
    batch = engine.prompt_batch(requests)
    seen = record_compactions(monkeypatch)
    results = engine.generate(requests)
    valid, _, positions, visual, _ = seen[0]  # the pruning at K (a single sub-batch)
    kept_positions_are_original(engine, requests, positions, valid, visual)
    for b, result in enumerate(results):
        assert int((visual[b] & valid[b]).sum()) == budget * batch.segments[b]
        assert result.visual_tokens_kept == budget * batch.segments[b]


def test_fastv_with_nothing_pruned_equals_none(qwen):
    model, processor = qwen
    requests = requests_mixed(processor, 3)
    none = Engine(model, processor, EngineConfig(max_new_tokens=6)).generate(requests)
    fastv = Engine(model, processor, EngineConfig("fastv", budget=10_000, max_new_tokens=6)).generate(requests)
    assert [r.token_ids for r in fastv] == [r.token_ids for r in none]


@pytest.mark.parametrize("method", ["vispruner", "fastv"])
def test_pruned_batch_equals_each_row_alone(qwen, method):
    model, processor = qwen
    engine = Engine(model, processor, EngineConfig(method, budget=5, max_new_tokens=6))
    requests = requests_mixed(processor, 3)
    for request, result in zip(requests, engine.generate(requests), strict=True):
        assert engine.generate([request])[0].token_ids == result.token_ids


# --- (d) SSD equals greedy -----------------------------------------------------------------------


@pytest.mark.parametrize("method,budget", [("none", None), ("vispruner", 4)])
def test_ssd_equals_greedy(qwen, method, budget):
    model, processor = qwen
    twig = grow_twig(model, K=2, T=1)
    requests = requests_mixed(processor, 3)
    greedy = Engine(model, processor, EngineConfig(method, budget=budget, max_new_tokens=10)).generate(requests)
    config = EngineConfig(method, budget=budget, max_new_tokens=10, decode_strategy="ssd", draft_threshold=0.0)
    ssd = Engine(model, processor, config, twig=twig).generate(requests)
    assert [r.token_ids for r in ssd] == [r.token_ids for r in greedy]
    assert sum(r.accepted for r in ssd) > 0  # the twig's drafts were used, not only the base's bonus


# --- (e) the CLS-free VisPruner score ------------------------------------------------------------


def reference_scores(model, pixels, grid_thw, block):
    """Independent of the adapter: a copy of the tower on eager attention, HF's own attention
    probabilities of ``block`` recorded per chunk, mean over queries and heads, the tower's window
    order undone with HF's own reverse permutation (as its merger output), then the mean over each
    2x2 merge group (4 consecutive patches)."""
    tower = copy.deepcopy(model.model.visual)
    tower.config._attn_implementation = "eager"
    probs, windows = [], []
    target = tower.blocks[block].attn
    original_eager = hf_qwen.eager_attention_forward

    def recording(module, *args, **kwargs):
        out, weights = original_eager(module, *args, **kwargs)
        if module is target:
            probs.append(weights[0])  # [H, n, n]
        return out, weights

    permute = tower.permute_input_for_window_attn

    def record_window(tensor, window_index, seq_len):
        windows.append(window_index)
        return permute(tensor, window_index, seq_len)

    tower.permute_input_for_window_attn = record_window
    hf_qwen.eager_attention_forward = recording
    try:
        with torch.no_grad():
            tower(pixels, grid_thw=grid_thw)
    finally:
        hf_qwen.eager_attention_forward = original_eager
    received = torch.cat([p.float().mean(dim=1).mean(dim=0) for p in probs])  # [P] window order
    per_group = received.view(-1, 4).mean(dim=1)  # window order of merge groups
    return per_group[torch.argsort(windows[0])], windows[0]


def test_cls_free_score_equals_independent_reference(qwen):
    model, processor = qwen
    adapter = Engine(model, processor, EngineConfig("vispruner", budget=4, max_new_tokens=4)).adapter
    items = [
        adapter.image_input(random_image(0, 40, 56)),
        adapter.video_input(random_video(2, frames=4, height=48, width=32)),
        adapter.image_input(random_image(1, 64, 48)),
    ]
    pixels = torch.cat([m.pixel_values.reshape(-1, m.pixel_values.shape[-1]) for m in items])
    grid_thw = torch.tensor([m.grid for m in items])
    reference, window_index = reference_scores(model, pixels, grid_thw, adapter.score_block())
    assert not torch.equal(window_index, torch.arange(len(window_index)))  # windows do reorder patches
    ours = torch.cat([s.cls_attention.reshape(-1) for s in adapter.encode_items("image", items)])
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-7)
    # Each temporal step's (or image's) queries spread one unit of attention per query.
    for seg in adapter.encode_items("image", items):
        steps = seg.cls_attention.shape[0]
        torch.testing.assert_close(seg.cls_attention.sum(dim=1) * 4, torch.ones(steps))  # 4 patches per token
        assert seg.patches.shape[:2] == seg.cls_attention.shape


def test_merged_tokens_equal_hf_image_features(qwen):
    model, processor = qwen
    adapter = Engine(model, processor, EngineConfig(max_new_tokens=4)).adapter
    items = [adapter.image_input(random_image(0, 40, 56)), adapter.image_input(random_image(1, 64, 48))]
    pixels = torch.cat([m.pixel_values.reshape(-1, m.pixel_values.shape[-1]) for m in items])
    grid_thw = torch.tensor([m.grid for m in items])
    with torch.no_grad():
        reference = model.model.get_image_features(pixels, grid_thw).pooler_output
    for seg, ref in zip(adapter.encode_items("image", items), reference, strict=True):
        torch.testing.assert_close(seg.patches.reshape(-1, seg.patches.shape[-1]), ref)
