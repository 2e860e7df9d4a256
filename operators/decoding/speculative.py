"""TwigVLM's self-speculative decoding (SSD) on the engine's KV cache.

The shallow base layers [0, K) plus the twig draft greedily (or, sampling, from the twig's
distribution), up to ``max_draft`` tokens per row, stopping a row early at a draft whose own
probability is below ``draft_threshold`` (that token is kept) or at EOS. One forward of the base's
layers from K on then verifies every row's drafts. Each row accepts its own longest matching prefix
plus the base's next token (sampling: the min(1, p/q) rule with residual resampling). Rejected
drafts become holes in every cache (per-row validity) and trailing holes are trimmed, so rows never
wait on each other's bookkeeping, and the output is the base's own: token for token greedy, or
distributed as the base's samples. Greedy SSD may also verify, beside the first drafts, the twig's next
most likely tokens as leaves of a draft tree (``draft_alternatives``, see ``_draft``): where the base
rejects a draft and agrees with one of them, that one is accepted instead.

As in TwigVLM (its Algorithm 1) the prefill stops after layer K and the twig: the first drafts come
from the twig's logits at the last prompt token, and one pass of the deep layers over [prompt, drafts]
finishes the prompt and verifies them (``finish_prefill``), one base pass fewer per request. The
twig's head may score a reduced draft vocabulary (``operators.twig.restrict_vocab``).

A twig with base features (``operators.twig.add_base_features``) gets, with the first input of each
round (the base's own last token), the base's final state at the position before it: the state
the verification has just computed, at the token whose logits gave that token. Later inputs of the
round, and the prompt, get none: the twig was trained with both.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from operators.batch import PromptBatch
from operators.decoding.base import Decoder, DraftStats, Generation, should_compact, sync
from operators.decoding.sampling import Sampler
from operators.kv_cache import CacheGroup, KVCache
from operators.language_model import base_logits, compact_rows, new_group, run_layers, text_model
from operators.prefill import InLLMPruning, LayerPlan, PrefillState, deepstack_additions, prefill


def rejection_sample(
    drafts: torch.Tensor, n: torch.Tensor, q: torch.Tensor, p: torch.Tensor, sampler: Sampler
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
    u = sampler.uniform(n, width - 1)
    ok = (u < (p_draft / q_draft).clamp(max=1.0)) & (steps[None] < n[:, None])
    accepted = ok.long().cumprod(dim=1).sum(dim=1) if width > 1 else torch.zeros_like(n)
    rows = torch.arange(batch, device=p.device)
    target = p[rows, accepted]  # [B, V]
    rejected = accepted < n
    if width > 1:
        fallback = residual(target, q[rows, accepted.clamp(max=width - 2)])
        target = torch.where(rejected[:, None], fallback, target)
    return accepted, sampler.categorical(target)


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """normalise(max(0, p - q)) [B, V]: what a rejected draft is replaced by. Where q is zero (tokens
    outside a draft vocabulary) it is p's own mass: those tokens come only from here."""
    out = (p - q).clamp_min(0.0)
    mass = out.sum(dim=1, keepdim=True)
    # A zero residual happens only when p == q there, where rejection has probability 0.
    return torch.where(mass > 0, out / mass.clamp_min(1e-30), p)


class _Output:
    """Generated tokens of every original row with EOS and max_new_tokens handling, appended a block
    per working row at a time with tensor ops: no per-row loop and no host sync."""

    def __init__(self, batch: int, max_new_tokens: int, eos: list[int], pad: int, device):
        # One spare column: the slots of a block a row does not take are written there, then cut off.
        self.buffer = torch.full((batch, max_new_tokens + 1), pad, dtype=torch.long, device=device)
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)
        self.done = torch.zeros(batch, dtype=torch.bool, device=device)
        self.max_new_tokens = max_new_tokens
        self.eos = torch.tensor(eos, dtype=torch.long, device=device)

    @property
    def tokens(self) -> torch.Tensor:
        return self.buffer[:, : self.max_new_tokens]

    def emit(self, rows: torch.Tensor, block: torch.Tensor, counts: torch.Tensor) -> None:
        """Append block[i, :counts[i]] to original row rows[i] (rows [B'], block [B', W], counts [B']),
        up to and including a row's first EOS and up to max_new_tokens; a row already done takes none."""
        width = block.shape[1]
        steps = torch.arange(width, device=block.device)
        lengths, done = self.lengths[rows], self.done[rows]
        room = self.max_new_tokens - lengths
        counts = torch.where(done, 0, torch.minimum(counts, room))
        is_eos = torch.isin(block, self.eos) & (steps[None] < counts[:, None])
        hit = is_eos.any(dim=1)
        counts = torch.where(hit, is_eos.long().argmax(dim=1) + 1, counts)  # up to the first EOS, included
        take = steps[None] < counts[:, None]
        index = torch.where(take, lengths[:, None] + steps[None], self.max_new_tokens)
        self.buffer[rows[:, None].expand_as(index), index] = block
        self.lengths[rows] = lengths + counts
        self.done[rows] = done | hit | (lengths + counts >= self.max_new_tokens)


