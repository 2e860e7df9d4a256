"""What a decoder is, and what it returns."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from operators.batch import PromptBatch
from operators.decoding.sampling import Sampler
from operators.prefill import InLLMPruning, LayerPlan, PrefillState
from operators.settings import EngineConfig


@dataclass
class DraftStats:
    drafted: torch.Tensor  # [B] draft tokens proposed
    accepted: torch.Tensor  # [B] draft tokens the base accepted
    rounds: torch.Tensor  # [B] verification rounds each row took part in


@dataclass
class Generation:
    tokens: torch.Tensor  # [B, T] generated ids; after a row's EOS, the pad id
    lengths: torch.Tensor  # [B] generated tokens per row, EOS included
    prefill_state: PrefillState
    prefill_s: float  # up to the first generated token(s): SSD folds its first verification into it
    decode_s: float
    stats: DraftStats | None = None  # speculative decoders only


class Decoder:
    """Built once per engine. ``generate`` runs the staged prefill (``operators.prefill``) and then
    produces up to ``max_new_tokens`` per row, stopping a row at any of ``eos_token_ids``."""

    name = ""
    uses_twig = False  # the twig must run in the prefill (its cache is drafted from)
    drop_finished = True  # row compaction (``should_compact``); off only to compare against it

    def __init__(self, config: EngineConfig, eos_token_ids: list[int], pad_token_id: int):
        self.config = config
        self.max_new_tokens = config.max_new_tokens
        self.eos_token_ids = list(eos_token_ids)
        self.pad_token_id = pad_token_id

    def generate(
        self,
        model: nn.Module,
        batch: PromptBatch,
        plan: LayerPlan,
        twig: nn.Module | None = None,
        pruning: InLLMPruning | None = None,
        sampler: Sampler | None = None,
    ) -> Generation:
        raise NotImplementedError


def should_compact(finished: int, working: int) -> bool:
    """Whether to drop the ``finished`` rows of a working batch of ``working`` rows now.

    When at least a quarter of it finished (and some rows still run). Gathering every cache group
    copies each remaining row's whole KV buffer once, about what one step reads; waiting for a
    quarter bounds the rows computed for nothing to 25% of the batch while a batch of B rows
    compacts at most about log(B) / log(4/3) times."""
    return 0 < finished < working and 4 * finished >= working


def sync(device: torch.device) -> None:
    """Wait for the device, so wall-clock stage times are real."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
