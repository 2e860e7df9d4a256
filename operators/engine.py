"""The engine: requests in, pruned batched greedy generation out, with per-sample accounting."""

from __future__ import annotations

import time
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import torch
from torch import nn

from operators import accounting
from operators.adapters import RowInputs, Segments, Stream, make_adapter, placeholder_spans
from operators.decoder import left_padded_positions, text_model
from operators.generate import greedy_generate
from operators.pruning import IN_LLM_METHODS, METHODS, PRE_LLM_METHODS, prune_none, prune_random, prune_vispruner
from operators.speculative import ssd_generate, ttp_generate


@dataclass
class EngineConfig:
    pruning_method: str = "none"  # one of pruning.METHODS
    budget: int | None = None  # visual tokens kept per segment (image, crop or frame); None keeps all
    important_ratio: float = 0.5  # VisPruner's share of the budget given to important tokens
    fastv_layer: int = 2  # FastV's K: layers 1..K see every token
    max_new_tokens: int = 64
    seed: int = 0  # for the random baseline
    pad_to_square: bool = False  # LLaVA-1.5: pad images to square like the original evaluation
    decode_strategy: str = "greedy"  # "greedy" or "ssd" (TwigVLM self-speculative; needs a twig)
    max_draft: int = 5  # SSD: draft tokens per round at most (TwigVLM's delta)
    draft_threshold: float = 0.6  # SSD: stop a row's draft at a token with probability below this (theta)
    finalwipe_layer: int | None = None  # TTP: first text-only base layer (0-indexed); None: 3/4 of the depth
    # Batch sizing: generate() sorts requests by prompt length and splits them into sub-batches of at
    # most this many tokens, rows x (longest pruned prompt + max_new_tokens); None runs one batch.
    batch_tokens: int | None = None

    def __post_init__(self):
        if self.pruning_method not in METHODS:
            raise ValueError(f"pruning.method: unknown {self.pruning_method!r}; allowed: {', '.join(METHODS)}")
        if self.budget is not None and self.budget < 1:
            raise ValueError(f"pruning.budget must be >= 1 or null, got {self.budget}")
        if self.pruning_method not in ("none",) and self.budget is None:
            raise ValueError(f"pruning.budget is required for pruning.method={self.pruning_method!r}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.decode_strategy not in ("greedy", "ssd"):
            raise ValueError(f"decode.strategy: unknown {self.decode_strategy!r}; allowed: greedy, ssd")
        if self.max_draft < 1 or not 0.0 <= self.draft_threshold <= 1.0:
            raise ValueError("max_draft must be >= 1 and draft_threshold in [0, 1]")
        if self.batch_tokens is not None and self.batch_tokens < 1:
            raise ValueError(f"batch_tokens must be >= 1 or null, got {self.batch_tokens}")


@dataclass
class Request:
    prompt: str  # full prompt text with the <image>/<video> tag(s) in place
    images: list = field(default_factory=list)  # PIL images
    video: object | None = None  # [T, H, W, 3] uint8 array or list of PIL frames
    # Requests with the same key carry the same media (several questions about one video): the
    # vision tower then encodes it once per batch. None: never shared.
    media_key: str | None = None


@dataclass
class Result:
    text: str
    token_ids: list[int]
    visual_tokens_total: int  # visual tokens the unpruned model would see
    visual_tokens_kept: int  # visual tokens in the language model after pruning (FastV/TTP: after layer K)
    visual_tokens_layer_mean: float  # visual tokens averaged over LLM layers (TwigVLM's R-bar)
    prefill_flops: float  # estimate: language model + vision tower + projector
    kv_cache_bytes: int  # prompt KV cache of this row, all layers
    stage_ms: dict[str, float]  # batch wall time per stage divided by the batch size
    drafted: int | None = None  # SSD: draft tokens proposed by the twig
    accepted: int | None = None  # SSD: draft tokens the base accepted
    rounds: int | None = None  # SSD: verification rounds


def media_generator(seed: int, media) -> torch.Generator:
    """A generator seeded by the config seed and the media's pixels, so the random baseline picks
    the same tokens for an item whatever batch it lands in."""
    digest = zlib.crc32(media.pixel_values.detach().cpu().float().numpy().tobytes())
    return torch.Generator().manual_seed(seed * 1_000_003 + digest)


class Engine:
    """Holds a loaded LLaVA-family model and runs batches of requests."""

    def __init__(self, model: nn.Module, processor, config: EngineConfig | None = None, twig: nn.Module | None = None):
        self.model = model.eval()
        self.processor = processor
        self.config = config or EngineConfig()
        self.twig = twig.eval() if twig is not None else None
        needs_twig = self.config.pruning_method == "ttp" or self.config.decode_strategy == "ssd"
        if needs_twig and twig is None:
            raise ValueError("pruning.method=ttp and decode.strategy=ssd need a trained twig (decode.twig)")
        self.adapter = make_adapter(model, processor, self.config.pad_to_square)
        self.lm = text_model(model)
        self.tokenizer = getattr(processor, "tokenizer", processor)
        generation = model.generation_config
        eos = generation.eos_token_id if generation.eos_token_id is not None else self.tokenizer.eos_token_id
        self.eos_token_ids = [eos] if isinstance(eos, int) else list(eos)
        pad = generation.pad_token_id if generation.pad_token_id is not None else self.tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else self.eos_token_ids[0]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def generate(self, requests: list[Request]) -> list[Result]:
        """Results in request order. Requests run in sub-batches of similar prompt length (see
        ``EngineConfig.batch_tokens``), so a short image prompt never pads to a long video's."""
        t = time.perf_counter()
        rows = [self.adapter.preprocess(r.prompt, r.images, r.video) for r in requests]
        preprocess_s = time.perf_counter() - t
        lengths = [self.pruned_prompt_length(row) for row in rows]
        results: list[Result | None] = [None] * len(rows)
        for indices in length_batches(lengths, self.config.max_new_tokens, self.config.batch_tokens):
            share = preprocess_s * len(indices) / len(rows)
            keys = [requests[i].media_key for i in indices]
            for i, result in zip(indices, self._generate_rows([rows[i] for i in indices], keys, share), strict=True):
                results[i] = result
        return results

    def pruned_prompt_length(self, row: RowInputs) -> int:
        """Prompt tokens entering the language model after pre-LLM pruning (for batch sizing)."""
        cfg = self.config
        spans = placeholder_spans(row.input_ids, self.adapter.placeholder_ids, row.media)
        placeholders = sum(end - start for start, end in spans)
        visual = placeholders
        if cfg.budget is not None and cfg.pruning_method in PRE_LLM_METHODS and cfg.pruning_method != "none":
            segments = sum(m.pixel_values.shape[0] for m in row.media)
            visual = min(visual, segments * cfg.budget)
        return len(row.input_ids) - placeholders + visual

    def _generate_rows(self, rows: list[RowInputs], keys: list[str | None], preprocess_s: float) -> list[Result]:
        cfg = self.config
        times: dict[str, float] = defaultdict(float)
        times["preprocess"] = preprocess_s
        t = time.perf_counter()
        segments = self._encode(rows, keys)
        times["vision"] += time.perf_counter() - t

        t = time.perf_counter()
        streams, flops_extra = self._prune_and_assemble(rows, segments)
        times["prune"] += time.perf_counter() - t

        embeds, positions, valid, visual, prunable, totals, segment_counts = self._build_batch(rows, streams)
        in_llm_keep = None
        if cfg.pruning_method in IN_LLM_METHODS:  # EngineConfig requires a budget for these
            in_llm_keep = torch.tensor([cfg.budget * n for n in segment_counts], device=self.device)
        stats = None
        if self.twig is not None and (cfg.decode_strategy == "ssd" or cfg.pruning_method == "ttp"):
            ttp = cfg.pruning_method == "ttp"
            args = (
                self.model,
                self.twig,
                embeds,
                positions,
                valid,
                prunable,
                in_llm_keep if ttp else None,
                self.finalwipe_layer() if ttp else None,
                cfg.max_new_tokens,
                self.eos_token_ids,
                self.pad_token_id,
            )
            if cfg.decode_strategy == "ssd":
                out, stats = ssd_generate(*args, max_draft=cfg.max_draft, threshold=cfg.draft_threshold, visual=visual)
            else:
                out = ttp_generate(*args, visual=visual)
        else:
            fastv = cfg.pruning_method == "fastv"
            out = greedy_generate(
                self.model,
                embeds,
                positions,
                valid,
                cfg.max_new_tokens,
                self.eos_token_ids,
                self.pad_token_id,
                prunable=prunable,
                fastv_layer=cfg.fastv_layer if fastv else None,
                fastv_keep=in_llm_keep if fastv else None,
            )
        times["prefill"] += out.prefill_s
        times["decode"] += out.decode_s

        batch = len(rows)
        stage_ms = {k: 1000.0 * v / batch for k, v in times.items()}
        results = []
        text_count = (valid & ~visual).sum(dim=1)
        for row in range(batch):
            n_tokens = int(out.lengths[row])
            ids = out.tokens[row, :n_tokens].tolist()
            tokens_per_layer = out.prefill_state.tokens_per_layer[row].tolist()
            # Visual tokens per layer; "kept" is the smallest non-zero count: what survives FastV's or
            # TTP's layer K (TTP's FinalWipe layers hold none), and everything for pre-LLM methods.
            per_layer = [int(n - text_count[row]) for n in tokens_per_layer]
            visual_in_llm = min([v for v in per_layer if v > 0], default=0)
            results.append(
                Result(
                    text=self.tokenizer.decode(ids, skip_special_tokens=True).strip(),
                    token_ids=ids,
                    visual_tokens_total=totals[row],
                    visual_tokens_kept=visual_in_llm,
                    visual_tokens_layer_mean=sum(per_layer) / len(per_layer),
                    prefill_flops=accounting.language_model_flops(self.lm.config, tokens_per_layer) + flops_extra[row],
                    kv_cache_bytes=accounting.kv_cache_bytes(self.lm.config, tokens_per_layer, embeds.element_size()),
                    stage_ms=dict(stage_ms),
                    drafted=None if stats is None else int(stats.drafted[row]),
                    accepted=None if stats is None else int(stats.accepted[row]),
                    rounds=None if stats is None else int(stats.rounds[row]),
                )
            )
        return results

    def finalwipe_layer(self) -> int:
        """TTP's K_f: the configured layer, else 3/4 of the depth (TwigVLM's 24 of 32), after the twig's K."""
        n_layers = len(self.lm.layers)
        if self.config.finalwipe_layer is not None:
            return self.config.finalwipe_layer
        return max(self.twig.K + 1, min(n_layers, round(0.75 * n_layers)))

    # --- stages -------------------------------------------------------------------------------

    def _encode(self, rows: list[RowInputs], keys: list[str | None] | None = None) -> list[list[Segments]]:
        """Run each tower once over every distinct media item of its kind in the batch (rows with the
        same key share media; no keys: nothing shared)."""
        keys = keys if keys is not None else [None] * len(rows)
        encoded: list[list[Segments | None]] = [[None] * len(row.media) for row in rows]
        for kind in ("image", "video"):
            items, shared = [], {}  # shared: (row, media) -> the (row, media) whose encoding it reuses
            first: dict[tuple[str, int], tuple[int, int]] = {}  # (key, media index) -> its first (row, media)
            for r, row in enumerate(rows):
                for m, media in enumerate(row.media):
                    if media.kind != kind:
                        continue
                    key = None if keys[r] is None else (keys[r], m)
                    if key in first:
                        shared[r, m] = first[key]
                        continue
                    if key is not None:
                        first[key] = (r, m)
                    items.append((r, m))
            if not items:
                continue
            pixels = torch.cat([rows[r].media[m].pixel_values for r, m in items]).to(self.device)
            segs = self.adapter.encode(kind, pixels)
            offset = 0
            for r, m in items:
                count = rows[r].media[m].pixel_values.shape[0]
                encoded[r][m] = Segments(
                    patches=segs.patches[offset : offset + count],
                    cls_attention=segs.cls_attention[offset : offset + count],
                    cls=None if segs.cls is None else segs.cls[offset : offset + count],
                    grid=segs.grid,
                )
                offset += count
            for (r, m), (r0, m0) in shared.items():
                encoded[r][m] = encoded[r0][m0]
        return encoded

    def _prune_and_assemble(self, rows, segments) -> tuple[list[list[Stream]], list[float]]:
        cfg = self.config
        method = cfg.pruning_method
        batched = self._vispruner_batched(segments) if method == "vispruner" else {}
        # Rows that share media share its Segments object, and so its one tower pass (see _encode).
        sharing = Counter(id(seg) for row_segments in segments for seg in row_segments)
        streams, extra_flops = [], []
        for row, row_segments in zip(rows, segments, strict=True):
            row_streams, flops = [], 0.0
            for media, seg in zip(row.media, row_segments, strict=True):
                budget = cfg.budget if cfg.budget is not None else seg.patches.shape[1]
                if method == "vispruner":
                    indices, tokens = batched[id(seg)]
                elif method in ("none", "pool"):
                    indices, tokens = PRE_LLM_METHODS[method](seg.patches, seg.cls_attention, budget, grid=seg.grid)
                elif method == "random":
                    generator = media_generator(cfg.seed, media)
                    indices, tokens = prune_random(seg.patches, seg.cls_attention, budget, generator=generator)
                else:  # in-LLM methods see every token here
                    indices, tokens = prune_none(seg.patches, seg.cls_attention, budget)
                projected = self.adapter.project(tokens)
                row_streams.append(self.adapter.assemble(media, seg, indices, projected))
                flops += accounting.vision_flops(self.adapter, media, seg, tokens.shape[1], sharing[id(seg)])
            streams.append(row_streams)
            extra_flops.append(flops)
        return streams, extra_flops

    def _vispruner_batched(self, segments: list[list[Segments]]) -> dict[int, tuple]:
        """VisPruner over every distinct media item of the batch in one call per segment shape (it works
        row by row, so this equals a call per item, minus the per-call overhead); media shared between
        rows (see ``_encode``) is ranked once. id(Segments) -> (indices, tokens)."""
        cfg = self.config
        groups: dict[tuple, dict[int, Segments]] = defaultdict(dict)
        for seg in (seg for row_segments in segments for seg in row_segments):
            groups[tuple(seg.patches.shape[1:])][id(seg)] = seg
        out = {}
        for shape, by_id in groups.items():
            patches = torch.cat([seg.patches for seg in by_id.values()])  # [sum of segments, N, C]
            attention = torch.cat([seg.cls_attention for seg in by_id.values()])
            budget = cfg.budget if cfg.budget is not None else shape[0]
            indices, tokens = prune_vispruner(patches, attention, budget, important_ratio=cfg.important_ratio)
            offset = 0
            for key, seg in by_id.items():
                count = seg.patches.shape[0]
                out[key] = (indices[offset : offset + count], tokens[offset : offset + count])
                offset += count
        return out

    def _build_batch(self, rows: list[RowInputs], streams: list[list[Stream]]):
        """Splice each row's streams into its text embeddings and left-pad the batch."""
        embed = self.lm.embed_tokens
        sequences, flags, visual_flags, totals, segment_counts = [], [], [], [], []
        placeholder_ids = self.adapter.placeholder_ids
        for row, row_streams in zip(rows, streams, strict=True):
            ids = row.input_ids.to(self.device)
            runs = placeholder_spans(row.input_ids, placeholder_ids, row.media)
            text = embed(ids)
            parts, part_flags, part_visual, cursor, total = [], [], [], 0, 0
            for (start, end), stream in zip(runs, row_streams, strict=True):
                parts += [text[cursor:start], stream.embeds.to(text.dtype)]
                part_flags += [torch.zeros(start - cursor, dtype=torch.bool), stream.prunable.cpu()]
                part_visual += [
                    torch.zeros(start - cursor, dtype=torch.bool),
                    torch.ones(len(stream.prunable), dtype=torch.bool),
                ]
                total += end - start
                cursor = end
            parts.append(text[cursor:])
            part_flags.append(torch.zeros(len(ids) - cursor, dtype=torch.bool))
            part_visual.append(torch.zeros(len(ids) - cursor, dtype=torch.bool))
            sequences.append(torch.cat(parts))
            flags.append(torch.cat(part_flags))
            visual_flags.append(torch.cat(part_visual))
            totals.append(total)
            segment_counts.append(sum(m.pixel_values.shape[0] for m in row.media))
            self._check_unpruned_count(row, row_streams, runs)
        width = max(len(s) for s in sequences)
        batch, dim = len(sequences), sequences[0].shape[-1]
        embeds = sequences[0].new_zeros(batch, width, dim)
        valid = torch.zeros(batch, width, dtype=torch.bool, device=self.device)
        prunable = torch.zeros(batch, width, dtype=torch.bool, device=self.device)
        visual = torch.zeros(batch, width, dtype=torch.bool, device=self.device)
        for b, seq in enumerate(sequences):
            embeds[b, width - len(seq) :] = seq
            valid[b, width - len(seq) :] = True
            prunable[b, width - len(seq) :] = flags[b].to(self.device)
            visual[b, width - len(seq) :] = visual_flags[b].to(self.device)
        return embeds, left_padded_positions(valid), valid, visual, prunable, totals, segment_counts

    def _check_unpruned_count(self, row: RowInputs, row_streams: list[Stream], runs) -> None:
        """Unpruned, each stream must fill its placeholder run exactly (as HF checks)."""
        if self.config.pruning_method in ("none", *IN_LLM_METHODS):
            for (start, end), stream in zip(runs, row_streams, strict=True):
                if end - start != stream.embeds.shape[0]:
                    raise ValueError(
                        f"{end - start} placeholder tokens but {stream.embeds.shape[0]} visual features: "
                        "the processor and the model disagree"
                    )


def length_batches(lengths: list[int], max_new_tokens: int, batch_tokens: int | None) -> list[list[int]]:
    """Indices of each sub-batch: longest prompts first, each sub-batch holding at most
    ``batch_tokens`` = rows x (its longest prompt + max_new_tokens), the KV cache it will need.
    A prompt over the budget on its own still runs, alone. ``None``: one batch, in order."""
    if batch_tokens is None or not lengths:
        return [list(range(len(lengths)))] if lengths else []
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        current = batches[-1] if batches else None
        # sorted longest first, so the batch's first row sets its padded width
        if current and (len(current) + 1) * (lengths[current[0]] + max_new_tokens) <= batch_tokens:
            current.append(i)
        else:
            batches.append([i])
    return batches


def format_prompt(processor, question: str, kind: str = "image") -> str:
    """A single-turn prompt with one media tag: the checkpoint's chat template when it has one,
    else LLaVA-1.5's format (:func:`format_prompt_text`)."""
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": kind}, {"type": "text", "text": question}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return format_prompt_text(question, kind)


def format_prompt_text(question: str, kind: str = "image") -> str:
    """LLaVA-1.5's ``USER: <image>\n{question} ASSISTANT:`` (``<video>`` for a video)."""
    tag = "<video>" if kind == "video" else "<image>"
    return f"USER: {tag}\n{question} ASSISTANT:"
