"""End-to-end engine behaviour on tiny random-weight models of each HF LLaVA class."""

import pytest
import torch
from PIL import Image

from operators.accounting import vision_tower_flops
from operators.budgets import kept_for_layer_mean
from operators.engine import Engine, EngineConfig, Request, format_prompt, length_batches
from tests.conftest import random_image, random_video
from tests.tiny_models import tiny_llava

QUESTIONS = ["what is this ?", "describe the image in one two three four five words please", "red ?"]
FAMILIES = ["llava", "llava_next", "video_llava"]


def make_requests(family, processor, count=3, seed=0):
    requests = []
    for i in range(count):
        question = QUESTIONS[i % len(QUESTIONS)]
        if family == "video_llava" and i % 2 == 0:
            requests.append(Request(format_prompt(processor, question, "video"), video=random_video(seed + i)))
        else:
            # different sizes exercise LLaVA-NeXT's anyres grids and unpadding
            image = random_image(seed + i, height=40 + 12 * i, width=56 - 8 * i)
            requests.append(Request(format_prompt(processor, question), images=[image]))
    return requests


def hf_generate(model, adapter, request, max_new_tokens):
    """Hugging Face's own generate on the same ids and pixels our adapter prepared."""
    row = adapter.preprocess(request.prompt, request.images, request.video)
    kwargs = {"input_ids": row.input_ids[None]}
    media = row.media[0]
    if media.kind == "video":
        kwargs["pixel_values_videos"] = media.pixel_values[None]
    elif adapter.family == "llava_next":
        kwargs["pixel_values"] = media.pixel_values[None]
        kwargs["image_sizes"] = torch.tensor([media.image_size])
    elif adapter.family == "video_llava":
        kwargs["pixel_values_images"] = media.pixel_values
    else:
        kwargs["pixel_values"] = media.pixel_values
    out = model.generate(**kwargs, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, row.input_ids.shape[0] :].tolist()


def trim_after_eos(tokens, eos_ids, pad_id):
    out = []
    for t in tokens:
        out.append(t)
        if t in eos_ids:
            break
    while out and out[-1] == pad_id and pad_id not in eos_ids:
        out.pop()
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_unpruned_batch_equals_hf_generate(tiny, family):
    model, processor = tiny(family)
    engine = Engine(model, processor, EngineConfig(max_new_tokens=10))
    requests = make_requests(family, processor)
    ours = engine.generate(requests)
    for request, result in zip(requests, ours, strict=True):
        reference = trim_after_eos(hf_generate(model, engine.adapter, request, 10), engine.eos_token_ids, -1)
        assert result.token_ids == reference
        assert result.visual_tokens_kept == result.visual_tokens_total


def test_unpruned_equals_hf_batched_generate_with_left_padding(tiny):
    model, processor = tiny("llava")
    engine = Engine(model, processor, EngineConfig(max_new_tokens=8))
    requests = make_requests("llava", processor)
    processor.tokenizer.padding_side = "left"
    inputs = processor(
        text=[r.prompt for r in requests], images=[r.images[0] for r in requests], return_tensors="pt", padding=True
    )
    reference = model.generate(**inputs, max_new_tokens=8, do_sample=False)[:, inputs["input_ids"].shape[1] :]
    ours = engine.generate(requests)
    for row, result in enumerate(ours):
        assert result.token_ids == reference[row, : len(result.token_ids)].tolist()


def test_eos_stops_rows_independently_like_hf(tiny):
    model, processor = tiny("llava")
    requests = make_requests("llava", processor)
    free_run = Engine(model, processor, EngineConfig(max_new_tokens=8)).generate(requests)
    stop_token = free_run[0].token_ids[2]  # a token row 0 emits third: row 0 must stop there
    original = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = stop_token
    try:
        engine = Engine(model, processor, EngineConfig(max_new_tokens=8))
        ours = engine.generate(requests)
        for request, result in zip(requests, ours, strict=True):
            reference = trim_after_eos(hf_generate(model, engine.adapter, request, 8), [stop_token], -1)
            assert result.token_ids == reference
        assert ours[0].token_ids[-1] == stop_token and len(ours[0].token_ids) <= 3
    finally:
        model.generation_config.eos_token_id = original


