"""A position-indexed KV cache whose layer groups may hold different token sets.

Layers that see the same tokens form a group (with FastV: layers before K see every token,
layers from K on see the pruned set). Each group preallocates [B, H_kv, capacity, D] buffers
per layer and keeps one write counter and one per-row validity mask ([B, capacity]: False for
left padding). Writing a block of q tokens happens at ``length`` in every layer of the group;
``advance(q)`` commits it, and rolling back (e.g. rejected drafts) is just lowering ``length``.
``dense`` is a host-side flag, "no slot before ``length`` is invalid", so the common case (no
padding, no holes, one query) needs neither a mask nor a device sync to find out it needs none.

It duck-types the one method Hugging Face attention modules call, ``update(k, v, layer_idx)``,
so HF decoder layers run unchanged on it.
"""

from __future__ import annotations

import torch


class CacheGroup:
    """KV buffers for a contiguous range of layers that share token positions and validity."""

    def __init__(
        self,
        layers: range | list[int],
        batch: int,
        kv_heads: int,
        head_dim: int,
        capacity: int,
        dtype: torch.dtype,
        device: torch.device,
    ):
        self.layers = layers
        self.capacity = capacity
        self.length = 0
        shape = (batch, kv_heads, capacity, head_dim)
        self.keys = {i: torch.zeros(shape, dtype=dtype, device=device) for i in layers}
        self.values = {i: torch.zeros(shape, dtype=dtype, device=device) for i in layers}
        self.valid = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
        # True only while every slot in [0, length) is valid for every row (kept on the host: reading
        # ``valid`` to find out would be a device sync per group per step). False may be stale-safe:
        # it only costs a mask SDPA would not have needed.
        self.dense = True

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store a block [B, H_kv, q, D] at ``length``; return keys/values [B, H_kv, length+q, D]."""
        end = self.length + k.shape[2]
        if end > self.capacity:
            raise RuntimeError(f"KV cache overflow: {end} tokens > capacity {self.capacity}")
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def attention_mask(
        self, block_valid: torch.Tensor, implicit_causal: bool = True, block_dense: bool | None = None
    ) -> torch.Tensor | None:
        """Bool mask [B, 1, q, length+q] for a block of q queries appended at ``length``.

        Queries see every valid cached token and, causally, the block itself. Returns None when
        nothing needs masking: no padding and a single query, or, with ``implicit_causal`` (SDPA,
        which is causal when given no mask), a fresh prefill; SDPA then takes its causal fast path
        exactly as Hugging Face's own forward does. ``block_dense`` says whether ``block_valid`` is
        all True when the caller knows (None: looked at, one sync, only while the group is dense).

        A block of q > 1 queries after a cached prefix (SSD's verification) always gets a mask: SDPA's
        implicit causal mask is aligned top-left, not to the end of the keys. Without holes it is the
        causal band alone ([1, 1, q, length+q], broadcast over rows), built without reading ``valid``.
        """
        q = block_valid.shape[1]
        start = self.length
        if block_dense is None:
            block_dense = self.dense and bool(block_valid.all())
        no_holes = self.dense and block_dense
        if no_holes and (q == 1 or (implicit_causal and start == 0)):
            return None
        col = torch.arange(start + q, device=block_valid.device)
        row = torch.arange(q, device=block_valid.device) + start
        causal = col[None, :] <= row[:, None]  # [q, start+q]
        if no_holes:
            return causal[None, None]
        keys_valid = torch.cat([self.valid[:, :start], block_valid], dim=1)  # [B, start+q]
        mask = keys_valid[:, None, :] & causal[None]  # [B, q, start+q]
        # A padding query would see nothing and make SDPA return NaN; let it see itself.
        mask[:, torch.arange(q), row] = True
        return mask[:, None]

    def advance(self, block_valid: torch.Tensor, block_dense: bool | None = None) -> None:
        q = block_valid.shape[1]
        if self.dense:
            self.dense = bool(block_valid.all()) if block_dense is None else block_dense
        self.valid[:, self.length : self.length + q] = block_valid
        self.length += q

    def keep(self, slots: torch.Tensor, start: int, end: int | None = None, holes: bool = True) -> None:
        """Set the validity of a block's slots written at ``start`` to ``slots`` [B, q] (True = kept).

        After SSD's verification the block's slots a row keeps are its accepted path: its accepted drafts,
        or an alternative written as a leaf (invalid) that the base agreed with. The rest become holes
        every later query masks out. ``end`` (the last slot any row still holds, + 1, which the caller
        knows without a device read) returns the trailing slots no row holds, so a round where every row
        rejects costs no capacity. ``holes=False``: the caller knows no hole is left before ``end``
        (every row kept the same leading slots).
        """
        self.valid[:, start : start + slots.shape[1]] = slots
        self.dense = self.dense and not holes
        if end is not None:
            self.length = end

    def select_rows(self, index: torch.Tensor) -> None:
        """Keep only rows ``index`` [B'] (in that order): every layer's keys and values and ``valid``
        are gathered into new buffers of the same capacity. Rows that finished decoding leave the batch."""
        for layer in self.layers:
            self.keys[layer] = self.keys[layer].index_select(0, index)
            self.values[layer] = self.values[layer].index_select(0, index)
        self.valid = self.valid.index_select(0, index)
        self.dense = bool(self.valid[:, : self.length].all())  # the finished rows may have held the holes

    def nbytes_per_row(self) -> int:
        """KV bytes one row occupies for the tokens written so far (valid or not)."""
        sample = next(iter(self.keys.values()))
        per_token = 2 * sample.shape[1] * sample.shape[3] * sample.element_size()
        return per_token * self.length * len(self.layers)


class KVCache:
    """Layer groups plus the ``update`` hook HF attention calls."""

    def __init__(self, groups: list[CacheGroup]):
        self.groups = groups
        self.group_of = {layer: g for g in groups for layer in g.layers}

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        return self.group_of[layer_idx].write(layer_idx, key_states, value_states)

    def select_rows(self, index: torch.Tensor) -> None:
        for group in self.groups:
            group.select_rows(index)

    def valid_tokens_per_row(self) -> torch.Tensor:
        """Valid cached tokens per row summed over layers [B] (for KV-size accounting)."""
        return sum(g.valid[:, : g.length].sum(dim=1) * len(g.layers) for g in self.groups)
