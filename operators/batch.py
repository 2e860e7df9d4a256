"""The prompt batch: what the language model is given, after the vision stage and pre-LLM pruning."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from operators.families.base import RowInputs, Stream, placeholder_spans
from operators.language_model import left_padded_positions


@dataclass
class PromptBatch:
    """Left-padded prompts with their visual tokens spliced in. B rows, S positions."""

    embeds: torch.Tensor  # [B, S, D] input embeddings
    # [B, S] position ids: 0.. over each row's real tokens, 1 on padding; or [B, S, 3] (t, h, w)
    # multimodal-RoPE positions (Qwen-VL) where kept visual tokens keep their unpruned positions
    positions: torch.Tensor
    valid: torch.Tensor  # [B, S] bool: False on left padding
    visual: torch.Tensor  # [B, S] bool: visual tokens (FinalWipe drops all of them)
    prunable: torch.Tensor  # [B, S] bool: visual tokens an in-LLM method may drop (not newlines, not CLS)
    media_spans: list[list[tuple[int, int]]]  # per row: [start, end) of each media item's tokens in S
    segments: list[int]  # per row: budget units (images, crops, frames)
    visual_total: list[int]  # per row: visual tokens the unpruned model would see
    # [B, S, levels, D] DeepStack features (Qwen3-VL), zero on text and padding: level i is added
    # to the hidden states after LM layer i; None: the model has none
    deepstack: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.embeds.shape[0]

    @property
    def text_tokens(self) -> torch.Tensor:
        """[B] real tokens that are not visual."""
        return (self.valid & ~self.visual).sum(dim=1)


def assemble_batch(
    rows: list[RowInputs],
    streams: list[list[Stream]],
    embed: torch.nn.Module,
    placeholder_ids: set[int],
    unpruned: bool = False,
) -> PromptBatch:
    """Splice each row's visual streams into its text embeddings (``embed``: the LM's token
    embedding) in place of its placeholder runs, and left-pad the rows into one batch. ``unpruned``:
    every stream must fill its placeholder run exactly, as Hugging Face checks."""
    device = embed.weight.device
    sequences, flags, visual_flags, spans, totals, segment_counts = [], [], [], [], [], []
    row_positions = []  # per row [S_row, 3] when the family gives M-RoPE positions
    row_deepstack = []  # per row [(start in the row, [V, levels, D])] when streams carry DeepStack features
    if len({row.positions is None for row in rows}) > 1:
        raise ValueError("a batch mixes rows with and without multimodal-RoPE positions")
    for row, row_streams in zip(rows, streams, strict=True):
        ids = row.input_ids.to(device)
        runs = placeholder_spans(row.input_ids, placeholder_ids, row.media)
        text = embed(ids)
        parts, part_flags, part_visual, row_spans, cursor, total, length = [], [], [], [], 0, 0, 0
        part_positions, deep_parts = [], []
        for (start, end), stream in zip(runs, row_streams, strict=True):
            if unpruned and end - start != len(stream.prunable):
                raise ValueError(
                    f"{end - start} placeholder tokens but {len(stream.prunable)} visual features: "
                    "the processor and the model disagree"
                )
            parts += [text[cursor:start], stream.embeds.to(text.dtype)]
            part_flags += [torch.zeros(start - cursor, dtype=torch.bool), stream.prunable.cpu()]
            count = len(stream.prunable)
            part_visual += [torch.zeros(start - cursor, dtype=torch.bool), torch.ones(count, dtype=torch.bool)]
            if row.positions is not None:
                run = row.positions[start:end]  # [end - start, 3] the item's unpruned positions
                source = stream.source if stream.source is not None else torch.arange(count)
                part_positions += [row.positions[cursor:start], run[source.cpu()]]
            length += start - cursor
            if stream.deepstack is not None:
                deep_parts.append((length, stream.deepstack))
            row_spans.append((length, length + count))
            length += count
            total += end - start
            cursor = end
        parts.append(text[cursor:])
        part_flags.append(torch.zeros(len(ids) - cursor, dtype=torch.bool))
        part_visual.append(torch.zeros(len(ids) - cursor, dtype=torch.bool))
        row_deepstack.append(deep_parts)
        if row.positions is not None:
            row_positions.append(torch.cat([*part_positions, row.positions[cursor:]]))
        sequences.append(torch.cat(parts))
        flags.append(torch.cat(part_flags))
        visual_flags.append(torch.cat(part_visual))
        spans.append(row_spans)
        totals.append(total)
        segment_counts.append(sum(m.pixel_values.shape[0] for m in row.media))
    width = max(len(s) for s in sequences)
    batch, dim = len(sequences), sequences[0].shape[-1]
    embeds = sequences[0].new_zeros(batch, width, dim)
    valid = torch.zeros(batch, width, dtype=torch.bool, device=device)
    prunable = torch.zeros(batch, width, dtype=torch.bool, device=device)
    visual = torch.zeros(batch, width, dtype=torch.bool, device=device)
    for b, seq in enumerate(sequences):
        pad = width - len(seq)
        embeds[b, pad:] = seq
        valid[b, pad:] = True
        prunable[b, pad:] = flags[b].to(device)
        visual[b, pad:] = visual_flags[b].to(device)
        spans[b] = [(start + pad, end + pad) for start, end in spans[b]]
    positions = left_padded_positions(valid)
    if row_positions:
        positions = mrope_batch_positions(row_positions, width, device)
    deepstack = None
    if any(row_deepstack):
        deepstack = deepstack_batch(row_deepstack, [len(s) for s in sequences], width, embeds)
    return PromptBatch(embeds, positions, valid, visual, prunable, spans, segment_counts, totals, deepstack)


def deepstack_batch(rows: list[list[tuple[int, torch.Tensor]]], lengths: list[int], width: int, like) -> torch.Tensor:
    """Per row, (start, [V, levels, D]) DeepStack parts -> [B, width, levels, D], zero elsewhere,
    left-padded like the embeddings (row b starts at width - lengths[b])."""
    levels, dim = next(part.shape[1:] for row in rows for _, part in row)
    out = like.new_zeros(len(rows), width, levels, dim)
    for b, parts in enumerate(rows):
        pad = width - lengths[b]
        for start, part in parts:
            out[b, pad + start : pad + start + len(part)] = part.to(out.dtype)
    return out


def mrope_batch_positions(rows: list[torch.Tensor], width: int, device) -> torch.Tensor:
    """Rows' [S_row, 3] positions left-padded to [B, width, 3] (1 on padding, as for 1-D)."""
    out = torch.ones(len(rows), width, 3, dtype=torch.long, device=device)
    for b, row in enumerate(rows):
        out[b, width - len(row) :] = row.to(device)
    return out


def text_batch(embed: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> PromptBatch:
    """A prompt batch of left-padded text-only prompts (ids and mask [B, S], as a tokenizer pads them)."""
    valid = attention_mask.bool().to(embed.weight.device)
    none = torch.zeros_like(valid)
    rows = valid.shape[0]
    return PromptBatch(
        embed(input_ids.to(valid.device)),
        left_padded_positions(valid),
        valid,
        none,
        none,
        [[]] * rows,
        [0] * rows,
        [0] * rows,
    )
