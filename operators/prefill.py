"""The staged prefill: a prompt batch through the language model, with the token set changing at
given layers, and the twig grown on layer K when a method or a decoder needs it.

Layers run in groups between breakpoints (0-indexed base layers, L of them)::

    [0, K)          every token                            (K = where an in-LLM method prunes)
    twig            at its K: the twig's layers, its own cache, over the tokens layer K saw
    [K, K_end)      text + each row's top keep[b] visual tokens by the method's scores
    [K_end, L)      text only (TwigVLM's FinalWipe; K_end = L: none)

Without in-LLM pruning there is one group (or two, split at the twig's K). Each group caches its
own token set (``operators.kv_cache``), so decoding continues over exactly what prefill kept.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from operators.batch import PromptBatch
from operators.kv_cache import CacheGroup, KVCache
from operators.language_model import compact_rows, new_group, next_positions, run_layers, text_model
from operators.pruning.base import ScoreContext, keep_top


@dataclass(frozen=True)
class LayerPlan:
    """Where the token set changes; every layer index counts base layers run before it."""

    n_layers: int  # L
    prune_layer: int | None = None  # K: layers [0, K) see every token, [K, ...) the kept ones
    wipe_layer: int | None = None  # K_end < L: layers [K_end, L) see text only
    twig_layer: int | None = None  # the twig runs on the hidden state after this many layers

    def breakpoints(self) -> list[int]:
        """Group boundaries strictly inside (0, L), ascending."""
        marks = {self.prune_layer, self.wipe_layer, self.twig_layer} - {None}
        return sorted(k for k in marks if 0 < k < self.n_layers)


@dataclass
class InLLMPruning:
    """What the prefill needs to prune at ``plan.prune_layer``."""

    scores: Callable[[ScoreContext], torch.Tensor]  # -> [B, S] importance at layer K
    keep: torch.Tensor  # [B] visual tokens each row keeps


@dataclass
class DeepInput:
    """Layer K's output when the deep layers are deferred (SSD folds them into its first verification)."""

    hidden: torch.Tensor  # [B, S, D] after layer K (and after pruning there)
    positions: torch.Tensor  # [B, S] (or [B, S, 3], multimodal RoPE)
    valid: torch.Tensor  # [B, S]
    visual: torch.Tensor  # [B, S]
    start: int  # K: the first deferred layer
    deepstack: torch.Tensor | None = None  # [B, S, levels, D] Qwen3-VL: levels after layer K still to add


@dataclass
class PrefillState:
    """Everything decoding continues from."""

    base: KVCache  # the base's layer groups, in layer order
    twig: KVCache | None  # the twig's own cache (one group), when it ran
    shallow_groups: int  # base groups before the twig's layer (SSD drafts through these)
    last_hidden: torch.Tensor  # [B, D] final-norm hidden state of each row's last prompt token
    next_position: torch.Tensor  # [B] position id of the first generated token
    tokens_per_layer: torch.Tensor  # [B, L] valid prompt tokens each base layer processed
    twig_tokens: torch.Tensor | None  # [B] valid prompt tokens each twig layer processed
    visual_kept: torch.Tensor  # [B] visual tokens the layers after K see (all of them without pruning)
    twig_last: torch.Tensor | None = None  # [B, D] the twig's output at each row's last prompt token
    deferred: DeepInput | None = None  # defer_deep: layers [K, L) have not run (last_hidden is layer K's)

    @property
    def shallow(self) -> list[CacheGroup]:
        """Base groups before the twig's layer K: the twig drafts from their output."""
        return self.base.groups[: self.shallow_groups]

    @property
    def deep(self) -> list[CacheGroup]:
        """Base groups from the twig's layer K on: they verify the drafts."""
        return self.base.groups[self.shallow_groups :]


