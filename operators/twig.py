"""TwigVLM's twig: T decoder layers grown on base layer K, with their own final norm and LM head.

The shallow model {base layers 1..K} + twig drafts tokens for self-speculative decoding, and its
last layer's attention ranks visual tokens for twig-guided pruning (TTP). This module holds the
twig itself (pure PyTorch + Hugging Face layers), growing it from a base model, a fingerprint of
the base weights, and saving/loading (safetensors only). TTP's budget arithmetic is
``operators.budgets``.

Layer ids: twig layer t caches its keys/values under id ``n_base_layers + t``, so one
``operators.kv_cache.KVCache`` can hold base and twig layers without confusing them.

Draft vocabulary (FR-Spec, EAGLE-3): a twig may score only N frequent tokens (``draft_vocab``, full
ids sorted by frequency) with a head sliced to those rows (``restrict_vocab``). Its logits are then
[..., N]; ``full_ids`` maps a draft index back to a base token id. The base still verifies over
its whole vocabulary, so this changes what is drafted, never what is output.

Base features (EAGLE's feature input, an addition to TwigVLM): a twig may also read the base's own
final hidden state (after its final norm) at the previous position, through a learnt projection
``feature_in`` added to its layer-K input (``add_base_features``, zero-initialised, so the twig
starts as it was). When SSD drafts from the base's last verified token, the base has just computed
that state: the twig sees what the whole base "thought" one token earlier, not only layer K.
Where no such state exists (the prompt, later drafts in a round) the input is zero, as in training,
which drops it at random positions.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path

import torch
from torch import nn

from operators.language_model import text_model
from operators.loading import DEFAULT_CACHE, is_remote, stage_directory

FORMAT = "vlm-batch-twig/1"
WEIGHTS_NAME = "twig.safetensors"
CONFIG_NAME = "twig.json"
FINGERPRINT_SAMPLES = 4096  # values hashed per tensor (plus the last one)


class Twig(nn.Module):
    """T decoder layers grown on base layer K (TwigVLM), with their own final norm and LM head.

    ``K`` is 1-indexed: the twig reads the hidden state after base layer K, i.e. the output of
    ``lm.layers[K - 1]``. ``layers[t]`` starts as a copy of base ``lm.layers[K + t]`` (0-indexed) and
    its attention's ``layer_idx`` is ``n_base_layers + t`` (``layer_ids``).
    """

    draft_vocab: torch.Tensor | None  # [N] full token ids the head scores, most frequent first; None: all

    def __init__(self, K: int, layers: list[nn.Module], norm: nn.Module, head: nn.Linear, n_base_layers: int):
        super().__init__()
        self.K = K
        self.T = len(layers)
        self.n_base_layers = n_base_layers
        self.vocab_size = head.out_features  # the base's vocabulary, whatever the head is restricted to
        self.layers = nn.ModuleList(layers)
        self.norm = norm
        self.head = head
        # A buffer, so it is saved with the weights and follows .to(device); None is not saved.
        self.register_buffer("draft_vocab", None)
        self.feature_in: nn.Linear | None = None  # base features (``add_base_features``); None: none
        for t, layer in enumerate(self.layers):
            layer.self_attn.layer_idx = n_base_layers + t

    def full_ids(self, index: torch.Tensor) -> torch.Tensor:
        """Base token ids of head outputs ``index`` (any shape): identity without a draft vocabulary."""
        return index if self.draft_vocab is None else self.draft_vocab[index]

    def full_probs(self, probs: torch.Tensor) -> torch.Tensor:
        """A distribution over the head's outputs [B, N] as one over the base vocabulary [B, V]
        (zero outside the draft vocabulary): what speculative sampling's q must be."""
        if self.draft_vocab is None:
            return probs
        full = probs.new_zeros(probs.shape[0], self.vocab_size)
        return full.index_copy_(1, self.draft_vocab, probs)

    def draft_index(self, ids: torch.Tensor) -> torch.Tensor:
        """Head output index of base token ids (any shape); -1 where a token is outside the draft vocabulary."""
        if self.draft_vocab is None:
            return ids
        lookup = torch.full((self.vocab_size,), -1, dtype=torch.long, device=ids.device)
        lookup[self.draft_vocab] = torch.arange(len(self.draft_vocab), device=ids.device)
        return lookup[ids]

    @property
    def base_features(self) -> bool:
        return self.feature_in is not None

    def add_features(self, hidden: torch.Tensor, features: torch.Tensor | None) -> torch.Tensor:
        """The twig's input: layer-K states [..., D] plus the projected base features [..., D], if any."""
        if self.feature_in is None or features is None:
            return hidden
        return hidden + self.feature_in(features.to(hidden.dtype))

    @property
    def layer_ids(self) -> list[int]:
        """KV-cache ids of the twig layers: n_base_layers + t, t = 0..T-1."""
        return [self.n_base_layers + t for t in range(self.T)]

    @property
    def modules_by_id(self) -> dict[int, nn.Module]:
        """layer id -> twig layer (for ``operators.language_model.run_layers(..., modules=...)``)."""
        return dict(zip(self.layer_ids, self.layers, strict=True))

    def hidden(
        self,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        attention_mask: torch.Tensor | None,
        rotary_emb: nn.Module,
        features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Twig layers then twig norm, no cache. hidden [B, S, D] after base layer K -> [B, S, D];
        ``features`` [B, S, D]: the base's final state at each previous position (zeros: none)."""
        hidden = self.add_features(hidden, features)
        position_embeddings = rotary_emb(hidden, positions)  # (cos, sin) [B, S, Dh]
        for layer in self.layers:
            out = layer(
                hidden,
                attention_mask=attention_mask,
                position_ids=positions,
                position_embeddings=position_embeddings,
            )
            hidden = out[0] if isinstance(out, tuple) else out
        return self.norm(hidden)

    def forward(
        self,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        attention_mask: torch.Tensor | None,
        rotary_emb: nn.Module,
        select: torch.Tensor | None = None,
        features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Twig logits, float32 [B, S, V].

        hidden [B, S, D]: base hidden state after layer K; positions [B, S]; attention_mask bool
        [B, 1, S, S] (True = attend, see :func:`causal_mask`) or None (causal, no padding);
        rotary_emb: the base's ``lm.rotary_emb``. ``select`` [B, S] bool: only those positions
        go through the head, -> [N, V] in row-major order (training needs answer positions only).
        """
        normed = self.hidden(hidden, positions, attention_mask, rotary_emb, features)  # [B, S, D]
        if select is not None:
            normed = normed[select]  # [N, D]
        return self.head(normed).float()


def add_base_features(twig: Twig) -> Twig:
    """Give ``twig`` a base-feature input (in place): a D x D projection, zero-initialised, so its
    outputs are unchanged until it is trained. Idempotent."""
    if twig.feature_in is None:
        size = twig.head.in_features
        weight = twig.head.weight
        twig.feature_in = nn.Linear(size, size, bias=False, device=weight.device, dtype=weight.dtype)
        nn.init.zeros_(twig.feature_in.weight)
        twig.feature_in.requires_grad_(weight.requires_grad)
    return twig


def restrict_vocab(twig: Twig, draft_vocab: torch.Tensor) -> Twig:
    """Restrict ``twig``'s head to the rows of ``draft_vocab`` (full ids [N], no repeats), in place.

    Slices the current head (the full one, or an already restricted one when every id is in it), so a
    trained twig keeps what it learnt for those tokens. The head's cost drops from V to N rows.
    """
    ids = draft_vocab.to(dtype=torch.long, device=twig.head.weight.device).reshape(-1)
    if len(ids) == 0 or len(torch.unique(ids)) != len(ids) or int(ids.min()) < 0 or int(ids.max()) >= twig.vocab_size:
        raise ValueError(f"a draft vocabulary is a non-empty set of distinct ids below {twig.vocab_size}")
    rows = twig.draft_index(ids)
    if bool((rows < 0).any()):
        raise ValueError("the twig's head is already restricted and lacks some of these ids")
    old = twig.head
    head = nn.Linear(
        old.in_features, len(ids), bias=old.bias is not None, device=old.weight.device, dtype=old.weight.dtype
    )
    with torch.no_grad():
        head.weight.copy_(old.weight[rows])
        if old.bias is not None:
            head.bias.copy_(old.bias[rows])
    head.requires_grad_(old.weight.requires_grad)
    twig.head = head
    twig.draft_vocab = ids.clone()
    return twig


def extend_vocab(twig: Twig, base_head: nn.Module, extra_ids: torch.Tensor) -> Twig:
    """Add ``extra_ids`` (full ids [M], distinct, none already drafted) to a restricted ``twig``'s head,
    in place, after its current rows, which are kept. A vocabulary chosen on one kind of text misses tokens
    of another (the committed SmolLM2 twig's 4,096, chosen on its template-built replies, lacked 15 % of the
    tokens of its replies to hand-written requests): this widens it without starting over.

    The new rows are ``base_head``'s (the base's LM head, where every twig head starts) taken through
    ``_head_drift``, the linear map that carries the base's rows of the current vocabulary to the twig's.
    Training moves a head away from the base's, and the base's own rows beside trained ones outscore them:
    on the committed SmolLM2 twig they took its held-out top-1 agreement from 0.368 to 0.144 at 16,384
    tokens; through the map it stays 0.368 (BENCHMARKS.md). Training then teaches the new rows."""
    if twig.draft_vocab is None:
        raise ValueError("the twig's head already scores the full vocabulary")
    ids = extra_ids.to(dtype=torch.long, device=twig.head.weight.device).reshape(-1)
    if len(torch.unique(ids)) != len(ids) or (len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= twig.vocab_size)):
        raise ValueError(f"extra draft ids must be distinct ids below {twig.vocab_size}")
    if bool((twig.draft_index(ids) >= 0).any()):
        raise ValueError("some extra ids are already in the draft vocabulary")
    old, weight = twig.head, base_head.weight
    if weight.shape != (twig.vocab_size, old.in_features):
        raise ValueError(f"base head of shape {tuple(weight.shape)}, expected {(twig.vocab_size, old.in_features)}")
    bias = getattr(base_head, "bias", None)
    head = nn.Linear(
        old.in_features, len(twig.draft_vocab) + len(ids), bias=old.bias is not None, device=old.weight.device
    ).to(old.weight.dtype)
    with torch.no_grad():
        drift = _head_drift(weight[twig.draft_vocab], old.weight)
        head.weight.copy_(torch.cat([old.weight, (weight[ids].double() @ drift).to(old.weight)]))
        if old.bias is not None:
            added = bias[ids].to(old.bias) if bias is not None else old.bias.new_zeros(len(ids))
            head.bias.copy_(torch.cat([old.bias, added]))
    head.requires_grad_(old.weight.requires_grad)
    twig.head = head
    twig.draft_vocab = torch.cat([twig.draft_vocab, ids])
    return twig


def _head_drift(base_rows: torch.Tensor, rows: torch.Tensor, ridge: float = 1e-6) -> torch.Tensor:
    """The map A [D, D] (float64) with base_rows [V, D] @ A closest to rows [V, D], pulled towards the
    identity: A = I + (BᵀB + λI)⁻¹ Bᵀ (rows − B), λ = ``ridge`` × BᵀB's mean eigenvalue. With V ≥ D rows
    it is the least-squares map; with fewer, directions the rows do not span keep the identity; an
    untrained head (rows = base rows) gives the identity."""
    b, w = base_rows.double(), rows.double()
    gram = b.T @ b
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    lam = ridge * float(gram.diagonal().mean().clamp(min=1e-12))
    return eye + torch.linalg.solve(gram + lam * eye, b.T @ (w - b))


def causal_mask(valid: torch.Tensor) -> torch.Tensor | None:
    """Bool attention mask [B, 1, S, S] for rows with padding valid [B, S] (True = real token).

    Causal over valid keys; a padding query sees only itself (a row with nothing to attend to
    would make SDPA return NaN). None when nothing is padded: SDPA's causal fast path.
    """
    if bool(valid.all()):
        return None
    length = valid.shape[1]
    index = torch.arange(length, device=valid.device)
    causal = index[None, :] <= index[:, None]  # [S, S]
    mask = valid[:, None, :] & causal[None]  # [B, S, S]
    mask[:, index, index] = True
    return mask[:, None]


def n_layers(model: nn.Module) -> int:
    return len(text_model(model).layers)


def grow_twig(model: nn.Module, K: int = 2, T: int = 3) -> Twig:
    """A twig on base layer K of a Llava*ForConditionalGeneration: copies of base layers K+1..K+T
    (1-indexed), of the final norm and of ``lm_head``; same dtype and device as the base."""
    lm = text_model(model)
    count = len(lm.layers)
    if not (isinstance(K, int) and isinstance(T, int) and K >= 1 and T >= 1 and K + T <= count):
        raise ValueError(
            f"twig K={K}, T={T} does not fit a base of {count} layers: need K >= 1, T >= 1 and K + T <= {count} "
            f"(the twig copies base layers K+1..K+T)"
        )
    layers = [copy.deepcopy(lm.layers[K + t]) for t in range(T)]
    return Twig(K, layers, copy.deepcopy(lm.norm), copy.deepcopy(model.lm_head), count)


def hidden_after_layer(model: nn.Module, K: int, **inputs) -> torch.Tensor:
    """Hidden state after base layer K ([B, S, D], HF's ``hidden_states[K]``), running only layers 1..K.

    ``inputs`` are what the model's forward takes (input_ids, pixel_values, attention_mask, ...):
    Hugging Face does the embedding and the media merge, and a hook on layer K stops the forward
    there, so deeper layers cost nothing.
    """

    class _Stop(Exception):
        pass

    captured: list[torch.Tensor] = []

    def hook(module, args, output):
        captured.append(output[0] if isinstance(output, tuple) else output)
        raise _Stop

    handle = text_model(model).layers[K - 1].register_forward_hook(hook)
    try:
        model(**inputs, use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(f"base layer {K} never ran")
    return captured[0]


# --- fingerprint -----------------------------------------------------------------------------------


def base_fingerprint(model: nn.Module) -> str:
    """sha256 (hex, 32 chars) of the base weights, cheap enough for a 7B model.

    Hashes, for every state-dict tensor in name order: its name, its shape, and a fixed strided
    sample of its values: ``FINGERPRINT_SAMPLES`` elements of the flattened tensor at an odd
    stride of about numel / FINGERPRINT_SAMPLES (odd, so the sample walks across the columns of
    power-of-two-wide matrices instead of staying in one), plus the last element. Whole-tensor
    changes (a retrained projector, another checkpoint) and changes to sampled values change it;
    a change confined to unsampled elements does not.

    Values are hashed after rounding to bfloat16 and dtypes are not hashed, so one checkpoint
    gives one fingerprint whether loaded in float32 or bfloat16 (a twig trained on a float32
    base loads on the same base in bfloat16 on a GPU). Twigs attached to the model are skipped.
    """
    skip = tuple(f"{name}." for name, module in model.named_modules() if isinstance(module, Twig) and name)
    digest = hashlib.sha256()
    state = model.state_dict()
    for name in sorted(state):
        if name.startswith(skip):
            continue
        tensor = state[name].detach()
        flat = tensor.reshape(-1)
        stride = max(1, flat.numel() // FINGERPRINT_SAMPLES) | 1
        sample = flat[::stride][:FINGERPRINT_SAMPLES]
        if flat.numel():
            sample = torch.cat([sample, flat[-1:]])
        if sample.is_floating_point():
            sample = sample.to(torch.bfloat16).view(torch.int16)
        digest.update(f"{name}|{tuple(tensor.shape)}|".encode())
        digest.update(sample.cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:32]


# --- save / load -----------------------------------------------------------------------------------


def twig_config(twig: Twig, model: nn.Module, trained: dict | None = None) -> dict:
    lm = text_model(model)
    return {
        "format": FORMAT,
        "K": twig.K,
        "T": twig.T,
        "base_fingerprint": base_fingerprint(model),
        "base_model_type": model.config.model_type,
        "base_layers": len(lm.layers),
        "hidden_size": lm.config.hidden_size,
        "vocab_size": model.lm_head.out_features,
        "draft_vocab": None if twig.draft_vocab is None else len(twig.draft_vocab),
        "base_features": twig.base_features,
        "dtype": str(next(twig.parameters()).dtype).removeprefix("torch."),
        "trained": trained or {},
    }


def save_twig(
    twig: Twig, directory: str | Path, model: nn.Module, trained: dict | None = None, storage_options=None
) -> None:
    """Write ``twig.safetensors`` (the twig's own weights) and ``twig.json`` under a directory or URI.

    Each file is written under a temporary name and renamed; twig.json goes last, so a directory
    with a twig.json holds a complete twig. Object-store URIs get one PUT per file.
    """
    from safetensors.torch import save

    config = twig_config(twig, model, trained)
    weights = save({name: t.detach().cpu().contiguous() for name, t in twig.state_dict().items()}, {"format": FORMAT})
    config_text = json.dumps(config, indent=2) + "\n"
    directory = str(directory).rstrip("/")
    if is_remote(directory):
        import fsspec

        fs, root = fsspec.core.url_to_fs(directory, **(storage_options or {}))
        fs.makedirs(root, exist_ok=True)
        fs.pipe_file(f"{root}/{WEIGHTS_NAME}", weights)
        fs.pipe_file(f"{root}/{CONFIG_NAME}", config_text.encode())
        return
    path = Path(directory.removeprefix("file://"))
    path.mkdir(parents=True, exist_ok=True)
    for name, data in ((WEIGHTS_NAME, weights), (CONFIG_NAME, config_text.encode())):
        partial = path / f".{name}.{os.getpid()}.partial"
        partial.write_bytes(data)
        os.replace(partial, path / name)


def fetch_twig(uri: str, cache_dir: str | Path | None = None, storage_options: dict | None = None) -> Path:
    """Copy a twig directory from object storage into a local cache; return the local directory.

    The cache key covers the URI and the remote twig.json, so a retrained twig at the same URI is
    fetched again. Staged in a temporary sibling and renamed into place, like checkpoints.
    """
    import fsspec

    fs, root = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    root = root.rstrip("/")
    config_path = f"{root}/{CONFIG_NAME}"
    if not fs.exists(config_path):
        raise FileNotFoundError(f"no {CONFIG_NAME} under {uri}: not a twig directory")
    config_bytes = fs.cat_file(config_path)
    cache = Path(cache_dir) if cache_dir else DEFAULT_CACHE.parent / "twigs"
    key = hashlib.sha256(uri.rstrip("/").encode() + b"\0" + config_bytes).hexdigest()[:16]
    target = cache / key
    if (target / CONFIG_NAME).exists():
        return target

    def copy(staging: Path) -> None:
        fs.get_file(f"{root}/{WEIGHTS_NAME}", str(staging / WEIGHTS_NAME))
        (staging / CONFIG_NAME).write_bytes(config_bytes)

    return stage_directory(target, copy)


def read_twig_config(directory: Path) -> dict:
    path = directory / CONFIG_NAME
    if not path.exists():
        raise FileNotFoundError(f"{directory} is not a twig directory (no {CONFIG_NAME})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


def check_compatible(config: dict, model: nn.Module, where: str) -> None:
    """Raise ValueError unless the twig described by ``config`` was trained on this base."""
    if config.get("format") != FORMAT:
        raise ValueError(f"{where}: twig format {config.get('format')!r} is not {FORMAT!r}")
    lm = text_model(model)
    expected = {
        "hidden_size": lm.config.hidden_size,
        "vocab_size": model.lm_head.out_features,
        "base_layers": len(lm.layers),
    }
    for key, value in expected.items():
        if config.get(key) != value:
            raise ValueError(f"{where}: the twig has {key}={config.get(key)} but the base model has {key}={value}")
    fingerprint = base_fingerprint(model)
    if config.get("base_fingerprint") != fingerprint:
        raise ValueError(
            f"{where}: this twig was trained on another base model: its base_fingerprint is "
            f"{config.get('base_fingerprint')} but the loaded base model's is {fingerprint}. "
            "Train a twig for this base (jobs/train_twig.py) or load the base it was trained on."
        )


def load_twig(
    directory_or_uri: str | Path,
    model: nn.Module,
    storage_options: dict | None = None,
    cache_dir: str | Path | None = None,
) -> Twig:
    """Load a twig saved by :func:`save_twig` onto ``model`` (its dtype and device).

    A local directory or any fsspec URI (copied to a local cache first). Refuses, with a
    ValueError, a twig of another format, another geometry, or another base (fingerprint).
    """
    from safetensors.torch import load_file

    source = str(directory_or_uri)
    directory = fetch_twig(source, cache_dir, storage_options) if is_remote(source) else Path(source)
    directory = Path(str(directory).removeprefix("file://"))
    config = read_twig_config(directory)
    check_compatible(config, model, f"twig {source}")
    twig = grow_twig(model, int(config["K"]), int(config["T"]))
    weights = directory / WEIGHTS_NAME
    if not weights.exists():
        raise FileNotFoundError(f"{directory} has no {WEIGHTS_NAME}")
    state = load_file(str(weights))
    if config.get("draft_vocab"):  # the saved ids overwrite these placeholders
        restrict_vocab(twig, torch.arange(int(config["draft_vocab"])))
    if config.get("base_features"):
        add_base_features(twig)
    twig.load_state_dict(state, strict=True)  # copies into the base's dtype and device
    return twig.eval()