@pytest.mark.parametrize("strategy", ["greedy", "ssd"])
def test_ignore_eos_generates_exactly_max_new_tokens_and_the_same_prefix(tiny, strategy):
    """decode.ignore_eos (benchmarks): every row runs to max_new_tokens, through the end-of-sequence
    token that would have stopped it; up to that token the text is what a normal run writes."""
    from operators.twig import grow_twig

    model, processor = tiny("llava")
    requests = make_requests("llava", processor)
    stop_token = Engine(model, processor, EngineConfig(max_new_tokens=8)).generate(requests)[0].token_ids[1]
    twig = grow_twig(model, K=1, T=1) if strategy == "ssd" else None
    original = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = stop_token
    try:
        stopping = Engine(model, processor, EngineConfig(max_new_tokens=8, decode_strategy=strategy), twig=twig)
        running = Engine(
            model, processor, EngineConfig(max_new_tokens=8, decode_strategy=strategy, ignore_eos=True), twig=twig
        )
        stopped, ran = stopping.generate(requests), running.generate(requests)
    finally:
        model.generation_config.eos_token_id = original
    assert len(stopped[0].token_ids) <= 2 and stopped[0].token_ids[-1] == stop_token
    for short, full in zip(stopped, ran, strict=True):
        assert len(full.token_ids) == 8
        assert full.token_ids[: len(short.token_ids)] == short.token_ids


@pytest.mark.parametrize("family", FAMILIES)
def test_fastv_with_nothing_pruned_equals_none(tiny, family):
    model, processor = tiny(family)
    requests = make_requests(family, processor)
    none = Engine(model, processor, EngineConfig(max_new_tokens=8)).generate(requests)
    fastv = Engine(model, processor, EngineConfig("fastv", budget=10_000, max_new_tokens=8)).generate(requests)
    assert [r.token_ids for r in fastv] == [r.token_ids for r in none]
    assert [r.visual_tokens_kept for r in fastv] == [r.visual_tokens_total for r in none]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["none", "vispruner", "fastv", "random", "pool"])
def test_batch_of_mixed_lengths_equals_each_row_alone(tiny, family, method):
    model, processor = tiny(family)
    budget = None if method == "none" else 9
    engine = Engine(model, processor, EngineConfig(method, budget=budget, max_new_tokens=6))
    requests = make_requests(family, processor)
    batched = engine.generate(requests)
    for request, result in zip(requests, batched, strict=True):
        alone = engine.generate([request])[0]
        assert result.token_ids == alone.token_ids
        assert result.visual_tokens_kept == alone.visual_tokens_kept


def test_length_batches_sorts_longest_first_and_respects_the_token_budget():
    lengths = [10, 50, 20, 50, 5, 300]
    batches = length_batches(lengths, max_new_tokens=10, batch_tokens=130)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))  # every row exactly once
    assert batches[0] == [5]  # over the budget alone: it still runs, by itself
    for batch in batches:
        widths = [lengths[i] for i in batch]
        assert widths == sorted(widths, reverse=True)
        assert len(batch) == 1 or len(batch) * (widths[0] + 10) <= 130
    assert batches[1:] == [[1, 3], [2, 0, 4]]  # 2 x (50 + 10) <= 130 < 3 x 60; 3 x (20 + 10) <= 130
    assert length_batches(lengths, 10, None) == [list(range(len(lengths)))]
    assert length_batches([], 10, 100) == []


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["none", "vispruner"])
def test_token_budgeted_sub_batches_give_the_same_results_in_request_order(tiny, family, method):
    model, processor = tiny(family)
    budget = None if method == "none" else 9
    requests = make_requests(family, processor, count=5)
    whole = Engine(model, processor, EngineConfig(method, budget=budget, max_new_tokens=6)).generate(requests)
    engine = Engine(model, processor, EngineConfig(method, budget=budget, max_new_tokens=6, batch_tokens=1))
    lengths = [engine.pruned_prompt_length(engine.adapter.preprocess(r.prompt, r.images, r.video)) for r in requests]
    assert len(length_batches(lengths, 6, 1)) == len(requests)  # a budget of 1 token: every row alone
    split = engine.generate(requests)
    assert [r.token_ids for r in split] == [r.token_ids for r in whole]
    assert [r.visual_tokens_kept for r in split] == [r.visual_tokens_kept for r in whole]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["none", "vispruner", "random"])
