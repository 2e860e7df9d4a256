"""oneDNN-packed CPU linears (operators.cpu_linear): same parameters, outputs within float rounding of
Hugging Face's, a fallback wherever the packed path does not apply, and SSD still equal to greedy
decoding on a packed model."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from evaluation.bench_twig_lm import compare
from operators import cpu_linear
from operators.cpu_linear import (
    MIN_PACKED_BYTES,
    PackedLinear,
    apply_cpu_linear,
    linear_bytes,
    pack_linears,
    packed_dtypes,
    packing_available,
)
from operators.language_model import base_logits
from operators.twig import grow_twig
from pipeline.config import ConfigError, load_config
from tests.conftest import BUILDERS
from tests.test_base_features import PROMPTS, feature_twig
from tests.test_speculative import assert_ssd_equals_greedy_with_and_without_ttp, batch_inputs
from tests.tiny_models import tiny_llama


def linears(module: nn.Module) -> dict[str, type]:
    return {name: type(m) for name, m in module.named_modules() if isinstance(m, nn.Linear | PackedLinear)}


def test_the_pinned_torch_has_the_packed_linear():
    # Without it pack_linears would quietly do nothing and compute.cpu_linear=onednn would change nothing.
    assert packing_available()


def test_packing_keeps_parameters_ties_and_outputs():
    model, tokenizer = tiny_llama(seed=3, num_hidden_layers=3)
    ids = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        before = model(**ids).logits
    state = {k: v.clone() for k, v in model.state_dict().items()}
    kinds = linears(model)
    assert pack_linears(model) == len(kinds) > 0
    assert set(linears(model).values()) == {PackedLinear}
    assert pack_linears(model) == 0  # packing twice changes nothing
    after_state = model.state_dict()
    assert after_state.keys() == state.keys()
    assert all(torch.equal(after_state[k], v) for k, v in state.items())
    if model.config.tie_word_embeddings:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    with torch.no_grad():
        after = model(**ids).logits
    assert_close(after, before, atol=1e-4, rtol=1e-4)
    assert model.lm_head.out_features == model.config.vocab_size  # code reads the wrapped module's sizes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_linear_matches_f_linear_for_any_row_count_and_shape(dtype):
    generator = torch.Generator().manual_seed(0)
    linear = nn.Linear(48, 80).to(dtype)
    packed = PackedLinear(linear)
    assert (packed._packed is not None) == (dtype in packed_dtypes())  # bf16: packed where the CPU can
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    for shape in [(1, 48), (3, 48), (2, 5, 48), (1, 1, 48)]:
        x = torch.randn(shape, generator=generator).to(dtype)
        with torch.no_grad():
            y = packed(x)
        assert y.shape == (*shape[:-1], 80) and y.dtype == dtype
        assert_close(y, F.linear(x, linear.weight, linear.bias), atol=tolerance, rtol=tolerance)


def test_bf16_is_packed_only_where_this_cpu_runs_onednn_bf16(monkeypatch):
    # An AVX2-only CPU (AMD Zen 1) has no oneDNN bf16 path: reordering a bf16 weight raises there.
    # Such a CPU must keep bf16 linears on F.linear rather than crash the job.
    assert torch.float32 in packed_dtypes()
    expected = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert (torch.bfloat16 in packed_dtypes()) == expected
    monkeypatch.setattr(cpu_linear, "packed_dtypes", lambda: (torch.float32,))
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4).to(torch.bfloat16))
    assert pack_linears(model) == 1
    assert type(model[0]) is PackedLinear and type(model[1]) is nn.Linear
    wrapped = PackedLinear(nn.Linear(8, 4).to(torch.bfloat16))  # made by hand: it must fall back, not raise
    assert wrapped._packed is None
    x = torch.randn(3, 8).to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(wrapped(x), F.linear(x, wrapped.weight, wrapped.bias))


def test_training_an_in_place_change_and_another_dtype_fall_back_or_repack():
    linear = nn.Linear(16, 8)
    packed = PackedLinear(linear)
    x = torch.randn(4, 16)
    # Autograd: the packed op has no backward, so a trainable weight goes through F.linear.
    packed(x).sum().backward()
    assert linear.weight.grad is not None and linear.weight.grad.abs().sum() > 0
    # An in-place change after packing is seen (the packed copy is rebuilt).
    with torch.no_grad():
        linear.weight.mul_(3.0)
        assert_close(packed(x), F.linear(x, linear.weight, linear.bias), atol=1e-5, rtol=1e-5)
        # A dtype the packed path does not take: F.linear on the converted weights.
        packed.double()
        x64 = x.double()
        assert_close(packed(x64), F.linear(x64, linear.weight.double(), linear.bias.double()))


def test_base_logits_run_a_packed_head_packed_and_agree_with_the_plain_product():
    model, _ = tiny_llama(seed=6, num_hidden_layers=1)
    hidden = torch.randn(3, 4, model.config.hidden_size)
    plain = base_logits(model, hidden)
    pack_linears(model)
    calls = []
    model.lm_head.register_forward_hook(lambda *_: calls.append(1))
    packed = base_logits(model, hidden)
    assert calls == [1] and packed.shape == plain.shape == (3, 4, model.config.vocab_size)
    assert_close(packed, plain, atol=1e-5, rtol=1e-5)


def test_a_packed_model_copies_and_pickles_and_the_copy_repacks():
    model, tokenizer = tiny_llama(seed=5, num_hidden_layers=2)
    pack_linears(model)
    ids = tokenizer(PROMPTS[:2], return_tensors="pt", padding=True)
    buffer = io.BytesIO()
    torch.save(model, buffer)  # oneDNN's opaque tensors cannot be pickled: the copy drops them
    buffer.seek(0)
    for other in (copy.deepcopy(model), torch.load(buffer, weights_only=False)):
        assert isinstance(other.lm_head, PackedLinear) and other.lm_head._packed is None
        with torch.no_grad():
            assert torch.equal(other(**ids).logits, model(**ids).logits)
        assert other.lm_head._packed is not None  # repacked on its first call


def test_apply_cpu_linear_names_its_kernels():
    model, _ = tiny_llama(seed=1, num_hidden_layers=2)
    assert apply_cpu_linear("aten", model) == 0 and PackedLinear not in set(linears(model).values())
    with pytest.raises(ValueError, match="allowed: onednn, aten"):
        apply_cpu_linear("mkl", model)
    twig = grow_twig(model, K=1, T=1)
    # A model this small stays in the caches, where PyTorch's own linear is faster: nothing is packed.
    size = linear_bytes(model, twig, model)  # a module given twice counts once
    assert size == sum(m.weight.numel() * 4 for m in [*model.modules(), *twig.modules()] if isinstance(m, nn.Linear))
    assert size < MIN_PACKED_BYTES and apply_cpu_linear("onednn", model, twig) == 0
    assert apply_cpu_linear("onednn", model, twig, min_bytes=size + 1) == 0
    assert apply_cpu_linear("onednn", model, twig, None, min_bytes=size) == len(linears(model)) + len(linears(twig))


@pytest.mark.parametrize("batch", [1, 4])
def test_ssd_equals_greedy_on_a_packed_vlm_with_ttp(batch):
    model, processor = BUILDERS["llava"](seed=0)  # not the session's shared tiny model: this one is packed
    twig = grow_twig(model, K=1, T=2)
    apply_cpu_linear("onednn", model, twig, min_bytes=0)
    assert_ssd_equals_greedy_with_and_without_ttp(model, twig, batch_inputs(model, processor, range(60, 60 + batch)))


def test_ssd_with_base_features_equals_greedy_on_a_packed_causal_lm():
    model, tokenizer = tiny_llama(seed=14, num_hidden_layers=6)
    twig = feature_twig(model, scale=1.0)
    apply_cpu_linear("onednn", model, twig, min_bytes=0)
    assert isinstance(twig.feature_in, PackedLinear) and isinstance(twig.head, PackedLinear)
    rows = compare(model, twig, tokenizer, PROMPTS, [1, 4], max_new_tokens=16, label="packed")
    assert all(r["identical"] == 1.0 and r["generated"] > len(PROMPTS) for r in rows)


def test_the_config_key_is_validated_with_its_allowed_values():
    assert load_config(None, []).compute.cpu_linear == "onednn"
    assert load_config(None, ["compute.cpu_linear=aten"]).compute.cpu_linear == "aten"
    with pytest.raises(ConfigError, match=r"compute\.cpu_linear.*'onednn' or 'aten'"):
        load_config(None, ["compute.cpu_linear=mkl"])
    # A kernel choice changes float rounding, not what a row means: resumed runs keep their rows.
    assert load_config(None, ["compute.cpu_linear=aten"]).fingerprint() == load_config(None, []).fingerprint()
