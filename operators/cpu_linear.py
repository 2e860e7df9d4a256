"""Linear layers through oneDNN with weights packed once, for CPU inference.

PyTorch's default CPU linear (MKL's sgemm on this project's wheel) is slow at the row counts decoding
runs: on the 2-core AMD EPYC here, all linears of SmolLM2-135M's 30 layers take 47 ms for one row and
63-81 ms for 2-6 rows. oneDNN with the weight reordered once into its blocked layout (what
``torch.compile`` uses on CPU) takes 32 ms for one row and 28-34 ms for 2-6 (BENCHMARKS.md, "Packed
CPU linears"). Greedy decoding gets faster, and verifying a block of drafts costs about one decoding
step, as on a GPU: what self-speculative decoding needs.

:func:`pack_linears` wraps a model's ``nn.Linear`` modules in place (per model instance; nothing in
torch or transformers is patched). The wrapper keeps the original ``weight`` and ``bias``
parameters, so state dicts, tied embeddings and code that reads ``.weight`` see what they saw; the
packed copy is extra memory (the linear weights twice). It falls back to ``F.linear`` where the
packed path does not apply: autograd (training), another device or dtype, or a weight changed since
packing (which it repacks).

Outputs differ from ``F.linear``'s by float rounding (about 1e-6 relative in fp32), as any two GEMM
kernels do; greedy and speculative decoding on the same packed model stay identical (tested).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from operators.settings import CPU_LINEAR_KERNELS

# Below this much linear weight (model and twig together) the weights stay in this CPU's caches, where
# oneDNN's cost per call (about 30 us, against 8-30 us for PyTorch's own at one row) outweighs what it
# saves: the 10 MB demo model decodes 20-30 % slower packed (BENCHMARKS.md, "Packed CPU linears").
MIN_PACKED_BYTES = 64 * 2**20


@functools.cache
def packing_available() -> bool:
    """oneDNN's packed linear exists in this torch build and agrees with ``F.linear`` on a small case."""
    ops = getattr(torch.ops, "mkldnn", None)
    if not torch.backends.mkldnn.is_available() or ops is None:
        return False
    try:
        weight = torch.linspace(-1, 1, 24).reshape(6, 4)
        x, bias = torch.linspace(-2, 2, 8).reshape(2, 4), torch.linspace(0, 1, 6)
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
        y = torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    except (AttributeError, RuntimeError):
        return False
    return bool(torch.allclose(y, F.linear(x, weight, bias), atol=1e-5))


@functools.cache
def packed_dtypes() -> tuple[torch.dtype, ...]:
    """The weight dtypes oneDNN packs on this CPU: float32 wherever packing is available, bfloat16 only
    where its bf16 path runs (AVX-512 BW/VL/DQ or AVX-NE-CONVERT; on an AVX2-only CPU such as an AMD
    Zen 1 the reorder raises). Other weights keep ``F.linear``."""
    if not packing_available():
        return ()
    supported = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        bf16 = bool(supported()) if supported is not None else False
    except RuntimeError:
        bf16 = False
    return (torch.float32, torch.bfloat16) if bf16 else (torch.float32,)


class PackedLinear(nn.Module):
    """An ``nn.Linear``'s parameters, computed through a oneDNN-packed copy of its weight."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias  # the same Parameter objects (ties survive)
        self._packed: torch.Tensor | None = None
        self._packed_for: tuple | None = None
        self._repack()

    def _key(self) -> tuple:
        # Which weight the packed copy was made from: its storage, in-place version, dtype and device.
        w = self.weight
        return (w.data_ptr(), w._version, w.dtype, w.device)

    def _repack(self) -> bool:
        w = self.weight
        if w.device.type != "cpu" or w.dtype not in packed_dtypes():
            self._packed, self._packed_for = None, None
            return False
        self._packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), None)
        self._packed_for = self._key()
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return F.linear(x, self.weight, self.bias)  # the packed op has no backward
        if self._packed_for != self._key() and not self._repack():
            return F.linear(x, self.weight, self.bias)
        if x.device.type != "cpu" or x.dtype != self.weight.dtype:
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self._packed, self.bias, "none", [], "")

    def __getstate__(self) -> dict:
        # oneDNN's opaque tensor cannot be copied or pickled: copies (deepcopy, torch.save, Ray) carry
        # the parameters only and repack on their first call.
        return {**self.__dict__, "_packed": None, "_packed_for": None}

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def pack_linears(module: nn.Module) -> int:
    """Replace every CPU ``nn.Linear`` of a dtype this CPU packs (:func:`packed_dtypes`: fp32, and bf16
    where supported) under ``module`` by a :class:`PackedLinear`, in place; returns how many. Nothing
    happens where :func:`packing_available` is false, and packing twice is harmless."""
    dtypes = packed_dtypes()
    if not dtypes:
        return 0
    count = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and child.weight.device.type == "cpu" and child.weight.dtype in dtypes:
                setattr(parent, name, PackedLinear(child))
                count += 1
    return count


def linear_bytes(*modules: nn.Module | None) -> int:
    """Bytes of ``nn.Linear`` weights under ``modules`` (each module counted once)."""
    seen = {id(m): m for module in modules if module is not None for m in module.modules()}
    return sum(m.weight.numel() * m.weight.element_size() for m in seen.values() if isinstance(m, nn.Linear))


def apply_cpu_linear(kernel: str, *modules: nn.Module | None, min_bytes: int | None = None) -> int:
    """``compute.cpu_linear`` applied to loaded modules (a base model and its twig): their linears are
    packed together, or none of them, when they hold at least ``min_bytes`` of weights
    (default :data:`MIN_PACKED_BYTES`)."""
    if kernel not in CPU_LINEAR_KERNELS:
        raise ValueError(f"unknown CPU linear kernel {kernel!r}; allowed: {', '.join(CPU_LINEAR_KERNELS)}")
    if kernel == "aten" or linear_bytes(*modules) < (MIN_PACKED_BYTES if min_bytes is None else min_bytes):
        return 0
    return sum(pack_linears(m) for m in modules if m is not None)