def test_questions_sharing_media_encode_it_once_with_the_same_results(tiny, family, method, monkeypatch):
    model, processor = tiny(family)
    engine = Engine(model, processor, EngineConfig(method, budget=None if method == "none" else 9, max_new_tokens=6))
    kind = "video" if family == "video_llava" else "image"
    media = {"video": random_video(3)} if kind == "video" else {"images": [random_image(3)]}
    other = {"video": random_video(4)} if kind == "video" else {"images": [random_image(4)]}
    plain = [
        Request(format_prompt(processor, q, kind), **m) for q, m in zip(QUESTIONS, [media, media, other], strict=True)
    ]
    keyed = [
        Request(format_prompt(processor, q, kind), **m, media_key=k)
        for q, m, k in zip(QUESTIONS, [media, media, other], ["a", "a", "b"], strict=True)
    ]
    encoded = []
    encode = engine.adapter.encode
    monkeypatch.setattr(
        engine.adapter, "encode", lambda k, pixels: encoded.append(pixels.shape[0]) or encode(k, pixels)
    )
    expected = engine.generate(plain)
    per_media = encoded[0] // 3
    encoded.clear()
    shared = engine.generate(keyed)
    assert encoded == [2 * per_media]  # the shared media went through the tower once
    assert [r.token_ids for r in shared] == [r.token_ids for r in expected]
    assert [r.visual_tokens_kept for r in shared] == [r.visual_tokens_kept for r in expected]
    # The two rows that shared the pass are charged half of it each; the third row pays its own.
    half_tower = vision_tower_flops(model.config.vision_config, per_media) / 2
    for s, e in zip(shared[:2], expected[:2], strict=True):
        assert s.prefill_flops == pytest.approx(e.prefill_flops - half_tower, rel=1e-9)
    assert shared[2].prefill_flops == pytest.approx(expected[2].prefill_flops, rel=1e-9)


@pytest.mark.parametrize("method", ["vispruner", "fastv", "random", "pool"])
def test_deterministic(tiny, method):
    model, processor = tiny("llava")
    requests = make_requests("llava", processor)
    runs = [
        Engine(model, processor, EngineConfig(method, budget=16, max_new_tokens=6)).generate(requests) for _ in "ab"
    ]
    assert [r.token_ids for r in runs[0]] == [r.token_ids for r in runs[1]]


def test_accounting_counts_and_savings(tiny):
    model, processor = tiny("llava")  # 12x12 = 144 patches per image
    requests = make_requests("llava", processor, count=2)
    none = Engine(model, processor, EngineConfig(max_new_tokens=4)).generate(requests)
    pruned = Engine(model, processor, EngineConfig("vispruner", budget=16, max_new_tokens=4)).generate(requests)
    fastv = Engine(model, processor, EngineConfig("fastv", budget=16, max_new_tokens=4)).generate(requests)
    for a, b, c in zip(none, pruned, fastv, strict=True):
        assert a.visual_tokens_total == b.visual_tokens_total == c.visual_tokens_total == 144
        assert (a.visual_tokens_kept, b.visual_tokens_kept, c.visual_tokens_kept) == (144, 16, 16)
        assert b.prefill_flops < c.prefill_flops < a.prefill_flops
        layers = model.config.text_config.num_hidden_layers
        per_token = 2 * 2 * 16 * 4  # K and V, 2 kv heads, head dim 16, fp32
        assert a.kv_cache_bytes - b.kv_cache_bytes == (144 - 16) * layers * per_token
        assert set(a.stage_ms) == {"preprocess", "vision", "prune", "prefill", "decode"}


def test_next_budget_is_per_crop_and_newlines_are_kept(tiny):
    model, processor = tiny("llava_next")
    request = make_requests("llava_next", processor, count=1)[0]
    engine = Engine(model, processor, EngineConfig("vispruner", budget=5, max_new_tokens=2))
    row = engine.adapter.preprocess(request.prompt, request.images)
    crops = row.media[0].pixel_values.shape[0]
    result = engine.generate([request])[0]
    none = Engine(model, processor, EngineConfig(max_new_tokens=2)).generate([request])[0]
    side = 8  # 32 px / 4 px patches
    # every unpadded grid row ends in a newline; the base crop has none, the budget applies per crop
    newlines = (none.visual_tokens_total - side * side) // (side + 1) if crops > 1 else 1
    assert newlines > 0
    assert result.visual_tokens_kept <= 5 * crops + newlines
    assert result.visual_tokens_kept >= 5 + newlines  # base crop always keeps its full budget


def test_video_llava_keeps_each_frames_cls(tiny):
    model, processor = tiny("video_llava")
    video = random_video(3, frames=4)
    request = Request(format_prompt(processor, "what moves ?", "video"), video=video)
    result = Engine(model, processor, EngineConfig("vispruner", budget=6, max_new_tokens=2)).generate([request])[0]
    assert result.visual_tokens_total == 4 * (64 + 1)
    assert result.visual_tokens_kept == 4 * (6 + 1)


def test_config_rejects_unknown_method_and_missing_budget():
    with pytest.raises(ValueError, match="pruning.method: unknown .* allowed: none, vispruner, fastv, random, pool"):
        EngineConfig("tome", budget=4)
    with pytest.raises(ValueError, match="pruning.budget: required when pruning.method is 'vispruner'"):
        EngineConfig("vispruner")


