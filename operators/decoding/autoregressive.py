"""One base step per token: greedy (token for token what ``model.generate(do_sample=False)`` gives)
at temperature 0, else sampling."""

from __future__ import annotations

import time

import torch
from torch import nn

from operators.batch import PromptBatch
from operators.decoding.base import Decoder, Generation, sync
from operators.decoding.sampling import Sampler
from operators.language_model import decode_step, text_model
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
        done = torch.zeros(size, dtype=torch.bool, device=device)
        hidden, position = state.last_hidden, state.next_position
        for step in range(max_new):
            logits = model.lm_head(hidden).float()  # [B, V]
            next_token = sampler.pick(logits, rows=~done).masked_fill(done, self.pad_token_id)
            tokens[:, step] = next_token
            lengths += (~done).long()
            done |= torch.isin(next_token, eos)
            if bool(done.all()) or step == max_new - 1:
                break
            embeds = lm.embed_tokens(next_token)[:, None]  # [B, 1, D]
            hidden = decode_step(lm, embeds, position[:, None], state.base)
            position = position + 1
        sync(device)
        t2 = time.perf_counter()
        width = int(lengths.max()) if size else 0
        return Generation(tokens[:, :width], lengths, state, t1 - t0, t2 - t1)
