"""LLaVA-OneVision through the engine, on a tiny random model built in code (SigLIP tower, Qwen2 LM).

Unpruned generation equals Hugging Face's ``generate`` (AnyRes images of mixed sizes, the
``anyres_max_9`` downsampling, several images in one prompt, pooled video; batch 1 and 4);
VisPruner and FastV keep their budget per crop / frame at the right places; SSD equals greedy;
VisPruner's received-attention score equals an eager-attention reference.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import SiglipVisionConfig, SiglipVisionModel

from operators.engine import Engine, EngineConfig, Request, format_prompt
from operators.families.llava_onevision import LlavaOnevisionAdapter, VideoSettings, pool_grid, video_pixels
from operators.language_model import text_model
from operators.pruning.vispruner import vispruner
from operators.twig import grow_twig
from operators.vision import encode_with_received_attention, encoder_layers, resolve_layer
from tests.conftest import random_image, random_video
from tests.test_engine import trim_after_eos

FAMILY = "llava_onevision"
SIDE = 8  # 32 px crops of 4 px patches
POOLED = 4 * 4  # ceil(8 / 2)^2 tokens per frame after OneVision's pooling


@pytest.fixture(scope="module")
def onevision(tiny):
    return tiny(FAMILY)


def image_request(processor, seed, height, width, question="what is this ?"):
    return Request(format_prompt(processor, question), images=[random_image(seed, height, width)])


def video_request(processor, seed, frames=3, question="what moves ?"):
    return Request(format_prompt(processor, question, "video"), video=random_video(seed, frames=frames))


def mixed_requests(processor):
    """Small (2x2 grid, unpadded), square (2x2 grid, no unpadding), large (17 crops, downsampled) images and a video."""
    return [
        image_request(processor, 0, 40, 56),
        image_request(processor, 1, 64, 64, "describe the image in one two three words"),
        image_request(processor, 2, 128, 128, "red ?"),
        video_request(processor, 3),
    ]


def hf_kwargs(adapter, row):
    """Hugging Face inputs for the ids and pixels our adapter prepared."""
    kwargs = {"input_ids": row.input_ids[None]}
    images = [m for m in row.media if m.kind == "image"]
    videos = [m for m in row.media if m.kind == "video"]
    if images:
        crops = max(m.pixel_values.shape[0] for m in images)
        kwargs["pixel_values"] = torch.stack(
            [F.pad(m.pixel_values, (0, 0) * 3 + (0, crops - len(m.pixel_values))) for m in images]
        )
        kwargs["image_sizes"] = torch.tensor([m.image_size for m in images])
        kwargs["batch_num_images"] = torch.tensor([len(images)])
    if videos:
        kwargs["pixel_values_videos"] = videos[0].pixel_values[None]
    return kwargs


def hf_generate(model, adapter, request, max_new_tokens):
    row = adapter.preprocess(request.prompt, request.images, request.video)
    out = model.generate(**hf_kwargs(adapter, row), max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, row.input_ids.shape[0] :].tolist()


# --- VisPruner's score without [CLS] ---------------------------------------------------------------


@pytest.mark.parametrize("feature_layer", [-1, -2, 2])
def test_received_attention_equals_the_eager_reference(feature_layer):
    """Independent reference: the eager tower's attention map of the feature layer, averaged over
    query positions (the attention each patch receives), then over heads."""
    torch.manual_seed(0)
    config = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32, patch_size=4
    )
    config._attn_implementation = "eager"
    tower = SiglipVisionModel(config).eval()
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        reference = tower(pixel_values=pixels, output_hidden_states=True, output_attentions=True)
    attention_index = feature_layer - 1 if feature_layer > 0 else feature_layer  # the layer making hidden_states[f]
    expected = reference.attentions[attention_index].mean(dim=-2).mean(dim=1)  # [B, N]
    tower.set_attn_implementation("sdpa")  # ours hooks an SDPA tower, in query chunks of 7 (64 = 9 x 7 + 1)
    layer = encoder_layers(tower)[resolve_layer(3, feature_layer)]
    hooks = (len(layer._forward_hooks), len(layer.self_attn._forward_pre_hooks))  # HF's output capture has its own
    ours = encode_with_received_attention(tower, pixels, feature_layer, query_chunk=7)
    torch.testing.assert_close(ours.received_attention.mean(dim=1), expected)
    torch.testing.assert_close(ours.features, reference.hidden_states[feature_layer])
    torch.testing.assert_close(ours.received_attention.sum(dim=-1), torch.ones(3, 4))  # a distribution per head
    assert (len(layer._forward_hooks), len(layer.self_attn._forward_pre_hooks)) == hooks  # ours are removed


def test_received_attention_chunks_shrink_for_large_batches(monkeypatch):
    """A cap on the live block (a batch of many frames) changes the chunking, not the scores."""
    from operators import vision

    torch.manual_seed(1)
    config = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=16, patch_size=4
    )
    tower = SiglipVisionModel(config).eval()
    pixels = torch.randn(5, 3, 16, 16)
    whole = encode_with_received_attention(tower, pixels).received_attention
    monkeypatch.setattr(vision, "MAX_BLOCK_ELEMENTS", 5 * 4 * 16 * 3)  # 3 query rows at a time
    torch.testing.assert_close(encode_with_received_attention(tower, pixels).received_attention, whole)


def test_adapter_scores_are_received_attention_pooled_for_video(onevision):
    model, processor = onevision
    adapter = LlavaOnevisionAdapter(model, processor)
    pixels = torch.randn(2, 3, 32, 32)
    tower_out = encode_with_received_attention(model.model.vision_tower, pixels, -1)
    image = adapter.encode("image", pixels)
    torch.testing.assert_close(image.cls_attention, tower_out.received_attention.mean(dim=1))
    assert image.cls is None and image.patches.shape == (2, SIDE * SIDE, 32)
    video = adapter.encode("video", pixels)
    with torch.no_grad():
        hf = model.model.get_video_features(
            pixels[None], vision_feature_layer=-1, vision_feature_select_strategy="full"
        )
    torch.testing.assert_close(video.patches.reshape(1, -1, 64), hf.pooler_output[:, :-1])  # HF's pooled tokens
    scores = image.cls_attention.reshape(2, 1, SIDE, SIDE)
    pooled = F.interpolate(scores, size=[4, 4], mode="bilinear").reshape(2, POOLED)  # the same 2x2 pooling
    torch.testing.assert_close(video.cls_attention, pooled)
    assert video.grid == (4, 4)


# --- preprocessing ---------------------------------------------------------------------------------


def test_video_pixels_at_the_model_size_equal_the_image_processors(onevision):
    """Frames already at the tower's size are only rescaled and normalised: the same numbers as the
    image processor's base crop. (HF's own video processor needs torchvision, absent here.)"""
    _, processor = onevision
    frames = random_video(5, frames=2, height=32, width=32)
    ours = video_pixels(torch.from_numpy(frames), processor.video)
    for i, frame in enumerate(frames):
        base = processor.image_processor(images=[frame], return_tensors="pt")["pixel_values"][0, 0]
        torch.testing.assert_close(ours[i], base, atol=1e-5, rtol=0)


def test_video_pixels_resize_like_torchvisions_float_path():
    """The uint8 bicubic antialiased resize torchvision runs natively equals its float path
    (resize in float32, clamp, round) within one grey level."""
    frames = torch.from_numpy(random_video(6, frames=2, height=40, width=56))
    settings = VideoSettings(24, 20, (0.0, 0.0, 0.0), (1 / 255,) * 3)  # output in grey levels
    ours = video_pixels(frames, settings)
    floats = frames.permute(0, 3, 1, 2).float()
    expected = F.interpolate(floats, size=(24, 20), mode="bicubic", align_corners=False, antialias=True)
    expected = expected.clamp(0, 255).round()
    assert ours.shape == (2, 3, 24, 20)
    assert (ours - expected).abs().max() <= 1.0


def test_image_token_counts_are_hf_processors(onevision):
    """The placeholders we write per image (counted by the model's own packing) are the count HF's
    ``LlavaOnevisionProcessor`` writes (its formula, called on a stand-in: the processor itself
    cannot be built without torchvision)."""
    from functools import partial
    from types import SimpleNamespace

    from transformers import LlavaOnevisionProcessor

    model, processor = onevision
    adapter = LlavaOnevisionAdapter(model, processor)
    stand_in = SimpleNamespace(
        image_processor=processor.image_processor, num_image_tokens=SIDE * SIDE, vision_aspect_ratio="anyres_max_9"
    )
    stand_in._get_unpadded_features = partial(LlavaOnevisionProcessor._get_unpadded_features, stand_in)
    for height, width in [(40, 56), (64, 64), (128, 128), (20, 70), (70, 20), (33, 97), (120, 100), (16, 16)]:
        media = adapter.preprocess("<image>", [random_image(0, height, width)]).media[0]
        expected = LlavaOnevisionProcessor._get_number_of_features(stand_in, height, width, 32, 32)
        assert media.tokens == expected, (height, width)


def test_prompt_is_the_chat_template_media_first(onevision):
    _, processor = onevision
    prompt = format_prompt(processor, "what is this ?", "video")
    assert prompt == "<|im_start|>user <video>\nwhat is this ?<|im_end|>\n<|im_start|>assistant\n"


# --- unpruned = Hugging Face -----------------------------------------------------------------------


def test_unpruned_batch_1_equals_hf_generate(onevision):
    model, processor = onevision
    engine = Engine(model, processor, EngineConfig(max_new_tokens=8))
    two_images = Request(
        format_prompt(processor, "which ?").replace("<image>", "<image><image>"),
        images=[random_image(7, 40, 56), random_image(8, 30, 30)],
    )
    video_then_image = Request(
        format_prompt(processor, "which ?", "video").replace("<video>", "<video><image>"),
        images=[random_image(9, 40, 56)],
        video=random_video(9, frames=2),
    )
    for request in mixed_requests(processor) + [two_images, video_then_image]:
        ours = engine.generate([request])[0]
        reference = trim_after_eos(hf_generate(model, engine.adapter, request, 8), engine.eos_token_ids, -1)
        assert ours.token_ids == reference
        assert ours.visual_tokens_kept == ours.visual_tokens_total
        if request.images and request.images[0].size == (128, 128):  # a 4x4 grid (32x32) downsampled to 24x24
            assert ours.visual_tokens_total == SIDE * SIDE + 24 * 25
    row = engine.adapter.preprocess(two_images.prompt, two_images.images)
    assert [m.tokens for m in row.media] == [SIDE * SIDE + 1] * 2  # several images: base crop + newline each
    row = engine.adapter.preprocess(video_then_image.prompt, video_then_image.images, video_then_image.video)
    assert [m.kind for m in row.media] == ["video", "image"]  # in prompt order


def test_several_images_keep_the_budget_per_image(onevision):
    """Several images in one prompt: one segment (base crop) each, plus its newline."""
    model, processor = onevision
    prompt = format_prompt(processor, "which ?").replace("<image>", "<image><image>")
    request = Request(prompt, images=[random_image(7, 40, 56), random_image(8, 30, 30)])
    for method in ("vispruner", "fastv"):
        result = Engine(model, processor, EngineConfig(method, budget=5, max_new_tokens=2)).generate([request])[0]
        assert (result.visual_tokens_total, result.visual_tokens_kept) == (2 * (SIDE * SIDE + 1), 2 * (5 + 1)), method


def test_unpruned_batch_4_equals_hf_batched_generate(onevision):
    """Four images of different sizes (different crop counts and prompt lengths) in one engine batch
    equal HF's own left-padded batch of four."""
    model, processor = onevision
    engine = Engine(model, processor, EngineConfig(max_new_tokens=8))
    images = [image_request(processor, s, h, w) for s, (h, w) in enumerate([(40, 56), (64, 64), (20, 70), (50, 30)])]
    rows = [engine.adapter.preprocess(r.prompt, r.images) for r in images]
    width = max(len(r.input_ids) for r in rows)
    pad = processor.tokenizer.pad_token_id
    ids = torch.stack([F.pad(r.input_ids, (width - len(r.input_ids), 0), value=pad) for r in rows])
    mask = torch.stack([F.pad(torch.ones_like(r.input_ids), (width - len(r.input_ids), 0)) for r in rows])
    crops = max(r.media[0].pixel_values.shape[0] for r in rows)
    pixels = torch.stack(
        [F.pad(r.media[0].pixel_values, (0, 0) * 3 + (0, crops - len(r.media[0].pixel_values))) for r in rows]
    )
    sizes = torch.tensor([r.media[0].image_size for r in rows])
    reference = model.generate(
        input_ids=ids, attention_mask=mask, pixel_values=pixels, image_sizes=sizes, max_new_tokens=8, do_sample=False
    )[:, width:]
    for row, result in enumerate(engine.generate(images)):
        assert result.token_ids == reference[row, : len(result.token_ids)].tolist()


# --- budgets and positions -------------------------------------------------------------------------


def streams(engine, request):
    """(the row's media, its Segments, the selection, the stream) for a one-media request."""
    row = engine.adapter.preprocess(request.prompt, request.images, request.video)
    segments = engine._encode([row])[0]
    stream_list, _ = engine._prune_and_project([row], [segments])
    return row.media[0], segments[0], stream_list[0][0]


def test_vispruner_keeps_its_budget_per_crop_at_the_right_places(onevision):
    """A square image (no unpadding, no downsampling): the base crop keeps ``budget`` tokens, each
    grid crop too, every grid row keeps its newline, and each kept token is the unpruned token of
    that patch at its place in HF's layout."""
    model, processor = onevision
    request = image_request(processor, 1, 64, 64)
    budget = 5
    full_media, full_segments, full = streams(Engine(model, processor, EngineConfig()), request)
    engine = Engine(model, processor, EngineConfig("vispruner", budget=budget))
    media, segments, pruned = streams(engine, request)
    assert full_media.pixel_values.shape[0] == 5  # base + 2x2 grid
    kept = vispruner(segments.patches, segments.cls_attention, budget)  # [5, budget]
    # HF's layout: base crop raster, then the 16x16 grid row by row, each row ending in a newline.
    positions = kept[0].tolist()
    for crop in range(1, 5):
        r, c = divmod(crop - 1, 2)
        for index in kept[crop].tolist():
            i, j = divmod(index, SIDE)
            positions.append(SIDE * SIDE + (r * SIDE + i) * 17 + c * SIDE + j)
    newlines = [SIDE * SIDE + row * 17 + 16 for row in range(16)]
    expected = sorted(positions[budget:] + newlines)
    torch.testing.assert_close(pruned.embeds[:budget], full.embeds[positions[:budget]])
    torch.testing.assert_close(pruned.embeds[budget:], full.embeds[expected])
    assert pruned.prunable.sum() == 5 * budget and (~pruned.prunable).sum() == 16
    result = engine.generate([request])[0]
    assert result.visual_tokens_kept == 5 * budget + 16


def test_video_budget_is_per_pooled_frame(onevision):
    model, processor = onevision
    request = video_request(processor, 4, frames=3)
    _, _, full = streams(Engine(model, processor, EngineConfig()), request)
    engine = Engine(model, processor, EngineConfig("vispruner", budget=3))
    _, segments, pruned = streams(engine, request)
    kept = vispruner(segments.patches, segments.cls_attention, 3)  # on the pooled tokens, [3 frames, 3]
    positions = (kept + POOLED * torch.arange(3)[:, None]).reshape(-1)
    torch.testing.assert_close(pruned.embeds[:-1], full.embeds[positions])
    torch.testing.assert_close(pruned.embeds[-1], full.embeds[-1])  # the newline after the video
    assert pruned.prunable.tolist() == [True] * 9 + [False]
    for method in ("vispruner", "fastv", "random", "pool"):
        result = Engine(model, processor, EngineConfig(method, budget=3, max_new_tokens=2)).generate([request])[0]
        assert (result.visual_tokens_total, result.visual_tokens_kept) == (3 * POOLED + 1, 3 * 3 + 1), method


def test_projector_flops_count_what_the_projector_ran_on(onevision):
    """Video: every patch of every frame is projected (then pooled); a small image: the kept tokens."""
    from operators.accounting import projector_flops, vision_flops, vision_tower_flops

    model, processor = onevision
    engine = Engine(model, processor, EngineConfig("vispruner", budget=3))
    vision = model.config.vision_config
    for request, projected in [
        (video_request(processor, 4), 3 * SIDE * SIDE),
        (image_request(processor, 0, 40, 56), 5 * 3),
    ]:
        media, segments, _ = streams(engine, request)
        count = media.pixel_values.shape[0]
        expected = vision_tower_flops(vision, count) + projector_flops(32, 64, projected)
        assert vision_flops(engine.adapter, media, segments, 3) == pytest.approx(expected, rel=1e-12)


def test_fastv_keeps_budget_per_crop_plus_newlines(onevision):
    model, processor = onevision
    requests = [image_request(processor, 1, 64, 64), video_request(processor, 5, frames=2)]
    results = Engine(model, processor, EngineConfig("fastv", budget=4, max_new_tokens=3)).generate(requests)
    assert [r.visual_tokens_kept for r in results] == [5 * 4 + 16, 2 * 4 + 1]
    none = Engine(model, processor, EngineConfig(max_new_tokens=3)).generate(requests)
    everything = Engine(model, processor, EngineConfig("fastv", budget=10_000, max_new_tokens=3)).generate(requests)
    assert [r.token_ids for r in everything] == [r.token_ids for r in none]


def test_downsampled_image_keeps_hf_tokens_where_kept(onevision):
    """The 128 px image's grid is downsampled by HF: kept downsampled tokens are HF's own values;
    the base crop keeps exactly the budget."""
    model, processor = onevision
    request = image_request(processor, 2, 128, 128)
    _, _, full = streams(Engine(model, processor, EngineConfig()), request)
    _, segments, pruned = streams(Engine(model, processor, EngineConfig("vispruner", budget=40)), request)
    kept = vispruner(segments.patches, segments.cls_attention, 40)
    torch.testing.assert_close(pruned.embeds[:40], full.embeds[kept[0]])
    grid = pruned.embeds[40:][pruned.prunable[40:]]
    matches = (grid[:, None] - full.embeds[None, SIDE * SIDE :]).abs().amax(-1).amin(-1)
    assert bool((matches < 1e-5).all())  # each kept grid token is one of HF's downsampled tokens
    assert 0 < len(grid) < 16 * 40
    assert (~pruned.prunable).sum() == 24  # the downsampled grid's newlines


def test_mixed_batch_equals_each_row_alone(onevision):
    """A batch of images (two sizes) and a video equals each row alone (alone = HF, see above)."""
    model, processor = onevision
    requests = [r for r in mixed_requests(processor) if not r.images or r.images[0].size != (128, 128)]
    for method, budget in [("none", None), ("vispruner", 6), ("fastv", 6)]:
        engine = Engine(model, processor, EngineConfig(method, budget=budget, max_new_tokens=4))
        batched = engine.generate(requests)
        for request, result in zip(requests, batched, strict=True):
            assert result.token_ids == engine.generate([request])[0].token_ids, method
        if method == "none":
            totals = [r.visual_tokens_total for r in batched]
            assert totals[1:] == [SIDE * SIDE + 16 * 17, 3 * POOLED + 1]  # base + 2x2 crops + newline per row


# --- SSD ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("twig_layers", [1, pytest.param(3, marks=pytest.mark.slow)])
def test_ssd_equals_greedy_with_a_grown_twig(onevision, twig_layers):
    """A random twig grown on the Qwen2 LM (GQA: 4 query heads, 2 key/value heads, q/k/v biases);
    T=1 drafts badly (rejections), T=3 is the rest of the base (every draft accepted)."""
    model, processor = onevision
    assert 1 + twig_layers <= len(text_model(model).layers)
    assert model.config.text_config.num_key_value_heads < model.config.text_config.num_attention_heads
    twig = grow_twig(model, K=1, T=twig_layers)
    requests = [image_request(processor, 60, 40, 56), video_request(processor, 62)]  # 5 crops; 3 frames
    for method, budget in [("none", None), ("vispruner", 6), ("fastv", 6), ("ttp", 6)]:
        config = dict(budget=budget, max_new_tokens=8)
        greedy = Engine(model, processor, EngineConfig(method, **config), twig=twig).generate(requests)
        ssd = Engine(model, processor, EngineConfig(method, **config, decode_strategy="ssd"), twig=twig)
        results = ssd.generate(requests)
        assert [r.token_ids for r in results] == [r.token_ids for r in greedy], method
        assert all(0 <= r.accepted <= r.drafted for r in results)


def test_pool_grid_is_hf_apply_pooling(onevision):
    model, _ = onevision
    values = torch.randn(3, SIDE * SIDE, 64)
    torch.testing.assert_close(pool_grid(values, (SIDE, SIDE)), model.model.apply_pooling(values))


def test_adapter_refuses_what_it_does_not_serve(onevision):
    model, processor = onevision
    with pytest.raises(ValueError, match="pad_to_square"):
        Engine(model, processor, EngineConfig(pad_to_square=True))
    adapter = LlavaOnevisionAdapter(model, processor)
    with pytest.raises(ValueError, match="2 <image> tag"):
        adapter.preprocess("<image> <image>", [random_image(0)])


# --- the job -----------------------------------------------------------------------------------------


def test_saved_checkpoint_loads_and_passes_the_jobs_model_check(onevision, tmp_path):
    """The folder ``save_tiny`` writes (weights, tokenizer, image and video processor configs, chat
    template) passes ``check_model`` and loads back into an engine that answers as the original."""
    from operators.loading import load_vlm
    from pipeline.config import load_config
    from pipeline.models import check_model
    from tests.tiny_models import save_tiny

    directory = save_tiny(FAMILY, tmp_path / "onevision")
    # As llava-hf's folders: the processor's template in chat_template.json, and a Qwen2 tokenizer
    # with its own, text-only template. The processor's must win.
    template = directory / "chat_template.jinja"
    (directory / "chat_template.json").write_text(json.dumps({"chat_template": template.read_text()}))
    template.unlink()
    tokenizer_config = directory / "tokenizer_config.json"
    values = json.loads(tokenizer_config.read_text())
    tokenizer_config.write_text(json.dumps({**values, "chat_template": "{{ messages[0]['content'] }}"}))
    config = load_config("configs/demo.yaml", [f"model.path={directory}", f"input.uri={tmp_path}"])
    info = check_model(config)
    assert info.model_type == FAMILY and info.visual_tokens_per_image is None  # anyres: depends on the image
    model, processor = load_vlm(directory, dtype="float32")
    assert processor.video == onevision[1].video and processor.chat_template == onevision[1].chat_template
    requests = [image_request(processor, 9, 40, 56), video_request(processor, 9, frames=2)]
    loaded = Engine(model, processor, EngineConfig(max_new_tokens=4)).generate(requests)
    original = Engine(*onevision, EngineConfig(max_new_tokens=4)).generate(requests)
    assert [r.token_ids for r in loaded] == [r.token_ids for r in original]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_caption_job_runs_a_onevision_checkpoint(ray_local, tmp_path):
    """pipeline.run on generated images and a video, with a saved tiny OneVision (real local Ray)."""
    from pipeline.output import read_output
    from pipeline.run import run
    from synthetic.corpus import write_corpus
    from tests.tiny_models import save_tiny

    directory = save_tiny(FAMILY, tmp_path / "onevision")
    write_corpus(str(tmp_path / "corpus"), seed=5, n_images=2, n_videos=1)
    overrides = [
        f"model.path='{directory}'",
        f"input.uri='{tmp_path / 'corpus'}'",
        f"output.uri='{tmp_path / 'out'}'",
        "ray.progress_bars=false",
        "decode.max_new_tokens=6",
        "pruning.budget=5",
        "media.num_frames=2",
    ]
    from pipeline.config import load_config

    summary = run(load_config("configs/demo.yaml", overrides), log=lambda *_: None)
    rows = read_output(str(tmp_path / "out")).to_pylist()
    assert (summary.ok, summary.errors) == (3, 0)
    assert sorted(r["media_type"] for r in rows) == ["image", "image", "video"]
    for row in rows:
        assert row["status"] == "ok" and row["generated_tokens"] > 0
        assert row["visual_tokens_kept"] < row["visual_tokens_total"]
        if row["media_type"] == "video":
            assert (row["visual_tokens_total"], row["visual_tokens_kept"]) == (2 * POOLED + 1, 2 * 5 + 1)
