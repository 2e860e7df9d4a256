"""The engine's pluggable parts, by name: pruning methods, decoders and model families.

This module imports no torch, so the job's configuration can list and check names on the driver
before any model code loads. Each entry names its implementation as ``"module:attribute"``,
imported only when an engine is built (:func:`load`).

Adding a part is one new file plus one ``register_*`` call here (or, for a plug-in or a test,
anywhere before the config is validated and the engine built)::

    register_pruning(PruningSpec("mymethod", acts="before_llm", implementation="pkg.mine:MyMethod",
                                 summary="..."))
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Literal

# Where a pruning method acts on the visual tokens.
BEFORE_LLM = "before_llm"  # on the vision tower's features: every LLM layer sees the kept tokens
IN_LLM = "in_llm"  # inside the language model at a layer K: layers 1..K see every token
Acts = Literal["before_llm", "in_llm"]


@dataclass(frozen=True)
class PruningSpec:
    """A visual-token pruning method as the configuration sees it."""

    name: str
    acts: Acts
    implementation: str  # "module:Class"; the class is built with the EngineConfig
    summary: str
    needs_budget: bool = True  # pruning.budget must be set
    needs_twig: bool = False  # a trained twig must be loaded (decode.twig)

    @property
    def budget_unit(self) -> str:
        """What ``pruning.budget`` counts with ``pruning.budget_unit=kept`` (R, per segment)."""
        if not self.needs_budget:
            return "none (every visual token is kept)"
        if self.acts == BEFORE_LLM:
            return "visual tokens per segment that every language-model layer sees"
        return "visual tokens per segment that the layers after K see"


@dataclass(frozen=True)
class DecoderSpec:
    """A decoding strategy (``decode.strategy``)."""

    name: str
    implementation: str
    summary: str
    needs_twig: bool = False


@dataclass(frozen=True)
class FamilySpec:
    """A model family, keyed by the checkpoint's ``config.json`` ``model_type``."""

    model_type: str
    implementation: str  # "module:Adapter"
    summary: str


PRUNING: dict[str, PruningSpec] = {}
DECODERS: dict[str, DecoderSpec] = {}
FAMILIES: dict[str, FamilySpec] = {}

# What pruning.budget_unit may say: R (tokens kept, the method's own unit) or TwigVLM's R-bar
# (visual tokens per segment averaged over the language model's layers).
BUDGET_UNITS = ("kept", "layer_mean")


def register_pruning(spec: PruningSpec) -> PruningSpec:
    return _register(PRUNING, spec.name, spec)


def register_decoder(spec: DecoderSpec) -> DecoderSpec:
    return _register(DECODERS, spec.name, spec)


def register_family(spec: FamilySpec) -> FamilySpec:
    return _register(FAMILIES, spec.model_type, spec)


def unregister_pruning(name: str) -> None:
    """Remove a method (tests that register their own clean up with this)."""
    PRUNING.pop(name, None)


def _register(table: dict, name: str, spec):
    if not name or not name.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"registry names are letters, digits, '_' and '-', got {name!r}")
    if name in table and table[name] != spec:
        raise ValueError(f"{name!r} is already registered as {table[name].implementation}")
    table[name] = spec
    return spec


def pruning_names() -> tuple[str, ...]:
    return tuple(PRUNING)


def decoder_names() -> tuple[str, ...]:
    return tuple(DECODERS)


def family_names() -> tuple[str, ...]:
    return tuple(FAMILIES)


def pruning_spec(name: str) -> PruningSpec:
    if name not in PRUNING:
        raise KeyError(f"unknown pruning method {name!r}; allowed: {', '.join(PRUNING)}")
    return PRUNING[name]


def decoder_spec(name: str) -> DecoderSpec:
    if name not in DECODERS:
        raise KeyError(f"unknown decode strategy {name!r}; allowed: {', '.join(DECODERS)}")
    return DECODERS[name]


def family_spec(model_type: str) -> FamilySpec:
    if model_type not in FAMILIES:
        raise KeyError(f"model_type {model_type!r} is not supported; supported: {', '.join(FAMILIES)}")
    return FAMILIES[model_type]


def load(spec: PruningSpec | DecoderSpec | FamilySpec):
    """Import and return the object a spec names."""
    module, _, attribute = spec.implementation.partition(":")
    return getattr(importlib.import_module(module), attribute)


# --- built-in parts -------------------------------------------------------------------------------

register_pruning(
    PruningSpec(
        "none",
        BEFORE_LLM,
        "operators.pruning.none:KeepAll",
        "every visual token (the unpruned model)",
        needs_budget=False,
    )
)
register_pruning(
    PruningSpec(
        "vispruner",
        BEFORE_LLM,
        "operators.pruning.vispruner:VisPruner",
        "VisPruner: important tokens by [CLS] attention, then diverse ones",
    )
)
register_pruning(
    PruningSpec("fastv", IN_LLM, "operators.pruning.fastv:FastV", "FastV: drop by the last token's attention at K")
)
register_pruning(
    PruningSpec("random", BEFORE_LLM, "operators.pruning.random_subset:RandomSubset", "a seeded uniform subset")
)
register_pruning(
    PruningSpec("pool", BEFORE_LLM, "operators.pruning.pool:GridPool", "average pooling of the patch grid")
)
register_pruning(
    PruningSpec(
        "ttp",
        IN_LLM,
        "operators.pruning.ttp:TwigGuided",
        "TwigVLM's twig-guided pruning at the twig's K, with FinalWipe",
        needs_twig=True,
    )
)

register_decoder(
    DecoderSpec(
        "greedy",
        "operators.decoding.autoregressive:Autoregressive",
        "one base step per token: greedy at temperature 0, else sampling",
    )
)
register_decoder(
    DecoderSpec(
        "ssd",
        "operators.decoding.speculative:SelfSpeculative",
        "TwigVLM's self-speculative decoding: the twig drafts, the base verifies (same output as greedy)",
        needs_twig=True,
    )
)

register_family(FamilySpec("llava", "operators.families.llava:LlavaAdapter", "LLaVA-1.5"))
register_family(FamilySpec("llava_next", "operators.families.llava_next:LlavaNextAdapter", "LLaVA-NeXT (anyres)"))
register_family(FamilySpec("video_llava", "operators.families.video_llava:VideoLlavaAdapter", "Video-LLaVA"))
register_family(
    FamilySpec(
        "llava_onevision",
        "operators.families.llava_onevision:LlavaOnevisionAdapter",
        "LLaVA-OneVision (SigLIP, anyres crops, pooled video frames)",
    )
)
register_family(FamilySpec("qwen2_5_vl", "operators.families.qwen2_5_vl:Qwen2_5_VLAdapter", "Qwen2.5-VL (M-RoPE)"))
register_family(FamilySpec("qwen3_vl", "operators.families.qwen3_vl:Qwen3VLAdapter", "Qwen3-VL (M-RoPE, DeepStack)"))
