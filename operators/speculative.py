"""TwigVLM on the engine's KV cache: twig-guided pruning (TTP) and self-speculative decoding (SSD).

Token sets per layer range (0-indexed base layers, L layers, twig on base layer K):

    [0, K)        "shallow": every token; shared by the twig (drafting) and the base (verifying)
    twig layers   their own cache, every token: the draft always sees all visual tokens
    [K, F)        "mid": text + the R visual tokens the twig's last layer attends to most
    [F, L)        "deep" (FinalWipe, F = K_f): text only

SSD drafts greedily with the twig, up to ``max_draft`` tokens per row, stopping a row early at a
draft whose own probability is below ``threshold`` (that token is kept) or at EOS, then verifies
every row's drafts in one forward of the base's mid and deep layers. Each row accepts its own
longest matching prefix plus the base's next token. Rejected drafts become holes in every cache
(per-row validity), trailing holes are trimmed, so rows never wait on each other's bookkeeping
and the output is the base's greedy output token for token.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from operators.decoder import compact_rows, fastv_keep_mask, last_token_attention, new_group, run_layers, text_model
from operators.generate import Generation, _sync
from operators.kv_cache import CacheGroup, KVCache


@dataclass
class TwigPrefill:
    base: KVCache  # groups: shallow, mid, (deep)
    twig: KVCache  # one group over the twig's layer ids
    first_logits: torch.Tensor  # [B, V] base logits for the first new token (float32)
    next_position: torch.Tensor  # [B] position of the first new token
    tokens_per_layer: torch.Tensor  # [B, L] valid prompt tokens per base layer (accounting)
    visual_kept: torch.Tensor  # [B] visual tokens kept at layer K (TTP's R, summed over segments)


@dataclass
class DraftStats:
    drafted: torch.Tensor  # [B] draft tokens proposed
    accepted: torch.Tensor  # [B] draft tokens the base accepted
    rounds: torch.Tensor  # [B] verification rounds each row took part in


def _modules(twig: nn.Module) -> dict[int, nn.Module]:
    return dict(zip(twig.layer_ids, twig.layers, strict=True))


@torch.no_grad()
def ttp_prefill(
    model: nn.Module,
    twig: nn.Module,
    embeds: torch.Tensor,
    positions: torch.Tensor,
    valid: torch.Tensor,
    prunable: torch.Tensor,
    keep: torch.Tensor | None,
    finalwipe_layer: int | None,
    capacity: int,
    visual: torch.Tensor | None = None,
) -> TwigPrefill:
    """Run a left-padded prompt through shallow layers, the twig, and the pruned base layers.

    embeds [B, S, D]; positions/valid/prunable [B, S]; keep [B] prunable tokens kept at layer K
    (None: no TTP); finalwipe_layer F (None: none) drops every visual token (``visual`` [B, S],
    default ``prunable``: it also covers NeXT's newlines and Video-LLaVA's per-frame CLS, which
    TTP keeps) from base layer F on (0-indexed, F = K_f). ``capacity`` = tokens each cache may
    grow by after the prompt.
    """
    lm = text_model(model)
    batch, length, _ = embeds.shape
    n_layers, k = len(lm.layers), twig.K
    wipe = n_layers if finalwipe_layer is None else finalwipe_layer
    if not k < wipe <= n_layers:
        raise ValueError(f"finalwipe layer must be in {k + 1}..{n_layers} (after the twig's K={k}), got {wipe}")
    tokens_per_layer = valid.sum(dim=1, keepdim=True).repeat(1, n_layers)

    shallow = new_group(lm, range(0, k), batch, length + capacity, embeds)
    base = KVCache([shallow])
    hidden_k = run_layers(lm, embeds, positions, valid, base, shallow)

    twig_group = new_group(lm, list(twig.layer_ids), batch, length + capacity, embeds)
    twig_cache = KVCache([twig_group])
    inputs: dict[int, torch.Tensor] = {}
    run_layers(lm, hidden_k, positions, valid, twig_cache, twig_group, inputs, _modules(twig))

    visual = (prunable if visual is None else visual) & valid
    if keep is not None:
        last = twig.layer_ids[-1]
        scores = last_token_attention(lm, last, inputs[last], positions, twig_group, layer=twig.layers[-1])
        kept = fastv_keep_mask(scores, prunable & valid, keep) & valid
    else:
        kept = valid
    mid_valid, hidden, mid_positions, mid_visual = compact_rows(kept, hidden_k, positions, visual.long())
    mid = new_group(lm, range(k, wipe), batch, mid_valid.shape[1] + capacity, embeds)
    base = KVCache([shallow, mid])
    hidden = run_layers(lm, hidden, mid_positions, mid_valid, base, mid)
    tokens_per_layer[:, k:wipe] = mid_valid.sum(dim=1, keepdim=True)
    visual_kept = (mid_visual.bool() & mid_valid).sum(dim=1)
    if wipe < n_layers:  # FinalWipe: text only from layer F on
        text = mid_valid & ~mid_visual.bool()
        deep_valid, hidden, mid_positions = compact_rows(text, hidden, mid_positions)
        deep = new_group(lm, range(wipe, n_layers), batch, deep_valid.shape[1] + capacity, embeds)
        base = KVCache([shallow, mid, deep])
        hidden = run_layers(lm, hidden, mid_positions, deep_valid, base, deep)
        tokens_per_layer[:, wipe:] = deep_valid.sum(dim=1, keepdim=True)
    first_logits = model.lm_head(lm.norm(hidden[:, -1])).float()
    return TwigPrefill(base, twig_cache, first_logits, mid_positions[:, -1] + 1, tokens_per_layer, visual_kept)


def shallow_step(lm, embeds, positions, block_valid, cache: KVCache) -> torch.Tensor:
    """Base layers [0, K) on a block [B, q, D]; returns the hidden state after layer K."""
    return run_layers(lm, embeds, positions, block_valid, cache, cache.groups[0])


def twig_logits(lm, twig, hidden_k, positions, block_valid, cache: KVCache) -> torch.Tensor:
    """The twig's next-token logits [B, q, V] (float32) for a block of layer-K hidden states."""
    hidden = run_layers(lm, hidden_k, positions, block_valid, cache, cache.groups[0], modules=_modules(twig))
    return twig.head(twig.norm(hidden)).float()


