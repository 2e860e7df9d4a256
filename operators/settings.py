"""The engine's settings and every rule about them, in one place (no torch import).

The job's pydantic configuration translates itself into an :class:`EngineConfig`
(``pipeline.config.Config.to_engine_config``) and so runs these same checks on the driver, before
any cluster work; code that builds an engine directly gets them too. Messages name the job's
config keys (``pruning.budget``), since that is where a user sets them.
"""

from __future__ import annotations

from dataclasses import KW_ONLY, dataclass

from operators import registry

# compute.cpu_linear: how linear layers run on CPU (operators.cpu_linear). "onednn": oneDNN with each
# weight packed once (faster at decoding's few rows); "aten": PyTorch's own linear.
CPU_LINEAR_KERNELS = ("onednn", "aten")


class SettingError(ValueError):
    """A bad engine setting; ``key`` is the job config key it comes from."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key


@dataclass(frozen=True)
class EngineConfig:
    pruning_method: str = "none"  # a name in operators.registry.PRUNING (pruning.method)
    _: KW_ONLY
    budget: int | None = None  # pruning.budget, in budget_unit per segment (image, crop or frame)
    # pruning.budget_unit: "kept" = R, the visual tokens the method keeps (before the LLM: in every layer;
    # FastV/TTP: after layer K); "layer_mean" = TwigVLM's R-bar, kept tokens averaged over the LLM's layers.
    budget_unit: str = "kept"
    important_ratio: float = 0.5  # VisPruner's share of the budget given to important tokens
    fastv_layer: int = 2  # FastV's K: layers 1..K see every token
    seed: int = 0  # the random baseline's seed (pruning.seed)
    finalwipe_layer: int | None = None  # TTP: first text-only base layer (0-indexed); None: 3/4 of the depth
    pad_to_square: bool = False  # LLaVA-1.5: pad images to square like the original evaluation
    decode_strategy: str = "greedy"  # a name in operators.registry.DECODERS (decode.strategy)
    max_new_tokens: int = 64
    # Generate exactly max_new_tokens per row, end-of-sequence tokens included (vLLM's ignore_eos): for
    # benchmarks whose random-weight models would otherwise stop at random lengths.
    ignore_eos: bool = False
    max_draft: int = 5  # SSD: draft tokens per round at most (TwigVLM's delta)
    draft_threshold: float = 0.6  # SSD: stop a row's draft at a token with probability below this (theta)
    # SSD, greedy: at depth j, this[j - 1] more of the twig's most likely tokens are verified beside d_j
    # (leaves of a draft tree; the base may accept one where it rejects d_j). (): a chain, as TwigVLM.
    draft_alternatives: tuple[int, ...] = ()
    temperature: float = 0.0  # 0: greedy; > 0: sampling (SSD then uses speculative sampling)
    top_k: int | None = None  # sampling: keep the k most likely tokens (None: all)
    top_p: float = 1.0  # sampling: keep the smallest set of tokens with this much probability
    sampling_seed: int = 0  # decode.seed: each row's sampler is seeded by it and the row's key
    # Batch sizing: generate() sorts requests by prompt length and splits them into sub-batches of at
    # most this many tokens, rows x (longest pruned prompt + max_new_tokens); None runs one batch.
    batch_tokens: int | None = None

    def __post_init__(self) -> None:
        try:
            spec = registry.pruning_spec(self.pruning_method)
        except KeyError as e:
            raise SettingError("pruning.method", e.args[0]) from None
        try:
            registry.decoder_spec(self.decode_strategy)
        except KeyError as e:
            raise SettingError("decode.strategy", e.args[0]) from None
        _at_least("pruning.budget", self.budget, 1, optional=True)
        if spec.needs_budget and self.budget is None:
            raise SettingError("pruning.budget", f"required when pruning.method is {self.pruning_method!r}")
        if self.budget_unit not in registry.BUDGET_UNITS:
            allowed = ", ".join(registry.BUDGET_UNITS)
            raise SettingError("pruning.budget_unit", f"unknown {self.budget_unit!r}; allowed: {allowed}")
        _between("pruning.important_ratio", self.important_ratio, 0.0, 1.0)
        _at_least("pruning.fastv_layer", self.fastv_layer, 1)
        _at_least("pruning.finalwipe_layer", self.finalwipe_layer, 1, optional=True)
        _at_least("decode.max_new_tokens", self.max_new_tokens, 1, maximum=8192)
        _at_least("decode.max_draft", self.max_draft, 1, maximum=64)
        _between("decode.draft_threshold", self.draft_threshold, 0.0, 1.0)
        alternatives = self.draft_alternatives
        if not isinstance(alternatives, tuple) or len(alternatives) > self.max_draft:
            raise SettingError(
                "decode.draft_alternatives",
                f"must be a list of at most decode.max_draft ({self.max_draft}) counts, got {alternatives!r}",
            )
        for count in alternatives:
            _at_least("decode.draft_alternatives", count, 0, maximum=16)
        _at_least("decode.temperature", self.temperature, 0.0)
        _at_least("decode.top_k", self.top_k, 1, optional=True)
        if not 0.0 < self.top_p <= 1.0:
            raise SettingError("decode.top_p", f"must be in (0, 1], got {self.top_p}")
        _at_least("compute.batch_tokens", self.batch_tokens, 1, optional=True)

    @property
    def pruning(self) -> registry.PruningSpec:
        return registry.pruning_spec(self.pruning_method)

    @property
    def decoder(self) -> registry.DecoderSpec:
        return registry.decoder_spec(self.decode_strategy)

    @property
    def needs_twig(self) -> bool:
        """A trained twig must be loaded: the pruning method or the decoder uses it."""
        return self.pruning.needs_twig or self.decoder.needs_twig

    @property
    def sampling(self) -> bool:
        return self.temperature > 0


def _at_least(key: str, value, minimum, optional: bool = False, maximum=None) -> None:
    if value is None and optional:
        return
    too_big = maximum is not None and isinstance(value, int | float) and value > maximum
    if isinstance(value, bool) or not isinstance(value, int | float) or value < minimum or too_big:
        bound = f">= {minimum}" + (f" and <= {maximum}" if maximum is not None else "")
        bound += " or null" if optional else ""
        raise SettingError(key, f"must be {bound}, got {value!r}")


def _between(key: str, value, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise SettingError(key, f"must be in [{low:g}, {high:g}], got {value!r}")
