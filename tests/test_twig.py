"""The TwigVLM twig: growing, forward equivalence with the base, fingerprint, save/load, TTP budget,
and the training job (data readers, labels, a few steps end to end, Ray Train)."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from PIL import Image

from operators.language_model import text_model
from operators.loading import load_vlm
from operators.twig import (
    base_fingerprint,
    causal_mask,
    grow_twig,
    hidden_after_layer,
    load_twig,
    save_twig,
)
from tests.conftest import random_image
from tests.tiny_models import BUILDERS
from training import train_twig as tt

PROMPT = "USER: <image>\nwhat color is the circle ? ASSISTANT: red . the circle is on the left"


def _inputs(processor, text=PROMPT, seed=0):
    return processor(text=text, images=[random_image(seed)], return_tensors="pt")


def _positions(length: int) -> torch.Tensor:
    return torch.arange(length)[None]


# --- grow_twig ---------------------------------------------------------------------------------------


def test_grow_twig_copies_base_layers_with_offset_layer_ids(tiny):
    model, _ = tiny("llava")
    lm = text_model(model)
    twig = grow_twig(model, K=1, T=2)
    assert (twig.K, twig.T, len(twig.layers)) == (1, 2, 2)
    assert twig.layer_ids == [4, 5] and list(twig.modules_by_id) == [4, 5]
    assert [layer.self_attn.layer_idx for layer in twig.layers] == [4, 5]
    assert [layer.self_attn.layer_idx for layer in lm.layers] == [0, 1, 2, 3]  # the base is untouched
    for t in range(2):
        base = lm.layers[1 + t].state_dict()
        for name, value in twig.layers[t].state_dict().items():
            torch.testing.assert_close(value, base[name], rtol=0, atol=0)
    torch.testing.assert_close(twig.head.weight, model.lm_head.weight, rtol=0, atol=0)
    torch.testing.assert_close(twig.norm.weight, lm.norm.weight, rtol=0, atol=0)
    assert twig.head.weight.data_ptr() != model.lm_head.weight.data_ptr()  # copies, not shared
    assert next(twig.parameters()).dtype == next(model.parameters()).dtype


@pytest.mark.parametrize(("K", "T"), [(0, 2), (2, 3), (4, 1), (1, 0)])
def test_grow_twig_validates_k_and_t(tiny, K, T):
    model, _ = tiny("llava")
    with pytest.raises(ValueError, match=rf"K={K}, T={T} .*4 layers"):
        grow_twig(model, K=K, T=T)


# --- forward equals the base when the twig is the rest of the base -----------------------------------


@pytest.mark.parametrize("K", [1, 2, 3])
def test_twig_of_the_remaining_layers_reproduces_the_base_logits(tiny, K):
    model, processor = tiny("llava")
    inputs = _inputs(processor)
    twig = grow_twig(model, K=K, T=4 - K)
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
        hidden = hidden_after_layer(model, K, **inputs)
        torch.testing.assert_close(hidden, out.hidden_states[K], rtol=0, atol=0)
        logits = twig(hidden, _positions(hidden.shape[1]), None, text_model(model).rotary_emb)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, out.logits, rtol=1e-5, atol=1e-5)


def test_twig_forward_with_a_padding_mask_matches_the_base(tiny):
    """Left padding: a bool [B, 1, S, S] mask and per-row positions, compared on the real tokens."""
    model, processor = tiny("llava")
    tok = processor.tokenizer
    texts = ["USER: what color is the circle ? ASSISTANT: red", "USER: how many ? ASSISTANT: two"]
    batch = tok(texts, padding=True, return_tensors="pt")  # the tiny tokenizer pads on the left
    valid = batch["attention_mask"].bool()
    assert not valid.all()
    positions = (valid.long().cumsum(1) - 1).clamp(min=0)
    twig = grow_twig(model, K=2, T=2)
    with torch.no_grad():
        base = model(**batch, position_ids=positions).logits
        hidden = hidden_after_layer(model, 2, **batch, position_ids=positions)
        logits = twig(hidden, positions, causal_mask(valid), text_model(model).rotary_emb)
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits[valid], base[valid], rtol=1e-5, atol=1e-5)
    assert causal_mask(torch.ones(2, 3, dtype=torch.bool)) is None


def test_twig_select_returns_only_the_selected_positions(tiny):
    model, processor = tiny("llava")
    inputs = _inputs(processor)
    twig = grow_twig(model, K=2, T=1)
    with torch.no_grad():
        hidden = hidden_after_layer(model, 2, **inputs)
        args = (hidden, _positions(hidden.shape[1]), None, text_model(model).rotary_emb)
        full = twig(*args)
        select = torch.zeros(hidden.shape[:2], dtype=torch.bool)
        select[0, -5:] = True
        torch.testing.assert_close(twig(*args, select=select), full[select])


# --- fingerprint, save / load -----------------------------------------------------------------------


def test_fingerprint_is_stable_across_save_load_and_dtype_and_sees_weight_changes(tmp_path, tiny):
    model, processor = tiny("llava")
    fingerprint = base_fingerprint(model)
    assert len(fingerprint) >= 16 and fingerprint == base_fingerprint(model)
    model.save_pretrained(tmp_path / "base", safe_serialization=True)
    processor.save_pretrained(tmp_path / "base")
    reloaded, _ = load_vlm(tmp_path / "base")
    assert base_fingerprint(reloaded) == fingerprint
    assert base_fingerprint(copy.deepcopy(model).to(torch.bfloat16)) == fingerprint  # a bf16 load of one checkpoint
    with torch.no_grad():
        text_model(reloaded).layers[3].mlp.down_proj.weight.mul_(1.5)  # one tensor of a deep layer
    assert base_fingerprint(reloaded) != fingerprint
    changed, _ = load_vlm(tmp_path / "base")
    with torch.no_grad():
        changed.model.multi_modal_projector.linear_1.bias.add_(0.25)
    assert base_fingerprint(changed) != fingerprint


def test_save_load_round_trip(tmp_path, tiny):
    model, processor = tiny("llava")
    twig = grow_twig(model, K=1, T=2)
    with torch.no_grad():
        for p in twig.parameters():
            p.add_(0.01 * torch.randn_like(p))  # not just a copy of the base
    save_twig(twig, tmp_path / "twig", model, trained={"steps": 3})
    assert sorted(p.name for p in (tmp_path / "twig").iterdir()) == ["twig.json", "twig.safetensors"]
    meta = json.loads((tmp_path / "twig" / "twig.json").read_text())
    assert meta["format"] == "vlm-batch-twig/1" and (meta["K"], meta["T"]) == (1, 2)
    assert meta["base_fingerprint"] == base_fingerprint(model) and meta["base_model_type"] == "llava"
    assert (meta["base_layers"], meta["hidden_size"], meta["vocab_size"]) == (4, 64, model.lm_head.out_features)
    assert meta["trained"] == {"steps": 3}
    loaded = load_twig(tmp_path / "twig", model)
    assert loaded.layer_ids == twig.layer_ids
    for (name, a), (_, b) in zip(twig.state_dict().items(), loaded.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    inputs = _inputs(processor)
    with torch.no_grad():
        hidden = hidden_after_layer(model, 1, **inputs)
        args = (hidden, _positions(hidden.shape[1]), None, text_model(model).rotary_emb)
        torch.testing.assert_close(loaded(*args), twig(*args), rtol=0, atol=0)


def test_load_refuses_a_twig_of_another_base(tmp_path, tiny):
    model, _ = tiny("llava")
    save_twig(grow_twig(model, K=2, T=1), tmp_path / "twig", model)
    other, _ = BUILDERS["llava"](seed=1)  # same architecture, other weights
    with pytest.raises(ValueError) as error:
        load_twig(tmp_path / "twig", other)
    message = str(error.value)
    assert "trained on another base model" in message and str(tmp_path / "twig") in message
    assert base_fingerprint(model) in message and base_fingerprint(other) in message


def test_load_refuses_wrong_format_and_geometry(tmp_path, tiny):
    model, _ = tiny("llava")
    save_twig(grow_twig(model, K=2, T=1), tmp_path / "twig", model)
    meta_path = tmp_path / "twig" / "twig.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "format": "something-else/2"}))
    with pytest.raises(ValueError, match="format 'something-else/2'"):
        load_twig(tmp_path / "twig", model)
    for key in ("hidden_size", "vocab_size"):
        meta_path.write_text(json.dumps({**meta, key: meta[key] + 1}))
        with pytest.raises(ValueError, match=f"{key}={meta[key] + 1} but the base model has {key}={meta[key]}"):
            load_twig(tmp_path / "twig", model)
    with pytest.raises(FileNotFoundError, match="not a twig directory"):
        load_twig(tmp_path, model)


def test_load_from_an_fsspec_uri(tmp_path, tiny):
    model, _ = tiny("llava")
    twig = grow_twig(model, K=2, T=2)
    uri = "memory://twig-tests/llava-twig"
    save_twig(twig, uri, model)
    loaded = load_twig(uri, model, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").iterdir())) == 1
    for (name, a), (_, b) in zip(twig.state_dict().items(), loaded.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    load_twig(uri, model, cache_dir=tmp_path / "cache")  # cached: no second copy
    assert len(list((tmp_path / "cache").iterdir())) == 1


# --- training: data and labels --------------------------------------------------------------------


def _label_text(tokenizer, encoded) -> list[str]:
    """Label runs as space-joined tokens, one string per run of consecutive label tokens."""
    runs, current = [], []
    for token, label in zip(encoded.input_ids.tolist(), encoded.labels.tolist(), strict=True):
        if label != tt.IGNORE:
            assert label == token
            current.append(token)
        elif current:
            runs.append(" ".join(tokenizer.convert_ids_to_tokens(current)))
            current = []
    if current:
        runs.append(" ".join(tokenizer.convert_ids_to_tokens(current)))
    return runs


def test_llava_json_reader_labels_only_gpt_turns(tmp_path, tiny):
    _, processor = tiny("llava")
    (tmp_path / "imgs").mkdir()
    random_image(1).save(tmp_path / "imgs" / "a.png")
    random_image(2, 30, 30).save(tmp_path / "imgs" / "b.jpg")
    records = [
        {
            "id": "r1",
            "image": "a.png",
            "conversations": [
                {"from": "human", "value": "<image>\nwhat color is the circle ?"},
                {"from": "gpt", "value": "red"},
                {"from": "human", "value": "where is the square ?"},
                {"from": "gpt", "value": "on the left"},
            ],
        },
        {
            "id": "r2",
            "image": "b.jpg",
            "conversations": [{"from": "human", "value": "how many ?\n<image>"}, {"from": "gpt", "value": "two"}],
        },
        {"id": "r3", "conversations": [{"from": "human", "value": "yes ?"}, {"from": "gpt", "value": "no"}]},
        {"id": "bad", "conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "b"}]},
    ]
    (tmp_path / "data.json").write_text(json.dumps(records))
    conversations, info = tt.read_llava_json(str(tmp_path / "data.json"), str(tmp_path / "imgs"))
    assert info == {"records": 4, "skipped": 1}
    first, second, text_only = conversations
    assert first.turns == [("what color is the circle ?", "red"), ("where is the square ?", "on the left")]
    assert (first.kind, second.kind, text_only.kind) == ("image", "image", None)
    assert second.turns == [("how many ?", "two")]

    encoded = tt.encode(processor, first)
    assert _label_text(processor.tokenizer, encoded) == ["red </s>", "on the left </s>"]
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert int((encoded.input_ids == image_id).sum()) == (48 // 4) ** 2  # one image, its patches
    assert (encoded.labels[encoded.input_ids == image_id] == tt.IGNORE).all()
    text, _ = tt.conversation_text(processor, first, 1)
    assert text.startswith("USER: <image>\nwhat color is the circle ? ASSISTANT: red</s>USER: where")
    assert _label_text(processor.tokenizer, tt.encode(processor, text_only)) == ["no </s>"]

    batch = tt.collate([tt.encode(processor, c) for c in conversations], processor.tokenizer.pad_token_id)
    assert batch["pixel_values"].shape[0] == 2  # two images, the text-only row has none
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape


def test_first_prompt_is_the_engines_and_chat_templates_work(tiny):
    from operators.engine import format_prompt

    _, processor = tiny("llava")
    conversation = tt.Conversation("x", [("what color is it ?", "red"), ("how many ?", "two")], "image")
    text, spans = tt.conversation_text(processor, conversation, 1)
    assert text.startswith(format_prompt(processor, "what color is it ?", "image") + " red</s>")
    templated = copy.deepcopy(processor)
    templated.chat_template = (  # Hugging Face's llava-1.5 template, abridged
        "{% for message in messages %}{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
        "{% for content in message['content'] %}{% if content['type'] == 'image' %}{{ '<image>\n' }}"
        "{% elif content['type'] == 'text' %}{{ content['text'] + ' ' }}{% endif %}{% endfor %}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
    )
    text, spans = tt.conversation_text(templated, conversation, 1)
    assert text.startswith(format_prompt(templated, "what color is it ?", "image"))
    assert [text[a:b] for a, b in spans] == [" red</s>", " two</s>"]
    conversation.load_media = lambda: [random_image(0)]
    assert _label_text(templated.tokenizer, tt.encode(templated, conversation)) == ["red </s>", "two </s>"]


def test_shapes_conversations_and_corpus_reader_agree(tmp_path):
    from synthetic.corpus import write_corpus
    from training.demo_model import CAPTION_PROMPT

    generated = tt.shapes_conversations(7, 2, 1, frames_per_video=3, qa_per_item=-1)
    write_corpus(str(tmp_path / "corpus"), 7, 2, 1)
    read = tt.corpus_conversations(str(tmp_path / "corpus"), frames_per_video=3, qa_per_item=-1)
    assert [c.id for c in generated] == [c.id for c in read]
    assert [c.turns for c in generated] == [c.turns for c in read]
    assert generated[0].turns[0][0] == CAPTION_PROMPT["image"] and generated[0].source == "caption"
    video = [c for c in read if c.kind == "video"][0]
    frames = video.load_media()
    assert len(frames) == 3 and all(isinstance(f, Image.Image) for f in frames)
    assert tt.held_out(generated[0], 100) and not tt.held_out(generated[0], 0)


# --- training: end to end ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_demo_model(tmp_path_factory):
    """An untrained demo-architecture model (shapes-world tokenizer) at test size, saved as a checkpoint."""
    from synthetic.world import WorldConfig
    from training.demo_model import DemoModelConfig, build_llava, build_processor, build_tokenizer

    world = WorldConfig()
    cfg = DemoModelConfig(
        vision_width=32, vision_layers=2, text_width=48, text_layers=4, text_heads=2, text_kv_heads=2, text_ffn=96
    )
    torch.manual_seed(0)
    tokenizer = build_tokenizer(world)
    model = build_llava(tokenizer, world, cfg)
    directory = tmp_path_factory.mktemp("demo") / "model"
    model.save_pretrained(directory, safe_serialization=True)
    build_processor(tokenizer, world, cfg).save_pretrained(directory)
    (directory / "training_report.json").write_text(json.dumps({"model": {"frames_per_video": 2}}))
    return directory


def test_agreement_is_one_when_the_twig_is_the_rest_of_the_base(tiny):
    model, processor = tiny("llava")
    conversations = [
        tt.Conversation("a", [("what color is it ?", "red . the circle")], "image", lambda: [random_image(3)]),
        tt.Conversation("b", [("how many ?", "two")], None),
    ]
    encoded = [tt.encode(processor, c) for c in conversations]
    result = tt.agreement(model, processor, grow_twig(model, K=2, T=2), encoded, K=2)
    assert result["all"]["twig_base_agreement"] == 1.0 and result["all"]["tokens"] == 7
    assert result["all"]["twig_accuracy"] == result["all"]["base_accuracy"]


def test_training_job_runs_and_writes_a_loadable_twig(tmp_path, small_demo_model):
    from training.twig_cli import train

    out = tmp_path / "twig"
    report = train(
        [
            "--model", str(small_demo_model), "--out", str(out), "--K", "1", "--T", "2",
            "--seed", "5", "--images", "8", "--videos", "2", "--steps", "6", "--batch-size", "4",
            "--lr", "3e-3", "--warmup", "1", "--log-every", "2", "--distill", "1.0",
            "--eval-images", "2", "--eval-videos", "1", "--eval-generated", "1", "--max-new-tokens", "3",
            "--base-features", "--feature-drop", "0.3",
        ]
    )  # fmt: skip
    losses = report["train"]["losses"]
    assert len(losses) == 6 and all(math.isfinite(v) for v in losses)
    assert report["train"]["final_loss"] < losses[0]  # a random model: memorising the answers is easy
    assert json.loads((out / "training_report.json").read_text())["command"].startswith("python jobs/train_twig.py")
    for key in ("held_out_before", "held_out", "base_greedy_before", "base_greedy"):
        assert 0 <= report[key]["all"]["twig_base_agreement"] <= 1
    assert report["data"]["train_conversations"] == {"caption": 10, "qa": 10}
    model, _ = load_vlm(small_demo_model)
    twig = load_twig(out, model)
    assert (twig.K, twig.T) == (1, 2)
    assert twig.base_features and bool(twig.feature_in.weight.abs().sum() > 0)  # trained from zero
    assert json.loads((out / "twig.json").read_text())["trained"]["steps"] == 6


def test_training_job_reads_a_corpus(tmp_path, small_demo_model):
    from synthetic.corpus import write_corpus
    from training.twig_cli import train

    write_corpus(str(tmp_path / "corpus"), 3, 4, 2)
    report = train(
        [
            "--model", str(small_demo_model), "--out", str(tmp_path / "twig"), "--corpus", str(tmp_path / "corpus"),
            "--eval-percent", "40", "--steps", "2", "--batch-size", "4", "--eval-generated", "0", "--T", "1",
        ]
    )  # fmt: skip
    data = report["data"]
    assert sum(data["train_conversations"].values()) + sum(data["held_out_conversations"].values()) == 12
    assert report["config"]["T"] == 1 and len(report["train"]["losses"]) == 2


@pytest.mark.slow  # ~30 s of Ray Train start-up (make test-all)
@pytest.mark.timeout(300)
def test_ray_train_path_with_two_cpu_workers(tmp_path, small_demo_model):
    """TorchTrainer with two CPU workers (gloo DDP on the twig) on a fresh local cluster: about 25 s."""
    pytest.importorskip("ray.train")
    import ray

    from training.twig_cli import train

    try:
        report = train(
            [
                "--model", str(small_demo_model), "--out", str(tmp_path / "twig"),
                "--images", "8", "--videos", "0", "--steps", "3", "--batch-size", "2", "--threads", "1",
                "--eval-images", "2", "--eval-videos", "0", "--eval-generated", "0",
                "--ray-workers", "2", "--ray-storage", str(tmp_path / "ray"), "--ray-address", "local",
            ]
        )  # fmt: skip
    finally:
        ray.shutdown()
    assert report["world_size"] == 2 and report["ray_workers"] == 2
    assert len(report["train"]["losses"]) == 3 and all(math.isfinite(v) for v in report["train"]["losses"])
    model, _ = load_vlm(small_demo_model)
    assert (report["config"]["K"], report["config"]["T"]) == (2, 1)  # default T keeps K + T below the 4 layers
    assert load_twig(tmp_path / "twig", model).T == 1


def test_the_committed_demo_twig_loads_on_the_demo_model():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "models" / "shapes-llava"
    model, _ = load_vlm(root)
    twig = load_twig(root / "twig", model)
    meta = json.loads((root / "twig" / "twig.json").read_text())
    assert (twig.K, twig.T) == (meta["K"], meta["T"]) and twig.K + twig.T < 4
    assert twig.layer_ids == [4 + t for t in range(twig.T)]
    report = json.loads((root / "twig" / "training_report.json").read_text())
    assert report["held_out"]["all"]["twig_base_agreement"] > report["held_out_before"]["all"]["twig_base_agreement"]
