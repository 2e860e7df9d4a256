"""The engine: requests in, pruned batched generation out, with per-sample accounting.

Stages per sub-batch: preprocess (the family adapter) → vision towers, once per distinct media
item → pre-LLM pruning and projection → the prompt batch → the decoder (the staged prefill with
any in-LLM pruning, then token generation). The parts are chosen once, here, from the
registry names in the :class:`~operators.settings.EngineConfig`.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from fractions import Fraction

import torch
from torch import nn

from operators import accounting, registry
from operators.batch import PromptBatch, assemble_batch
from operators.budgets import kept_for_layer_mean
from operators.decoding.base import Decoder, Generation
from operators.decoding.sampling import Sampler
from operators.families.base import RowInputs, Segments, Stream, make_adapter, placeholder_spans
from operators.language_model import text_model
from operators.prefill import InLLMPruning, LayerPlan
from operators.pruning.base import BeforeLLM, InLLM, VisualItem
from operators.pruning.none import KeepAll
from operators.settings import EngineConfig

__all__ = ["Engine", "EngineConfig", "Request", "Result", "format_prompt", "length_batches"]


@dataclass
class Request:
    prompt: str  # full prompt text with the <image>/<video> tag(s) in place
    images: list = field(default_factory=list)  # PIL images
    video: object | None = None  # [T, H, W, 3] uint8 array or list of PIL frames
    # Requests with the same key carry the same media (several questions about one video): the
    # vision tower then encodes it once per batch. None: never shared.
    media_key: str | None = None
    # Sampling: the row's generator is seeded from decode.seed and this key (the job passes the
    # item id), so its sample does not depend on its batch. None: the prompt and media_key.
    sample_key: str | None = None


@dataclass
class Result:
    text: str
    token_ids: list[int]
    visual_tokens_total: int  # visual tokens the unpruned model would see
    visual_tokens_kept: int  # visual tokens in the language model after pruning (FastV/TTP: after layer K)
    visual_tokens_layer_mean: float  # visual tokens averaged over LLM layers (TwigVLM's R-bar)
    prefill_flops: float  # estimate: language model (+ twig) + vision tower + projector
    kv_cache_bytes: int  # prompt KV cache of this row, all layers (+ the twig's)
    stage_ms: dict[str, float]  # batch wall time per stage divided by the batch size
    drafted: int | None = None  # SSD: draft tokens proposed by the twig
    accepted: int | None = None  # SSD: draft tokens the base accepted
    rounds: int | None = None  # SSD: verification rounds


class Engine:
    """Holds a loaded model (any registered family) and runs batches of requests."""

    def __init__(self, model: nn.Module, processor, config: EngineConfig | None = None, twig: nn.Module | None = None):
        self.config = config = config or EngineConfig()
        if config.needs_twig and twig is None:
            raise ValueError(
                f"pruning.method={config.pruning_method} and decode.strategy={config.decode_strategy} "
                "need a trained twig (decode.twig)"
            )
        self.model = model.eval()
        self.processor = processor
        self.adapter = make_adapter(model, processor, config.pad_to_square)
        self.lm = text_model(model)
        self.tokenizer = getattr(processor, "tokenizer", processor)
        generation = model.generation_config
        eos = generation.eos_token_id if generation.eos_token_id is not None else self.tokenizer.eos_token_id
        self.eos_token_ids = [eos] if isinstance(eos, int) else list(eos)
        pad = generation.pad_token_id if generation.pad_token_id is not None else self.tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else self.eos_token_ids[0]

        self.method = registry.load(config.pruning)(config)
        self.selector: BeforeLLM = self.method if isinstance(self.method, BeforeLLM) else KeepAll(config)
        stop_ids = [] if config.ignore_eos else self.eos_token_ids
        self.decoder: Decoder = registry.load(config.decoder)(config, stop_ids, self.pad_token_id)
        uses_twig = self.decoder.uses_twig or (isinstance(self.method, InLLM) and self.method.uses_twig)
        self.twig = twig.eval() if twig is not None and uses_twig else None
        self.layer_plan = self._layer_plan()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _layer_plan(self) -> LayerPlan:
        n_layers = len(self.lm.layers)
        twig_layer = self.twig.K if self.twig is not None else None
        if isinstance(self.method, InLLM):
            k, k_end = self.method.layers(n_layers, self.twig)
            return LayerPlan(n_layers, k, k_end if k_end < n_layers else None, twig_layer)
        return LayerPlan(n_layers, twig_layer=twig_layer)

    # --- the public entry points ----------------------------------------------------------------

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
            sub = [requests[i] for i in indices]
            for i, result in zip(indices, self._generate_rows([rows[i] for i in indices], sub, share), strict=True):
                results[i] = result
        return results

    @torch.no_grad()
    def prompt_batch(self, requests: list[Request]) -> PromptBatch:
        """The prompt batch the language model would get for ``requests`` (one batch, in order)."""
        rows = [self.adapter.preprocess(r.prompt, r.images, r.video) for r in requests]
        streams, _ = self._prune_and_project(rows, self._encode(rows, [r.media_key for r in requests]))
        return self._assemble(rows, streams)

    def pruned_prompt_length(self, row: RowInputs) -> int:
        """Prompt tokens entering the language model after pre-LLM pruning (for batch sizing)."""
        spans = placeholder_spans(row.input_ids, self.adapter.placeholder_ids, row.media)
        placeholders = sum(end - start for start, end in spans)
        visual = placeholders
        if not self.selector.keeps_everything and self.config.budget is not None:
            segments = sum(m.pixel_values.shape[0] for m in row.media)
            visual = min(visual, segments * self.config.budget)
        return len(row.input_ids) - placeholders + visual

    # --- stages -----------------------------------------------------------------------------------

    def _generate_rows(self, rows: list[RowInputs], requests: list[Request], preprocess_s: float) -> list[Result]:
        times: dict[str, float] = defaultdict(float)
        times["preprocess"] = preprocess_s
        t = time.perf_counter()
        segments = self._encode(rows, [r.media_key for r in requests])
        times["vision"] += time.perf_counter() - t

        t = time.perf_counter()
        streams, vision_flops = self._prune_and_project(rows, segments)
        times["prune"] += time.perf_counter() - t

        batch = self._assemble(rows, streams)
        out = self.decoder.generate(
            self.model, batch, self.layer_plan, self.twig, self._in_llm_pruning(batch), self._sampler(requests)
        )
        times["prefill"] += out.prefill_s
        times["decode"] += out.decode_s
        stage_ms = {k: 1000.0 * v / len(rows) for k, v in times.items()}
        return [self._result(batch, out, row, vision_flops[row], stage_ms) for row in range(len(rows))]

    def _encode(self, rows: list[RowInputs], keys: list[str | None] | None = None) -> list[list[Segments]]:
        """Run each tower once over every distinct media item of its kind in the batch (rows with the
        same key share media, and then share one Segments object; no keys: nothing shared)."""
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
            media = [rows[r].media[m] for r, m in items]
            media = [replace(item, pixel_values=item.pixel_values.to(self.device)) for item in media]
            for (r, m), segs in zip(items, self.adapter.encode_items(kind, media), strict=True):
                encoded[r][m] = segs
            for (r, m), (r0, m0) in shared.items():
                encoded[r][m] = encoded[r0][m0]
        return encoded

    def _prune_and_project(
        self, rows: list[RowInputs], segments: list[list[Segments]]
    ) -> tuple[list[list[Stream]], list[float]]:
        """Pre-LLM selection over every distinct media item at once, then each row's projected
        streams and its vision-side FLOPs (a tower pass shared by rows is charged in equal shares)."""
        distinct: dict[int, VisualItem] = {}  # id(Segments) -> item; rows sharing media share it
        for row, row_segments in zip(rows, segments, strict=True):
            for media, seg in zip(row.media, row_segments, strict=True):
                distinct.setdefault(id(seg), VisualItem(media, seg))
        selections = dict(zip(distinct, self.selector.select(list(distinct.values()), self.config.budget), strict=True))
        sharing = Counter(id(seg) for row_segments in segments for seg in row_segments)
        streams, flops = [], []
        for row, row_segments in zip(rows, segments, strict=True):
            row_streams, row_flops = [], 0.0
            for media, seg in zip(row.media, row_segments, strict=True):
                indices, tokens = selections[id(seg)]
                projected = self.adapter.project_media(media, tokens)
                row_streams.append(self.adapter.assemble(media, seg, indices, projected))
                row_flops += accounting.vision_flops(self.adapter, media, seg, tokens.shape[1], sharing[id(seg)])
            streams.append(row_streams)
            flops.append(row_flops)
        return streams, flops

    def _assemble(self, rows: list[RowInputs], streams: list[list[Stream]]) -> PromptBatch:
        # Unpruned, each stream must fill its placeholder run exactly (checked where the runs are found).
        embed, placeholders = self.lm.embed_tokens, self.adapter.placeholder_ids
        return assemble_batch(rows, streams, embed, placeholders, unpruned=self.selector.keeps_everything)

    def _in_llm_pruning(self, batch: PromptBatch) -> InLLMPruning | None:
        """The in-LLM method's scores and each row's visual-token keep count (budget x segments;
        ``layer_mean`` budgets are converted per segment with TwigVLM's formula)."""
        if not isinstance(self.method, InLLM):
            return None
        plan, cfg = self.layer_plan, self.config
        prunable = batch.prunable.sum(dim=1).tolist()
        keep = []
        for segments, tokens in zip(batch.segments, prunable, strict=True):
            per_segment = cfg.budget
            if cfg.budget_unit == "layer_mean":
                k_end = plan.wipe_layer or plan.n_layers
                m = Fraction(tokens, max(1, segments))
                per_segment = kept_for_layer_mean(plan.n_layers, plan.prune_layer, k_end, m, cfg.budget)
            keep.append(per_segment * segments)
        return InLLMPruning(self.method.scores, torch.tensor(keep, device=batch.embeds.device))

    def _sampler(self, requests: list[Request]) -> Sampler:
        cfg = self.config
        keys = [r.sample_key if r.sample_key is not None else f"{r.prompt}\0{r.media_key}" for r in requests]
        return Sampler.for_rows(cfg.temperature, cfg.top_k, cfg.top_p, cfg.sampling_seed, keys, self.device)

    def _result(self, batch: PromptBatch, out: Generation, row: int, vision_flops: float, stage_ms) -> Result:
        state, stats = out.prefill_state, out.stats
        n_tokens = int(out.lengths[row])
        ids = out.tokens[row, :n_tokens].tolist()
        tokens_per_layer = state.tokens_per_layer[row].tolist()
        # Visual tokens per layer; "kept" is the smallest non-zero count: what survives FastV's or
        # TTP's layer K (TTP's FinalWipe layers hold none), and everything for pre-LLM methods.
        text = int(batch.text_tokens[row])
        per_layer = [int(n - text) for n in tokens_per_layer]
        # The twig's layers ran over the prompt too (TTP, SSD): their FLOPs and cache count.
        twig_layers = [] if state.twig_tokens is None else [int(state.twig_tokens[row])] * len(self.twig.layers)
        return Result(
            text=self.tokenizer.decode(ids, skip_special_tokens=True).strip(),
            token_ids=ids,
            visual_tokens_total=batch.visual_total[row],
            visual_tokens_kept=min([v for v in per_layer if v > 0], default=0),
            visual_tokens_layer_mean=sum(per_layer) / len(per_layer),
            prefill_flops=accounting.language_model_flops(self.lm.config, tokens_per_layer + twig_layers)
            + vision_flops,
            kv_cache_bytes=accounting.kv_cache_bytes(
                self.lm.config, tokens_per_layer + twig_layers, batch.embeds.element_size()
            ),
            stage_ms=dict(stage_ms),
            drafted=None if stats is None else int(stats.drafted[row]),
            accepted=None if stats is None else int(stats.accepted[row]),
            rounds=None if stats is None else int(stats.rounds[row]),
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
