"""The one-layer hook gives what HF's eager ``output_attentions`` would, without all the maps."""

import pytest
import torch
from transformers import CLIPVisionModel

from operators.vision import encode_with_cls_attention, encoder_layers, resolve_layer
from tests.tiny_models import tiny_vision_config


@pytest.mark.parametrize("feature_layer", [-2, -1, 1, 2])
def test_hooked_cls_attention_matches_eager_attentions(feature_layer):
    torch.manual_seed(0)
    config = tiny_vision_config(image_size=32, patch_size=4)
    config._attn_implementation = "eager"
    tower = CLIPVisionModel(config).eval()
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        reference = tower(pixel_values=pixels, output_hidden_states=True, output_attentions=True)
    ours = encode_with_cls_attention(tower, pixels, feature_layer)
    # hidden_states[f] is produced by the layer whose map is attentions[f - 1] for f >= 1, attentions[f] for f < 0.
    attention_index = feature_layer - 1 if feature_layer > 0 else feature_layer
    torch.testing.assert_close(ours.features, reference.hidden_states[feature_layer])
    torch.testing.assert_close(ours.cls_attention, reference.attentions[attention_index][:, :, 0, 1:])


def test_hook_works_on_sdpa_tower_and_is_removed():
    config = tiny_vision_config(image_size=32, patch_size=4)
    tower = CLIPVisionModel(config).eval()
    out = encode_with_cls_attention(tower, torch.randn(1, 3, 32, 32))
    assert out.cls_attention.shape == (1, 4, 64)
    assert out.features.shape == (1, 65, 32)
    layer = encoder_layers(tower)[resolve_layer(3, -2)]
    assert not layer._forward_hooks and not layer.self_attn._forward_pre_hooks


def test_resolve_layer_rejects_out_of_range():
    assert resolve_layer(24, -2) == 22
    with pytest.raises(ValueError):
        resolve_layer(3, -5)
    with pytest.raises(ValueError):
        resolve_layer(3, [-2, -1])
