"""FastV (Chen et al., ECCV 2024): after layer K, keep the visual tokens the last prompt token
attends to most in layer K (head mean); layers 1..K see every token."""

from __future__ import annotations

import torch
from torch import nn

from operators.language_model import last_token_attention
from operators.pruning.base import InLLM, ScoreContext


class FastV(InLLM):
    name = "fastv"

    def layers(self, n_layers: int, twig: nn.Module | None) -> tuple[int, int]:
        k = self.config.fastv_layer
        if not 1 <= k <= n_layers:
            raise ValueError(f"pruning.fastv_layer: K must be in 1..{n_layers} for this model, got {k}")
        return k, n_layers

    def scores(self, context: ScoreContext) -> torch.Tensor:
        k = self.config.fastv_layer
        return last_token_attention(context.lm, k - 1, context.layer_inputs[k - 1], context.positions, context.group)