def test_llava_sees_a_video_as_frames_with_a_budget_per_frame(tiny):
    model, processor = tiny("llava")  # 144 patches per frame
    video = random_video(5, frames=3)
    request = Request(format_prompt(processor, "what moves ?", "video"), video=video)
    none = Engine(model, processor, EngineConfig(max_new_tokens=3)).generate([request])[0]
    pruned = Engine(model, processor, EngineConfig("vispruner", budget=10, max_new_tokens=3)).generate([request])[0]
    assert (none.visual_tokens_total, none.visual_tokens_kept) == (3 * 144, 3 * 144)
    assert pruned.visual_tokens_kept == 3 * 10
    # the same frames given as three images in one prompt produce the same answer
    frames = [Image.fromarray(f) for f in video]
    as_images = Request(format_prompt(processor, "what moves ?").replace("<image>", "<image>" * 3), images=frames)
    assert Engine(model, processor, EngineConfig(max_new_tokens=3)).generate([as_images])[0].token_ids == none.token_ids


def test_pad_to_square_pads_llava_images_with_the_mean_colour(tiny):
    model, processor = tiny("llava")
    image = random_image(7, height=20, width=56)  # wide: padding adds rows above and below
    plain = Engine(model, processor, EngineConfig()).adapter.preprocess("<image>", [image]).media[0].pixel_values
    padded_engine = Engine(model, processor, EngineConfig(pad_to_square=True))
    padded = padded_engine.adapter.preprocess("<image>", [image]).media[0].pixel_values
    assert not processor.image_processor.do_pad  # the caller's processor is left alone
    assert plain.shape == padded.shape and not torch.equal(plain, padded)
    # the top rows of the padded image are the (normalised) mean colour: a constant per channel
    top = padded[0, :, 0, :]
    assert torch.allclose(top, top[:, :1].expand_as(top), atol=1e-5)
    model_next, processor_next = tiny("llava_next")
    with pytest.raises(ValueError, match="pad_to_square"):
        Engine(model_next, processor_next, EngineConfig(pad_to_square=True))


def test_eager_attention_gets_explicit_causal_masks():
    """Eager attention adds the mask to its scores and has no implicit causal mode: a model handed to
    the engine with it must decode as Hugging Face's own generate does, left padding included."""
    model, processor = tiny_llava(seed=0)
    model.set_attn_implementation("eager")
    assert model.config.text_config._attn_implementation == "eager"
    requests = make_requests("llava", processor)
    processor.tokenizer.padding_side = "left"
    inputs = processor(
        text=[r.prompt for r in requests], images=[r.images[0] for r in requests], return_tensors="pt", padding=True
    )
    reference = model.generate(**inputs, max_new_tokens=8, do_sample=False)[:, inputs["input_ids"].shape[1] :]
    ours = Engine(model, processor, EngineConfig(max_new_tokens=8)).generate(requests)
    for row, result in enumerate(ours):
        assert result.token_ids == reference[row, : len(result.token_ids)].tolist()
    alone = Engine(model, processor, EngineConfig(max_new_tokens=8)).generate(requests[:1])[0]
    assert alone.token_ids == ours[0].token_ids  # no padding: the fresh prefill's mask is built too


@pytest.mark.parametrize("method", ["fastv", "vispruner"])
def test_layer_mean_budgets_reach_the_requested_r_bar(tiny, method):
    """pruning.budget_unit=layer_mean asks for TwigVLM's R-bar: pre-LLM methods keep R = R-bar; FastV
    keeps R = ceil((L R-bar - K M) / (L - K)), so its measured layer mean lands on the target."""
    model, processor = tiny("llava")  # 144 patches per image, 4 layers
    requests = make_requests("llava", processor, count=2)
    for target in (40, 80):
        config = EngineConfig(method, budget=target, budget_unit="layer_mean", fastv_layer=1, max_new_tokens=2)
        results = Engine(model, processor, config).generate(requests)
        expected_r = target if method == "vispruner" else kept_for_layer_mean(4, 1, 4, 144, target)
        for result in results:
            assert result.visual_tokens_kept == expected_r
            assert target <= result.visual_tokens_layer_mean < target + 1  # the ceiling overshoots by < 1
    kept = Engine(model, processor, EngineConfig(method, budget=40, fastv_layer=1, max_new_tokens=2))
    assert kept.generate(requests[:1])[0].visual_tokens_kept == 40  # the default unit is R itself