def base_logits(model, lm, hidden_k, positions, block_valid, cache: KVCache) -> torch.Tensor:
    """The base's logits [B, q, V] (float32) from layer-K hidden states, through mid and deep."""
    hidden = hidden_k
    for group in cache.groups[1:]:
        hidden = run_layers(lm, hidden, positions, block_valid, cache, group)
    return model.lm_head(lm.norm(hidden)).float()


def rejection_sample(
    drafts: torch.Tensor,
    n: torch.Tensor,
    q: torch.Tensor,
    p: torch.Tensor,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative sampling's accept/reject rule (Leviathan et al.; Chen et al.), per row.

    drafts [B, W-1] tokens drawn from q [B, W-1, V]; n [B] drafts per row; p [B, W, V] the base's
    distributions after each input. Draft j is accepted with probability min(1, p_j(d)/q_j(d));
    at the first rejection the next token is drawn from normalise(max(0, p_j - q_j)), and when
    every draft is accepted from p_n. The tokens that come out are distributed exactly as
    sampling the base alone. Returns (accepted [B], next token [B]).
    """
    batch, width = p.shape[:2]
    steps = torch.arange(width - 1, device=p.device)
    p_draft = p[:, : width - 1].gather(2, drafts[..., None])[..., 0]  # [B, W-1]
    q_draft = q.gather(2, drafts[..., None])[..., 0].clamp_min(1e-20)
    u = torch.rand(p_draft.shape, generator=generator, device=p.device)
    ok = (u < (p_draft / q_draft).clamp(max=1.0)) & (steps[None] < n[:, None])
    accepted = ok.long().cumprod(dim=1).sum(dim=1) if width > 1 else torch.zeros_like(n)
    rows = torch.arange(batch, device=p.device)
    target = p[rows, accepted]  # [B, V]
    rejected = accepted < n
    if width > 1:
        residual = (target - q[rows, accepted.clamp(max=width - 2)]).clamp_min(0.0)
        mass = residual.sum(dim=1, keepdim=True)
        # A zero residual happens only when p == q there, where rejection has probability 0.
        residual = torch.where(mass > 0, residual / mass.clamp_min(1e-30), target)
        target = torch.where(rejected[:, None], residual, target)
    next_token = torch.multinomial(target, 1, generator=generator)[:, 0]
    return accepted, next_token


class _Output:
    """Generated tokens per row with EOS and max_new_tokens handling."""

    def __init__(self, batch: int, max_new_tokens: int, eos: torch.Tensor, pad: int, device):
        self.tokens = torch.full((batch, max_new_tokens), pad, dtype=torch.long, device=device)
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)
        self.done = torch.zeros(batch, dtype=torch.bool, device=device)
        self.max_new_tokens, self.eos = max_new_tokens, eos

    def emit(self, row: int, token: int) -> None:
        if self.done[row]:
            return
        self.tokens[row, self.lengths[row]] = token
        self.lengths[row] += 1
        if token in self.eos.tolist() or int(self.lengths[row]) >= self.max_new_tokens:
            self.done[row] = True


def _pick(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """Greedy at temperature 0, else a sample from softmax(logits / temperature). logits [B, V] -> [B]."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    return torch.multinomial((logits / temperature).softmax(dim=-1), 1, generator=generator)[:, 0]


@torch.no_grad()
def ttp_generate(
    model,
    twig,
    embeds,
    positions,
    valid,
    prunable,
    keep,
    finalwipe_layer,
    max_new_tokens,
    eos_token_ids,
    pad_token_id,
    visual=None,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
) -> Generation:
    """Plain autoregressive decoding of the base with TTP + FinalWipe (SSD's reference): greedy at
    temperature 0, else sampling."""
    lm = text_model(model)
    device = embeds.device
    t0 = time.perf_counter()
    state = ttp_prefill(model, twig, embeds, positions, valid, prunable, keep, finalwipe_layer, max_new_tokens, visual)
    _sync(device)
    t1 = time.perf_counter()
    out = _Output(embeds.shape[0], max_new_tokens, torch.tensor(eos_token_ids, device=device), pad_token_id, device)
    logits, position = state.first_logits, state.next_position
    ones = torch.ones(embeds.shape[0], 1, dtype=torch.bool, device=device)
    for _ in range(max_new_tokens):
        token = _pick(logits, temperature, generator)
        for row in range(embeds.shape[0]):
            out.emit(row, int(token[row]))
        if bool(out.done.all()):
            break
        hidden_k = shallow_step(lm, lm.embed_tokens(token)[:, None], position[:, None], ones, state.base)
        logits = base_logits(model, lm, hidden_k, position[:, None], ones, state.base)[:, -1]
        position = position + 1
    _sync(device)
    width = int(out.lengths.max())
    return Generation(out.tokens[:, :width], out.lengths, state, t1 - t0, time.perf_counter() - t1)


@torch.no_grad()
def ssd_generate(
    model: nn.Module,
    twig: nn.Module,
    embeds: torch.Tensor,
    positions: torch.Tensor,
    valid: torch.Tensor,
    prunable: torch.Tensor,
    keep: torch.Tensor | None,
    finalwipe_layer: int | None,
    max_new_tokens: int,
    eos_token_ids: list[int],
    pad_token_id: int,
    max_draft: int = 5,
    threshold: float = 0.6,
    visual: torch.Tensor | None = None,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
) -> tuple[Generation, DraftStats]:
    """Batched self-speculative decoding. Greedy (temperature 0): output equals ``ttp_generate``'s
    token for token. Sampling: drafts are drawn from the twig and accepted by
    :func:`rejection_sample`, so the output is distributed as the base's own samples."""
    sampling = temperature > 0
    lm = text_model(model)
    device = embeds.device
    batch = embeds.shape[0]
    eos = torch.tensor(eos_token_ids, device=device)
    t0 = time.perf_counter()
    # Worst case a round writes max_draft + 1 slots and keeps one: size the caches for it.
    capacity = (max_new_tokens + 1) * (max_draft + 1)
    state = ttp_prefill(model, twig, embeds, positions, valid, prunable, keep, finalwipe_layer, capacity, visual)
    _sync(device)
    t1 = time.perf_counter()
    out = _Output(batch, max_new_tokens, eos, pad_token_id, device)
    stats = DraftStats(*(torch.zeros(batch, dtype=torch.long, device=device) for _ in range(3)))
    pending = _pick(state.first_logits, temperature, generator)  # [B] the base's own first token
    for row in range(batch):
        out.emit(row, int(pending[row]))
    position = state.next_position.clone()  # [B] position of `pending`
    groups: list[CacheGroup] = [*state.base.groups, *state.twig.groups]
    steps = torch.arange(max_draft + 1, device=device)

    while not bool(out.done.all()):
        active = ~out.done
        cap = (max_new_tokens - out.lengths - 1).clamp(min=0, max=max_draft)  # drafts that can still be emitted
        starts = {id(g): g.length for g in groups}
        drafts = torch.full((batch, max_draft), pad_token_id, dtype=torch.long, device=device)
        n = torch.zeros(batch, dtype=torch.long, device=device)
        drafting = active & (cap > 0)
        token, hidden_steps, valid_steps, draft_probs = pending, [], [], []
        # Draft: inputs pending, d_1, ..., d_n through shallow + twig; the last one only so the
        # base can verify d_n and the twig's cache holds every accepted token.
        for j in range(max_draft + 1):
            running = active & (n >= j)  # row b feeds input j while j <= n_b
            if j > 0 and not bool(running.any()):
                break
            step_valid = running[:, None]
            step_pos = (position + j)[:, None]
            hidden_k = shallow_step(lm, lm.embed_tokens(token)[:, None], step_pos, step_valid, state.base)
            logits = twig_logits(lm, twig, hidden_k, step_pos, step_valid, state.twig)[:, -1]
            hidden_steps.append(hidden_k)
            valid_steps.append(step_valid)
            if j == max_draft:
                break
            probs = (logits / temperature if sampling else logits).softmax(dim=-1)
            candidate = torch.multinomial(probs, 1, generator=generator)[:, 0] if sampling else probs.argmax(dim=-1)
            draft_probs.append(probs)
            make = drafting & running & (n < cap)
            drafts[:, j] = torch.where(make, candidate, drafts[:, j])
            n += make.long()
            low = probs.gather(1, candidate[:, None])[:, 0] < threshold
            drafting &= make & ~low & ~torch.isin(candidate, eos)
            token = torch.where(make, candidate, token)
        width = len(hidden_steps)
        block = torch.cat(hidden_steps, dim=1)  # [B, W, D]
        block_valid = torch.cat(valid_steps, dim=1)  # [B, W]
        block_pos = position[:, None] + steps[None, :width]
        verify = base_logits(model, lm, block, block_pos, block_valid, state.base)  # [B, W, V]
        if sampling:
            q = torch.stack(draft_probs[: width - 1], dim=1) if width > 1 else verify[:, :0]
            p = (verify / temperature).softmax(dim=-1)
            accepted, bonus = rejection_sample(drafts[:, : width - 1], n, q, p, generator)
        else:
            # Accept each row's longest prefix of drafts the base agrees with, plus its next token.
            target = verify.argmax(dim=-1)  # [B, W]
            matches = (drafts[:, : width - 1] == target[:, : width - 1]) & (steps[None, : width - 1] < n[:, None])
            accepted = matches.long().cumprod(dim=1).sum(dim=1) if width > 1 else torch.zeros_like(n)
            bonus = target.gather(1, accepted[:, None])[:, 0]
        rejected = block_valid & (steps[None, :width] > accepted[:, None])  # inputs after the accepted drafts
        for group in groups:
            group.drop(rejected, starts[id(group)])
            group.trim()
        for row in range(batch):
            if not active[row]:
                continue
            for j in range(int(accepted[row])):
                out.emit(row, int(drafts[row, j]))
            out.emit(row, int(bonus[row]))
        stats.drafted += torch.where(active, n, 0)
        stats.accepted += torch.where(active, accepted, 0)
        stats.rounds += active.long()
        pending = bonus
        position = position + accepted + 1
    _sync(device)
    width = int(out.lengths.max())
    generation = Generation(out.tokens[:, :width], out.lengths, state, t1 - t0, time.perf_counter() - t1)
    return generation, stats
