"""TwigVLM's twig-guided pruning (TTP): after the twig's layer K, keep the visual tokens the twig's
last layer attends to most from the last prompt token; from layer K_f on (FinalWipe) keep none."""

from __future__ import annotations

import torch
from torch import nn

from operators.language_model import last_token_attention
from operators.pruning.base import InLLM, ScoreContext


def finalwipe_default(n_layers: int, twig_k: int) -> int:
    """3/4 of the depth (TwigVLM's 24 of 32), after the twig's K."""
    return max(twig_k + 1, min(n_layers, round(0.75 * n_layers)))


class TwigGuided(InLLM):
    name = "ttp"
    uses_twig = True

    def layers(self, n_layers: int, twig: nn.Module | None) -> tuple[int, int]:
        if twig is None:
            raise ValueError("pruning.method=ttp needs a trained twig (decode.twig)")
        wipe = self.config.finalwipe_layer
        wipe = finalwipe_default(n_layers, twig.K) if wipe is None else wipe
        if not twig.K < wipe <= n_layers:
            raise ValueError(
                f"pruning.finalwipe_layer must be in {twig.K + 1}..{n_layers} (after the twig's K={twig.K}), got {wipe}"
            )
        return twig.K, wipe

    def scores(self, context: ScoreContext) -> torch.Tensor:
        twig = context.twig
        last = twig.layer_ids[-1]
        inputs = context.twig_inputs[last]
        return last_token_attention(context.lm, last, inputs, context.positions, context.twig_group, twig.layers[-1])