@torch.no_grad()
def prefill(
    model: nn.Module,
    batch: PromptBatch,
    plan: LayerPlan,
    capacity: int,
    twig: nn.Module | None = None,
    pruning: InLLMPruning | None = None,
    defer_deep: bool = False,
) -> PrefillState:
    """Run the prompt batch through ``plan``'s layer groups; each cache may then grow by ``capacity``.
    ``defer_deep``: stop after the twig's layer K (and pruning there); ``deferred`` holds layer K's output."""
    lm = text_model(model)
    n_layers = len(lm.layers)
    if plan.n_layers != n_layers:
        raise ValueError(f"layer plan for {plan.n_layers} layers, model has {n_layers}")
    if plan.twig_layer is not None and twig is None:
        raise ValueError("the layer plan runs a twig but none was given")
    batch_size = len(batch)
    hidden, positions, valid, deepstack = batch.embeds, batch.positions, batch.valid, batch.deepstack
    visual, prunable = batch.visual & valid, batch.prunable & valid
    tokens_per_layer = valid.sum(dim=1, keepdim=True).repeat(1, n_layers)
    groups: list[CacheGroup] = []
    twig_cache, twig_tokens, shallow, twig_last, deferred = None, None, 0, None, None
    visual_kept = visual.sum(dim=1)
    next_position = next_positions(positions, valid)  # before pruning: HF continues after the unpruned prompt
    start = 0
    for end in [*plan.breakpoints(), n_layers]:
        group = new_group(lm, range(start, end), batch_size, valid.shape[1] + capacity, batch.embeds)
        groups.append(group)
        inputs: dict[int, torch.Tensor] = {}
        record = inputs if end == plan.prune_layer else None  # only the scores at K need layer inputs
        additions = deepstack_additions(deepstack, group.layers)
        hidden = run_layers(lm, hidden, positions, valid, KVCache(groups), group, record, additions=additions)
        tokens_per_layer[:, start:end] = valid.sum(dim=1, keepdim=True)
        context = ScoreContext(lm, positions, inputs, group)
        if end == plan.twig_layer:
            shallow = len(groups)
            twig_group = new_group(lm, list(twig.layer_ids), batch_size, valid.shape[1] + capacity, batch.embeds)
            twig_cache = KVCache([twig_group])
            context.twig, context.twig_inputs, context.twig_group = twig, {}, twig_group
            twig_out = run_layers(
                lm, hidden, positions, valid, twig_cache, twig_group, context.twig_inputs, twig.modules_by_id
            )
            twig_last = twig_out[:, -1]
            twig_tokens = valid.sum(dim=1)
        if end == plan.prune_layer and end < n_layers and pruning is not None:
            kept = keep_top(pruning.scores(context), prunable, pruning.keep) & valid
            valid, hidden, positions, visual, prunable, deepstack = _compact(
                kept, hidden, positions, visual, prunable, deepstack
            )
            visual_kept = visual.sum(dim=1)
        if end == plan.wipe_layer and end < n_layers:
            valid, hidden, positions, visual, prunable, deepstack = _compact(
                valid & ~visual, hidden, positions, visual, prunable, deepstack
            )
        start = end
        if defer_deep and end == plan.twig_layer:
            deferred = DeepInput(hidden, positions, valid, visual, end, deepstack)
            break
    return PrefillState(
        base=KVCache(groups),
        twig=twig_cache,
        shallow_groups=shallow,
        last_hidden=lm.norm(hidden[:, -1]),
        next_position=next_position,
        tokens_per_layer=tokens_per_layer,
        twig_tokens=twig_tokens,
        visual_kept=visual_kept,
        twig_last=twig_last,
        deferred=deferred,
    )


def _compact(keep: torch.Tensor, hidden, positions, visual, prunable, deepstack=None) -> tuple[torch.Tensor, ...]:
    """Each row's kept tokens, left-padded to the longest row (``operators.language_model.compact_rows``);
    DeepStack features [B, S, levels, D], when there are any, follow their tokens."""
    extra = () if deepstack is None else (deepstack,)
    valid, hidden, positions, visual, prunable, *rest = compact_rows(keep, hidden, positions, visual, prunable, *extra)
    return valid, hidden, positions, visual & valid, prunable & valid, (rest[0] if rest else None)


def deepstack_additions(deepstack: torch.Tensor | None, layers) -> dict[int, torch.Tensor] | None:
    """Layer id -> the DeepStack level added after it ([B, S, D]), for the group's layers that have one."""
    if deepstack is None:
        return None
    return {i: deepstack[:, :, i] for i in layers if i < deepstack.shape[2]}
