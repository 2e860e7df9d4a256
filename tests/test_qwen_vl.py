"""Qwen2.5-VL and Qwen3-VL through the engine, on tiny random-weight models: M-RoPE positions, greedy
equal to HF ``generate``, pruning budgets with original positions, SSD, the CLS-free VisPruner score,
and Qwen3-VL's DeepStack features following the kept tokens."""

import copy
import json

import numpy as np
import pytest
import torch
import transformers.models.qwen2_5_vl.modeling_qwen2_5_vl as hf_qwen2_5
import transformers.models.qwen3_vl.modeling_qwen3_vl as hf_qwen3

from operators import prefill as prefill_module
from operators.engine import Engine, EngineConfig, Request, format_prompt
from operators.families.qwen3_vl import step_timestamps
from operators.loading import load_vlm
from operators.twig import grow_twig
from tests.conftest import random_image, random_video
from tests.tiny_qwen import tiny_qwen2_5_vl, tiny_qwen3_vl

QUESTIONS = ["what is this ?", "describe the image in one two three words please", "red ?", "how many ?"]


BUILDERS = {"qwen2_5_vl": tiny_qwen2_5_vl, "qwen3_vl": tiny_qwen3_vl}
HF_MODULES = {"qwen2_5_vl": hf_qwen2_5, "qwen3_vl": hf_qwen3}


@pytest.fixture(scope="module", params=list(BUILDERS))
def qwen(request):
    return BUILDERS[request.param](seed=0)


@pytest.fixture(scope="module")
def qwen3():
    return tiny_qwen3_vl(seed=0)


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
            grids = [list(m.grid) for m in items]
            if kind == "video":  # one video a row (Qwen3-VL holds it as one item per temporal step)
                grids = [[sum(g[0] for g in grids), *grids[0][1:]]]
            kwargs[grid_key] = torch.tensor(grids)
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


def test_video_temporal_positions_are_spaced_by_seconds_per_step():
    model, processor = tiny_qwen2_5_vl(seed=0)
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
    with pytest.raises(ValueError, match="at least one frame"):
        adapter.preprocess(format_prompt(processor, "what ?", "video"), video=random_video(0)[:0])
    with pytest.raises(ValueError, match="pad_to_square"):
        Engine(model, processor, EngineConfig(max_new_tokens=4, pad_to_square=True))


def test_saved_checkpoint_loads_and_generates_the_same(qwen, tmp_path):
    model, processor = qwen
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    # A checkpoint whose template sits beside the processor only (chat_template.json) still has one.
    template = (tmp_path / "chat_template.jinja").read_text()
    (tmp_path / "chat_template.jinja").unlink()
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    loaded, loaded_processor = load_vlm(tmp_path)
    assert loaded_processor.chat_template == template
    request = Request(format_prompt(loaded_processor, "red ?"), images=[random_image(0)])
    ours = Engine(model, processor, EngineConfig(max_new_tokens=5)).generate([request])
    theirs = Engine(loaded, loaded_processor, EngineConfig(max_new_tokens=5)).generate([request])
    assert theirs[0].token_ids == ours[0].token_ids


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


@pytest.mark.parametrize("method", ["vispruner", pytest.param("random", marks=pytest.mark.slow), "pool"])
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

    def recording(keep, hidden, positions, visual, prunable, deepstack=None):
        out = original(keep, hidden, positions, visual, prunable, deepstack)
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
    valid, _, positions, visual, _, _ = seen[0]  # the pruning at K (a single sub-batch)
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


@pytest.mark.parametrize("method,budget", [pytest.param("none", None, marks=pytest.mark.slow), ("vispruner", 4)])
def test_ssd_equals_greedy(qwen, method, budget):
    model, processor = qwen
    twig = grow_twig(model, K=2, T=1)
    requests = requests_mixed(processor, 3)
    greedy = Engine(model, processor, EngineConfig(method, budget=budget, max_new_tokens=10)).generate(requests)
    config = EngineConfig(method, budget=budget, max_new_tokens=10, decode_strategy="ssd", draft_threshold=0.0)
    ssd = Engine(model, processor, config, twig=twig).generate(requests)
    assert [r.token_ids for r in ssd] == [r.token_ids for r in greedy]
    assert sum(r.accepted for r in ssd) > 0  # the twig's drafts were used, not only the base's bonus