@dataclass
class _Draft:
    """One round's drafting: the tokens, and the layer-K hidden states the base will verify."""

    tokens: torch.Tensor  # [B, max_draft] drafts (pad beyond n)
    n: torch.Tensor  # [B] drafts per row
    hidden: torch.Tensor  # [B, W, D] layer-K states of inputs pending, then the C draft slots (folded: no pending)
    valid: torch.Tensor  # [B, W] which of those inputs each row fed (alternatives: never, they are leaves)
    dense: bool  # every row fed every one of those inputs (known on the host: no mask needed for holes)
    probs: list[torch.Tensor]  # sampling: the twig's distribution [B, V] at each draft step (greedy: none)
    # The C draft slots, in cache order: at each depth j its alternatives, then d_j (``_draft``).
    depth: torch.Tensor  # [C] depth j of each slot (1-based: d_j's position after pending)
    chain: torch.Tensor  # [C] bool: the slot holds d_j (False: an alternative to d_j, a leaf)
    slot_tokens: torch.Tensor  # [B, C] each slot's token
    candidate: torch.Tensor  # [B, C] the slot holds a token the row drafted (d_j with j <= n, or its alternatives)
    chain_list: list[bool]  # ``chain`` on the host (where holes are, without a device read)


class SelfSpeculative(Decoder):
    name = "ssd"
    uses_twig = True
    # Fold the base's prefill into the first verification (TwigVLM's Algorithm 1): the first drafts
    # come from the twig's prompt logits and one pass of the deep layers both finishes the prompt and
    # verifies them, one base pass fewer per request. Off: the base's prefill gives the first token.
    fold_prefill = True

    @torch.no_grad()
    def generate(
        self,
        model: nn.Module,
        batch: PromptBatch,
        plan: LayerPlan,
        twig: nn.Module | None = None,
        pruning: InLLMPruning | None = None,
        sampler: Sampler | None = None,
    ) -> Generation:
        if twig is None or plan.twig_layer != twig.K:
            raise ValueError("self-speculative decoding needs a twig and a layer plan that runs it at its K")
        sampler = sampler or Sampler()
        lm = text_model(model)
        device, size = batch.embeds.device, len(batch)
        t0 = time.perf_counter()
        # Worst case a round writes max_draft + 1 slots plus the alternatives, and a row keeps only its
        # last one (an alternative after holes) while another row keeps none: size the caches for it.
        round_slots = self.config.max_draft + 1 + sum(self.config.draft_alternatives)
        capacity = (self.max_new_tokens + 1) * round_slots
        fold = self.fold_prefill and can_fold(plan, pruning)
        state = prefill(model, batch, plan, capacity, twig, pruning, defer_deep=fold)
        out = _Output(size, self.max_new_tokens, self.eos_token_ids, self.pad_token_id, device)
        stats = DraftStats(*(torch.zeros(size, dtype=torch.long, device=device) for _ in range(3)))
        # The working batch: rows[i] is the original row of working row i. Finished rows leave it
        # (``should_compact``); tokens and stats go to the original rows as they come.
        rows = torch.arange(size, device=device)
        finished = 0
        features = None  # [B, D] base features for `pending` (twigs that read them), else None
        if fold:  # the last prompt token plays `pending`: it is in the shallow caches, d_1 is drafted from it
            pending, position = None, state.next_position - 1
            first_logits = twig.head(twig.norm(state.twig_last)).float()  # [B, N]
        else:
            sync(device)
            t1 = time.perf_counter()
            pending = sampler.pick(base_logits(model, state.last_hidden))  # [B] the base's own first token
            out.emit(rows, pending[:, None], torch.ones_like(rows))
            finished = int(out.done.sum())
            position, first_logits = state.next_position.clone(), None  # [B] position of `pending`
            features = state.last_hidden if twig.base_features else None
        groups: list[CacheGroup] = [*state.base.groups, *state.twig.groups]

        while finished < len(rows):
            active = ~out.done[rows]
            draft = self._draft(
                lm,
                twig,
                state,
                pending,
                position,
                active,
                finished == 0,
                out.lengths[rows],
                sampler,
                first_logits,
                features,
            )
            slots = draft.depth.shape[0]  # C draft slots (chain drafts and their alternatives)
            depth = torch.cat([draft.depth.new_zeros(1), draft.depth])  # [1 + C]: pending (or the prompt), slots
            block_pos = position[:, None] + depth[None]  # [B, 1 + C]
            if state.deferred is not None:  # the prompt's deep layers and the first verification, one pass
                verify, final = finish_prefill(
                    model, lm, state, plan, capacity, draft.hidden, block_pos[:, 1:], draft.valid
                )
                groups = [*state.base.groups, *state.twig.groups]
                sync(device)
                t1 = time.perf_counter()  # prefill_s: up to the first tokens (time to first token)
            else:
                verify, final = self._verify(model, lm, state, draft.hidden, block_pos, draft.valid, draft.dense)
            # Rows not generating drafted nothing: they accept and keep nothing (last = 0).
            accepted, bonus, last, keep, path = self._accept(draft, verify, sampler)
            accepted = torch.where(active, accepted, 0)
            out.emit(rows, path, torch.where(active, accepted + 1, 0))
            stats.drafted[rows] += torch.where(active, draft.n, 0)
            stats.accepted[rows] += accepted
            stats.rounds[rows] += active.long()
            # The round's one host sync: rows finished, the most slots any row holds, the fewest.
            finished, held, fewest = torch.stack(
                [out.done[rows].sum(), last.max(), torch.where(active, last, -1).min()]
            ).tolist()
            # Every group's last C slots are this round's; each row keeps its accepted path and the
            # trailing slots no row holds are returned (``held`` says where, without a device read).
            # No hole is left when every row ran and kept as many leading drafts as the others.
            holes = fewest < held or not all(draft.chain_list[:held])
            for group in groups:
                start = group.length - slots
                group.keep(keep, start, end=start + held, holes=holes)
            pending, first_logits = bonus, None
            position = position + accepted + 1
            if twig.base_features:  # the base's state where it chose `bonus`: after the accepted path
                features = final[torch.arange(len(rows), device=device), last]  # [B, D]
            if self.drop_finished and should_compact(finished, len(rows)):
                keep = (~out.done[rows]).nonzero().flatten()
                for group in groups:
                    group.select_rows(keep)
                rows, pending, position = rows[keep], pending[keep], position[keep]
                features = None if features is None else features[keep]
                sampler = sampler.select_rows(keep)
                finished = 0
        sync(device)
        width = int(out.lengths.max()) if size else 0
        return Generation(out.tokens[:, :width], out.lengths, state, t1 - t0, time.perf_counter() - t1, stats)

    def _draft(
        self,
        lm,
        twig,
        state: PrefillState,
        pending,
        position,
        active,
        all_active,
        lengths,
        sampler,
        first_logits=None,
        features=None,
    ) -> _Draft:
        """Inputs pending, d_1, ..., d_n through the shallow layers and the twig; the last input runs
        only so the base can verify d_n and the twig's cache holds every accepted token. With
        ``first_logits`` [B, N] (the twig's at the last prompt token, which is already cached) there
        is no pending input: d_1 is drawn from them and the inputs are d_1, ..., d_n.

        Alternatives (greedy; ``config.draft_alternatives[j - 1]`` of them at depth j): the twig's next
        most likely tokens after d_j, fed in one block just before d_j, at its position. They are leaves
        of a draft tree: written as invalid slots, they see what d_j sees and themselves (a query always
        sees itself), and nothing sees them. The verification scores them with the rest, and where the
        base rejects d_j it may accept one of them instead. A block of a few tokens costs about one on a
        CPU with packed linears (``jobs/bench_cpu_linear.py``), so they add little to a round.

        ``active`` [B] the rows still generating (``all_active``: every row, known on the host),
        ``lengths`` [B] their tokens so far; ``features`` [B, D] the base's final state before
        ``pending``, for a twig that reads it (its first input only). One host sync per draft step:
        how many rows feed it (whether to stop, and whether the step's block has holes)."""
        max_draft, size, device = self.config.max_draft, position.shape[0], position.device
        alternatives = self.config.draft_alternatives if sampler.greedy else ()
        eos = torch.tensor(self.eos_token_ids, device=device)
        cap = (self.max_new_tokens - lengths - 1).clamp(min=0, max=max_draft)  # drafts that can still be emitted
        tokens = torch.full((size, max_draft), self.pad_token_id, dtype=torch.long, device=device)
        n = torch.zeros(size, dtype=torch.long, device=device)
        drafting = active & (cap > 0)
        token = pending if pending is not None else torch.full_like(n, self.pad_token_id)
        others = token.new_zeros(size, 0)  # [B, S] alternatives to the next input `token`
        hidden_steps, valid_steps, draft_probs, dense = [], [], [], True
        depths, chain, slot_tokens, candidates = [], [], [], []
        for j in range(max_draft + 1):
            running = active & (n >= j)  # row b feeds input j while j <= n_b
            feeding = size if j == 0 and all_active else int(running.sum())
            if feeding == 0:
                break
            if j == 0 and first_logits is not None:
                logits = first_logits
            else:
                width = others.shape[1]
                block = torch.cat([others, token[:, None]], dim=1)  # [B, S + 1]: alternatives, then the input
                step_valid = torch.cat([torch.zeros_like(others, dtype=torch.bool), running[:, None]], dim=1)
                step_dense = feeding == size and width == 0
                dense &= step_dense
                step_pos = (position + j)[:, None].expand(-1, width + 1)
                embeds = lm.embed_tokens(block)  # [B, S + 1, D]
                hidden_k = _run_groups(lm, embeds, step_pos, step_valid, state.base, state.shallow, step_dense)
                twig_group = state.twig.groups[0]
                # The base verifies hidden_k itself; only the twig's input gets the base features.
                twig_in = hidden_k if j > 0 or features is None else twig.add_features(hidden_k, features[:, None])
                hidden = run_layers(
                    lm,
                    twig_in,
                    step_pos,
                    step_valid,
                    state.twig,
                    twig_group,
                    None,
                    twig.modules_by_id,
                    block_dense=step_dense,
                )
                hidden_steps.append(hidden_k)
                valid_steps.append(step_valid)
                if j > 0:  # draft slots: d_j and its alternatives, candidates where the row drafted d_j
                    depths += [j] * (width + 1)
                    chain += [False] * width + [True]
                    slot_tokens.append(block)
                    candidates.append((n >= j)[:, None].expand(-1, width + 1))
                if j == max_draft:
                    break  # this input only feeds the caches and the verification: no head
                # The head scores the twig's draft vocabulary (N <= V ids): index [B] -> base id via full_ids.
                logits = twig.head(twig.norm(hidden[:, -1])).float()  # [B, N]
            make = drafting & running & (n < cap)
            extra = alternatives[j] if j < len(alternatives) else 0  # alternatives to d_{j+1}
            if sampler.greedy:
                probs = logits.softmax(dim=-1)
                top = probs.topk(min(extra + 1, probs.shape[-1]), dim=-1).indices  # [B, 1 + S]
                index, others = top[:, 0], twig.full_ids(top[:, 1:])
            else:
                probs = sampler.probs(logits)
                index = sampler.categorical(probs, rows=make)
                draft_probs.append(twig.full_probs(probs))  # q over the base vocabulary: zero outside N
            candidate = twig.full_ids(index)
            tokens[:, j] = torch.where(make, candidate, tokens[:, j])
            n += make.long()
            low = probs.gather(1, index[:, None])[:, 0] < self.config.draft_threshold
            drafting &= make & ~low & ~torch.isin(candidate, eos)
            token = torch.where(make, candidate, token)
        layout = _layout(depths, chain, device)
        if not hidden_steps:  # folded round without a draft: the verification is the prompt's alone
            empty = state.twig_last.new_zeros(size, 0, state.twig_last.shape[-1])
            no_slots = n.new_zeros(size, 0)
            none_fed = active[:, None][:, :0]
            return _Draft(tokens, n, empty, none_fed, True, draft_probs, *layout, no_slots, no_slots > 0, chain)
        slots = torch.cat(slot_tokens, dim=1) if slot_tokens else n.new_zeros(size, 0)
        drafted = torch.cat(candidates, dim=1) if candidates else slots > 0
        hidden, valid = torch.cat(hidden_steps, dim=1), torch.cat(valid_steps, dim=1)
        return _Draft(tokens, n, hidden, valid, dense, draft_probs, *layout, slots, drafted, chain)

    @staticmethod
    def _verify(
        model, lm, state: PrefillState, hidden_k, positions, block_valid, dense=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The base's logits [B, W, V] (float32) from layer-K hidden states, through the deep groups,
        and its final-norm states [B, W, D] they come from."""
        hidden = _run_groups(lm, hidden_k, positions, block_valid, state.base, state.deep, dense)
        final = lm.norm(hidden)
        return base_logits(model, final), final

    @staticmethod
    def _accept(draft: _Draft, verify: torch.Tensor, sampler: Sampler):
        """The round's outcome per row: (accepted drafts [B], the base's next token [B], the verify index
        of the last kept input [B] (0: pending, or the prompt's last token), the draft slots kept [B, C],
        the tokens to emit [B, max_draft + 1]: the accepted path, then the base's next token).

        ``verify`` [B, 1 + C, V]: the base's logits after pending (or the prompt) and after each slot."""
        # Slot of d_j, j = 1..n_max, from the host-side layout: no device read.
        chain_cols = torch.tensor(
            [i for i, is_chain in enumerate(draft.chain_list) if is_chain], dtype=torch.long, device=verify.device
        )
        n_max = chain_cols.numel()
        if not sampler.greedy:  # a chain (no alternatives): slot j - 1 holds d_j
            q = torch.stack(draft.probs[:n_max], dim=1) if n_max else verify[:, :0]
            accepted, bonus = rejection_sample(draft.tokens[:, :n_max], draft.n, q, sampler.probs(verify), sampler)
            keep = draft.candidate & (draft.depth[None] <= accepted[:, None])
            return accepted, bonus, accepted, keep, _path(draft.tokens, accepted, bonus)
        target = verify.argmax(dim=-1)  # [B, 1 + C]
        if not n_max:  # nothing drafted: the base's next token after pending
            none = draft.n.new_zeros(draft.n.shape)
            return none, target[:, 0], none, draft.candidate, _path(draft.tokens, none, target[:, 0])
        # The base's choice after a slot's parent (pending for depth 1, else d_{j-1}) against its token.
        parent = torch.cat([chain_cols.new_zeros(1), chain_cols + 1])[draft.depth - 1]  # [C] verify index
        match = (draft.slot_tokens == target[:, parent]) & draft.candidate  # [B, C]
        # Each row's longest prefix of drafts the base agrees with, then perhaps one alternative to the first
        # rejected draft (distinct tokens: at most one matches), then the base's own next token.
        chained = match[:, chain_cols].long().cumprod(dim=1).sum(dim=1)  # [B]
        alternative = match & ~draft.chain[None] & (draft.depth[None] == chained[:, None] + 1)  # [B, C]
        hit = alternative.any(dim=1)
        column = alternative.long().argmax(dim=1)  # [B] the kept alternative's slot, where ``hit``
        after_chain = torch.where(chained > 0, chain_cols[(chained - 1).clamp(min=0)] + 1, 0)
        last = torch.where(hit, column + 1, after_chain)  # [B] verify index
        keep = (draft.chain[None] & (draft.depth[None] <= chained[:, None]) & draft.candidate) | alternative
        accepted, bonus = chained + hit.long(), target.gather(1, last[:, None])[:, 0]
        path = _path(draft.tokens, accepted, bonus)
        # The alternative goes after the accepted drafts; without one the bonus is already there.
        path.scatter_(
            1, chained[:, None], torch.where(hit, draft.slot_tokens.gather(1, column[:, None])[:, 0], bonus)[:, None]
        )
        return accepted, bonus, last, keep, path


def _path(tokens: torch.Tensor, accepted: torch.Tensor, bonus: torch.Tensor) -> torch.Tensor:
    """[B, max_draft + 1]: each row's drafts with the base's next token written after its accepted ones."""
    path = torch.cat([tokens, bonus[:, None]], dim=1)
    return path.scatter_(1, accepted[:, None], bonus[:, None])


def _layout(depths: list[int], chain: list[bool], device) -> tuple[torch.Tensor, torch.Tensor]:
    """A round's draft-slot layout as tensors: depth [C] and chain [C] (``_Draft``)."""
    return (
        torch.tensor(depths, dtype=torch.long, device=device),
        torch.tensor(chain, dtype=torch.bool, device=device),
    )


def can_fold(plan: LayerPlan, pruning: InLLMPruning | None) -> bool:
    """Whether the deep layers can wait for the first drafts: not when pruning happens after the
    twig's layer (FastV at a deeper K scores there with the prefill's own bookkeeping)."""
    return pruning is None or plan.prune_layer is None or plan.prune_layer <= plan.twig_layer


def finish_prefill(
    model, lm, state: PrefillState, plan: LayerPlan, capacity: int, draft_hidden, draft_pos, draft_valid
) -> tuple[torch.Tensor, torch.Tensor]:
    """The deferred prefill's layers [K, L) over [prompt, d_1..d_n]: one pass finishes the prompt and
    verifies the drafts. draft_hidden [B, n, D] layer-K states, draft_pos / draft_valid [B, n] (the prompt's
    positions may be [B, S, 3], multimodal RoPE).

    Returns the base's logits [B, n + 1, V] after the last prompt token and after each draft, and
    the final-norm states [B, n + 1, D] they come from, as ``_verify``. Builds the deep cache groups
    (appended to ``state.base``) and counts the prompt's tokens per deep layer. Drafts are text:
    FinalWipe keeps them, so they stay every row's last n slots.
    """
    deep, n_layers, n = state.deferred, len(lm.layers), draft_hidden.shape[1]
    hidden = torch.cat([deep.hidden, draft_hidden.to(deep.hidden.dtype)], dim=1)  # [B, S + n, D]
    if deep.positions.dim() == 3:  # M-RoPE prompt [B, S, 3]: drafts are text, the same on every axis
        draft_pos = draft_pos[..., None].expand(-1, -1, deep.positions.shape[-1])
    positions = torch.cat([deep.positions, draft_pos], dim=1)
    deepstack = deep.deepstack  # Qwen3-VL levels after layer K: added to the prompt's visual tokens only
    if deepstack is not None:
        deepstack = torch.cat([deepstack, deepstack.new_zeros(deepstack.shape[0], n, *deepstack.shape[2:])], dim=1)
    valid = torch.cat([deep.valid, draft_valid], dim=1)
    is_draft = torch.cat([torch.zeros_like(deep.valid), torch.ones_like(draft_valid)], dim=1)
    visual = torch.cat([deep.visual, torch.zeros_like(draft_valid)], dim=1)
    groups, start = list(state.base.groups), deep.start
    for end in [*(b for b in plan.breakpoints() if b > start), n_layers]:
        group = new_group(lm, range(start, end), valid.shape[0], valid.shape[1] + capacity, hidden)
        groups.append(group)
        additions = deepstack_additions(deepstack, group.layers)
        hidden = run_layers(lm, hidden, positions, valid, KVCache(groups), group, additions=additions)
        state.tokens_per_layer[:, start:end] = (valid & ~is_draft).sum(dim=1, keepdim=True)
        if end == plan.wipe_layer and end < n_layers:  # FinalWipe: text only (drafts kept, valid or not)
            keep = (valid & ~visual) | is_draft
            extra = () if deepstack is None else (deepstack,)
            kept, hidden, positions, valid, visual, is_draft, *rest = compact_rows(
                keep, hidden, positions, valid, visual, is_draft, *extra
            )
            deepstack = rest[0] if rest else None
            valid, visual, is_draft = valid & kept, visual & kept, is_draft & kept
        start = end
    state.base, state.deferred = KVCache(groups), None
    final = lm.norm(hidden[:, hidden.shape[1] - n - 1 :])
    return base_logits(model, final), final


def _run_groups(
    lm, hidden, positions, block_valid, cache: KVCache, groups: list[CacheGroup], block_dense: bool | None = None
) -> torch.Tensor:
    for group in groups:
        hidden = run_layers(lm, hidden, positions, block_valid, cache, group, block_dense=block_dense)
    return hidden
