"""One base step per token: greedy (token for token what ``model.generate(do_sample=False)`` gives)
at temperature 0, else sampling. Rows that finish leave the working batch (``should_compact``); the
state's caches then hold the rows still decoding when it stopped."""

from __future__ import annotations

import time

import torch
from torch import nn

from operators.batch import PromptBatch
from operators.decoding.base import Decoder, Generation, should_compact, sync
from operators.decoding.sampling import Sampler
from operators.language_model import base_logits, decode_step, text_model
from operators.prefill import InLLMPruning, LayerPlan, prefill


class Autoregressive(Decoder):
    name = "greedy"

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
        sampler = sampler or Sampler()
        lm = text_model(model)
        device = batch.embeds.device
        size, max_new = len(batch), self.max_new_tokens
        eos = torch.tensor(self.eos_token_ids, device=device)
        t0 = time.perf_counter()
        state = prefill(model, batch, plan, max_new, twig, pruning)
        sync(device)
        t1 = time.perf_counter()

        tokens = torch.full((size, max_new), self.pad_token_id, dtype=torch.long, device=device)
        lengths = torch.zeros(size, dtype=torch.long, device=device)
        # The working batch: rows[i] is the original row of working row i. Finished rows leave it
        # (``should_compact``); results are written to the original rows as they come.
        rows = torch.arange(size, device=device)
        done = torch.zeros(size, dtype=torch.bool, device=device)
        hidden, position, cache = state.last_hidden, state.next_position, state.base
        for step in range(max_new):
            logits = base_logits(model, hidden)  # [B', V]
            next_token = sampler.pick(logits, rows=~done).masked_fill(done, self.pad_token_id)
            tokens[rows, step] = next_token
            lengths[rows] += (~done).long()
            done |= torch.isin(next_token, eos)
            if step == max_new - 1:
                break
            finished = int(done.sum())  # the one host sync per step
            if finished == len(rows):
                break
            if self.drop_finished and should_compact(finished, len(rows)):
                keep = (~done).nonzero().flatten()
                cache.select_rows(keep)
                rows, done, next_token, position = rows[keep], done[keep], next_token[keep], position[keep]
                sampler = sampler.select_rows(keep)
            embeds = lm.embed_tokens(next_token)[:, None]  # [B', 1, D]
            hidden = decode_step(lm, embeds, position[:, None], cache)
            position = position + 1
        sync(device)
        t2 = time.perf_counter()
        width = int(lengths.max()) if size else 0
        return Generation(tokens[:, :width], lengths, state, t1 - t0, t2 - t1)