def test_ssd_equals_greedy_when_deepstack_levels_reach_past_the_twig(qwen3):
    """Qwen3-VL adds DeepStack levels after LM layers 0 and 1; with the twig on layer 1, SSD's folded
    prefill runs layer 1 in its first verification and must still add level 1 there."""
    model, processor = qwen3
    twig = grow_twig(model, K=1, T=1)
    requests = requests_mixed(processor, 3)
    greedy = Engine(model, processor, EngineConfig("vispruner", budget=4, max_new_tokens=8)).generate(requests)
    config = EngineConfig("vispruner", budget=4, max_new_tokens=8, decode_strategy="ssd", draft_threshold=0.0)
    ssd = Engine(model, processor, config, twig=twig).generate(requests)
    assert [r.token_ids for r in ssd] == [r.token_ids for r in greedy]


# --- (e) the CLS-free VisPruner score ------------------------------------------------------------


def reference_scores(model, pixels, grid_thw, block):
    """Independent of the adapter: a copy of the tower on eager attention, HF's own attention
    probabilities of ``block`` recorded per chunk, mean over queries and heads, the tower's window
    order undone with HF's own reverse permutation (as its merger output), then the mean over each
    2x2 merge group (4 consecutive patches)."""
    tower = copy.deepcopy(model.model.visual)
    tower.config._attn_implementation = "eager"
    hf_module = HF_MODULES[model.config.model_type]
    probs, windows = [], []
    target = tower.blocks[block].attn
    original_eager = hf_module.eager_attention_forward

    def recording(module, *args, **kwargs):
        out, weights = original_eager(module, *args, **kwargs)
        if module is target:
            probs.append(weights[0])  # [H, n, n]
        return out, weights

    permute = getattr(tower, "permute_input_for_window_attn", None)  # Qwen3-VL's tower has no windows

    def record_window(tensor, window_index, seq_len):
        windows.append(window_index)
        return permute(tensor, window_index, seq_len)

    if permute is not None:
        tower.permute_input_for_window_attn = record_window
    hf_module.eager_attention_forward = recording
    try:
        with torch.no_grad():
            tower(pixels, grid_thw=grid_thw)
    finally:
        hf_module.eager_attention_forward = original_eager
    received = torch.cat([p.float().mean(dim=1).mean(dim=0) for p in probs])  # [P] window order
    per_group = received.view(-1, 4).mean(dim=1)  # window order of merge groups
    if not windows:
        return per_group, None
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
    if model.config.model_type == "qwen2_5_vl":
        assert adapter.score_block() == model.config.vision_config.fullatt_block_indexes[-1]
        assert not torch.equal(window_index, torch.arange(len(window_index)))  # windows do reorder patches
    else:
        assert adapter.score_block() == model.config.vision_config.depth - 1
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
        reference = model.model.get_image_features(pixels, grid_thw)
    for i, seg in enumerate(adapter.encode_items("image", items)):
        torch.testing.assert_close(seg.patches.reshape(-1, seg.patches.shape[-1]), reference.pooler_output[i])
        if model.config.model_type == "qwen3_vl":
            for level, features in enumerate(reference.deepstack_features):
                torch.testing.assert_close(seg.deepstack[:, :, level].reshape(features[i].shape), features[i])
        else:
            assert seg.deepstack is None


# --- Qwen3-VL: video steps and DeepStack ---------------------------------------------------------


def test_qwen3_video_is_one_item_per_step_with_timestamps(qwen3):
    model, processor = qwen3
    adapter = Engine(model, processor, EngineConfig(max_new_tokens=4)).adapter
    row = adapter.preprocess(format_prompt(processor, "red ?", "video"), video=random_video(1, frames=5))
    assert [m.grid[0] for m in row.media] == [1, 1, 1]  # 5 frames -> 3 steps, each its own item
    text = processor.tokenizer.decode(row.input_ids)
    assert text.count("<|vision_start|>") == 4  # HF's processor nests the steps in the template's block
    prompt, _ = adapter.video_items("<|video_pad|>", random_video(1, frames=5))
    assert prompt.startswith("<0.2 seconds><|vision_start|><|video_pad|><|vision_end|><1.2 seconds>")
    assert step_timestamps(5, 2.0, 2) == [0.25, 1.25, 2.0]  # frames 0..4 (+ 4 again) at 2 fps, step means


def prefill_last_hidden(engine, requests):
    batch = engine.prompt_batch(requests)
    pruning = engine._in_llm_pruning(batch)
    state = prefill_module.prefill(engine.model, batch, engine.layer_plan, 1, None, pruning)
    return batch, state.last_hidden


def test_qwen3_pruned_deepstack_equals_hf_text_model_on_the_kept_tokens(qwen3):
    """VisPruner keeps 3 tokens a step: our prefill must equal HF's own text model given the kept
    embeddings, their positions and the kept DeepStack features at every level."""
    model, processor = qwen3
    engine = Engine(model, processor, EngineConfig("vispruner", budget=3, max_new_tokens=4))
    for request in requests_mixed(processor, 3):
        batch, ours = prefill_last_hidden(engine, [request])
        visual = batch.visual[0]
        levels = batch.deepstack.shape[2]
        with torch.no_grad():
            reference = model.model.language_model(
                inputs_embeds=batch.embeds,
                position_ids=batch.positions.permute(2, 0, 1),
                visual_pos_masks=batch.visual,
                deepstack_visual_embeds=[batch.deepstack[0, visual, level] for level in range(levels)],
            ).last_hidden_state[:, -1]
        torch.testing.assert_close(ours, reference)
        without = torch.zeros_like(batch.deepstack)
        assert not torch.allclose(batch.deepstack, without)  # the features are there and matter:
        batch.deepstack = None
        state = prefill_module.prefill(engine.model, batch, engine.layer_plan, 1)
        assert not torch.allclose(state.last_hidden, ours)


def test_qwen3_fastv_carries_deepstack_with_the_kept_tokens(qwen3, monkeypatch):
    """FastV at K=1 prunes before DeepStack's second level is added: the compacted features are the
    kept tokens' own, zero on text."""
    model, processor = qwen3
    engine = Engine(model, processor, EngineConfig("fastv", budget=3, fastv_layer=1, max_new_tokens=4))
    requests = requests_mixed(processor, 3)
    batch = engine.prompt_batch(requests)
    seen = record_compactions(monkeypatch)
    engine.generate(requests)
    valid, _, positions, visual, _, deepstack = seen[0]
    for b in range(len(requests)):
        original = {tuple(p): d for p, d in zip(batch.positions[b].tolist(), batch.deepstack[b], strict=True)}
        for p, d, is_visual, ok in zip(positions[b].tolist(), deepstack[b], visual[b], valid[b], strict=True):
            if not ok:
                continue
            if is_visual:
                assert torch.equal(d, original[tuple(p)])
            else:
                assert not d.any()


def test_tower_flops_charge_windowed_blocks_their_windows_only():
    """Qwen2.5-VL's windowed blocks attend within a window: their attention is charged n * window
    patches, the full-attention blocks n * n; per image; shared rows split the tower."""
    model, processor = tiny_qwen2_5_vl(seed=0, patch_size=4, window_size=16)
    engine = Engine(model, processor, EngineConfig(max_new_tokens=1))
    row = engine.adapter.preprocess(format_prompt(processor, "red ?"), [random_image(3, 64, 64)])
    media = row.media[0]
    vision = model.config.vision_config
    n, c, window = media.pixel_values.shape[1], vision.hidden_size, (16 // 4) ** 2
    windowed = vision.depth - len(vision.fullatt_block_indexes)
    assert n == 256 and windowed == 2
    charged = engine.adapter.vision_flops(media, None, 0, 1)
    vision.fullatt_block_indexes = list(range(vision.depth))  # every block full: n * n everywhere
    try:
        assert engine.adapter.vision_flops(media, None, 0, 1) - charged == windowed * 4.0 * n * (n - window) * c
    finally:
        vision.fullatt_block_indexes = [1, 3]
    assert engine.adapter.vision_flops(media, None, 0, 4) == pytest.approx(charged / 4)
