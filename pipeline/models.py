"""Where a model comes from, and whether this job can run it: checked on the driver before Ray starts.

``model.path`` names one of three sources (:func:`parse_model_path`):

* a **local directory** (also ``file:///abs/path``);
* an **object-store URI** (``s3://bucket/prefix/``, any fsspec URI but ``file://`` and ``hf://``),
  copied once per node by ``operators.loading.fetch_checkpoint``;
* a **Hugging Face hub id** ``org/name``, optionally ``org/name@revision`` (branch, tag or commit),
  also written ``hf://org/name[@revision]``. Each inference actor downloads it into its node's
  cache (:func:`fetch_hub_model`): safetensors, JSON and tokenizer files and ``twig/``, never
  pickles, never remote code. The driver only reads ``config.json`` and the repo's file list.

A path that exists locally always wins; otherwise two ``/``-separated names of letters, digits,
``.``, ``_`` and ``-`` (each starting with a letter or digit, so ``./x`` and ``/x`` stay local)
are a hub id. ``models/foo`` run from a directory without ``models/foo`` is therefore looked up
on the hub, and the error says so.

:func:`check_model` reads the checkpoint's metadata wherever it lives and refuses, with one line
naming ``model.path`` or ``decode.twig``, the problem and the fix: a ``model_type`` no registered
family serves, pickle-only weights, missing processor files, and a twig that does not fit the
base. It also picks the model folder's ``twig/`` when the config needs a twig and names none.

No torch at import time: the driver imports this module. :func:`check_model` imports
``transformers``' configuration classes (for the defaults real ``config.json`` files leave out),
never model code.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from operators import registry
from pipeline.config import Config, ConfigError

LOCAL, OBJECT_STORE, HUB = "local", "object_store", "hub"

# A hub repo name: letters, digits, '.', '_', '-', starting with a letter or digit (so "./x" is a path).
_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]*"
HUB_ID = re.compile(rf"(?P<repo>{_NAME}/{_NAME})(?:@(?P<revision>[A-Za-z0-9._-]+))?")
# hf://org/name[@revision][/path/in/repo] (a twig inside a hub repo is hf://org/name/twig)
HUB_URI = re.compile(rf"hf://{HUB_ID.pattern}(?:/(?P<subpath>[^@]+?))?/?")

# What actors download from a hub repo: config, weights (safetensors only), processor and tokenizer
# files, chat templates, and the repo's twig. Never *.bin / *.pt / *.pth / *.ckpt (pickles).
HUB_ALLOW_PATTERNS = ("*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken", "twig/*")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
IMAGE_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
TWIG_DIR = "twig"
TWIG_CONFIG = "twig.json"  # operators.twig.CONFIG_NAME (not imported here: that module imports torch)
TWIG_FORMAT = "vlm-batch-twig/1"  # operators.twig.FORMAT
DEFAULT_ENDPOINT = "https://huggingface.co"


@dataclass(frozen=True)
class ModelSource:
    """Where ``model.path`` points: ``kind`` is LOCAL, OBJECT_STORE or HUB.

    ``location`` is the local path (without ``file://``), the URI, or the hub repo id;
    ``revision`` is the hub revision (None: the default branch).
    """

    kind: str
    location: str
    revision: str | None = None

    @property
    def hub_name(self) -> str:
        """``org/name[@revision]`` (hub sources)."""
        return self.location + (f"@{self.revision}" if self.revision else "")

    def join(self, name: str) -> str:
        """``name`` inside this source, in the form ``decode.twig`` and the loaders accept."""
        if self.kind == HUB:
            return f"hf://{self.hub_name}/{name}"
        if self.kind == OBJECT_STORE:
            return f"{self.location.rstrip('/')}/{name}"
        return os.path.join(self.location.rstrip("/") or "/", name)


@dataclass(frozen=True)
class ModelInfo:
    """What :func:`check_model` found out about ``model.path``."""

    source: ModelSource
    model_type: str  # config.json's model_type, served by a registered family
    family: str  # the family's name (operators.registry FamilySpec.summary), e.g. "LLaVA-1.5"
    local_dir: Path | None  # the checkpoint directory when model.path is local; None: each actor fetches it
    twig: str | None  # decode.twig as it will be loaded (named, or the model's twig/ picked by default)
    # Visual tokens one image feeds the language model unpruned; None when it depends on the image (anyres)
    visual_tokens_per_image: int | None
    # When the count depends on the image: how it does, and what a budget applies to (for --dry-run)
    visual_tokens_rule: str | None = None


def parse_model_path(path: str) -> ModelSource:
    """The source ``model.path`` names. An existing local path wins; else ``org/name[@rev]`` is a hub id.

    ``file://`` is local, ``hf://`` the hub, any other ``scheme://`` object storage; a string that
    is neither an existing path nor a hub id is taken as a (missing) local directory.
    """
    if path.startswith("file://"):
        return ModelSource(LOCAL, path.removeprefix("file://"))
    if path.startswith("hf://"):
        match = HUB_URI.fullmatch(path)
        if not match:
            raise ConfigError(
                f"model.path: {path} is not a hub reference; write hf://org/name or hf://org/name@revision"
            )
        if match["subpath"]:
            raise ConfigError(
                f"model.path: {path} names a folder inside a hub repo; only whole repos load (hf://org/name[@revision])"
            )
        return ModelSource(HUB, match["repo"], match["revision"])
    if "://" in path:
        return ModelSource(OBJECT_STORE, path)
    if os.path.exists(path):
        return ModelSource(LOCAL, path)
    match = HUB_ID.fullmatch(path)
    if match:
        return ModelSource(HUB, match["repo"], match["revision"])
    return ModelSource(LOCAL, path)


# --- hub access -----------------------------------------------------------------------------------
# Environment is read at call time: huggingface_hub reads HF_ENDPOINT / HF_HUB_OFFLINE / HF_HOME once at
# import, and this module may be imported before a test or a launcher sets them.


def hub_endpoint() -> str | None:
    """HF_ENDPOINT (a mirror or a test server), else None: huggingface_hub's default."""
    return os.environ.get("HF_ENDPOINT", "").rstrip("/") or None


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set: only the local cache may be used."""
    from huggingface_hub import constants

    flags = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"))
    return constants.HF_HUB_OFFLINE or any((f or "").upper() in ("1", "ON", "YES", "TRUE") for f in flags)


def hub_cache_dir() -> str | None:
    """Where hub downloads go: ``$VLM_MODEL_CACHE/hub`` when set (beside object-store copies), else
    huggingface_hub's cache (HF_HUB_CACHE, or HF_HOME/hub, or ~/.cache/huggingface/hub).

    Each node has its own; huggingface_hub locks its files, so the actors of one node share one copy.
    """
    if os.environ.get("VLM_MODEL_CACHE"):
        return os.path.join(os.environ["VLM_MODEL_CACHE"], "hub")
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return None


def fetch_hub_model(
    source: ModelSource, cache_dir: str | Path | None = None, key: str = "model.path", hint: str | None = None
) -> Path:
    """Download a hub model (``HUB_ALLOW_PATTERNS`` only) into the node's cache; return its local directory.

    Runs in each inference actor. With HF_HUB_OFFLINE set it only looks in the cache. Failures raise
    ConfigError with one line saying how to get the model onto the machine.
    """
    from huggingface_hub import snapshot_download

    try:
        directory = snapshot_download(
            source.location,
            revision=source.revision,
            allow_patterns=list(HUB_ALLOW_PATTERNS),
            cache_dir=str(cache_dir) if cache_dir else hub_cache_dir(),
            endpoint=hub_endpoint(),
            local_files_only=hub_offline(),
        )
    except Exception as error:
        raise hub_error(source, error, key, hint) from None
    return Path(directory)


def checkpoint_directory(path: str, cache_dir: str | Path | None = None, storage_options: dict | None = None) -> Path:
    """The local directory of ``model.path``: a local path as is; an object-store prefix copied into
    the node's cache (``operators.loading.fetch_checkpoint``); a hub id downloaded into the hub cache
    (``cache_dir`` if given, else :func:`hub_cache_dir`). What ``operators.loading.load_vlm`` takes."""
    where = parse_model_path(str(path))
    if where.kind == HUB:
        return fetch_hub_model(where, cache_dir, hint=str(path))
    if where.kind == OBJECT_STORE:
        from operators.loading import fetch_checkpoint

        return fetch_checkpoint(where.location, cache_dir, storage_options)
    return Path(where.location)


def local_twig(twig: str, cache_dir: str | Path | None = None) -> str:
    """``decode.twig`` as ``operators.twig.load_twig`` takes it: hub references (``hf://org/name[@rev]/twig``)
    become a directory of the node's hub cache (the model's own download already holds a model's twig/)."""
    match = HUB_URI.fullmatch(twig) if twig.startswith("hf://") else None
    if not match:
        return twig
    source = ModelSource(HUB, match["repo"], match["revision"])
    return str(fetch_hub_model(source, cache_dir, key="decode.twig") / (match["subpath"] or ""))


def hub_error(source: ModelSource, error: Exception, key: str = "model.path", hint: str | None = None) -> ConfigError:
    """One line for a failed hub access: what went wrong and what to do instead.

    ``hint``: ``model.path`` as written; when the hub has no such repo, a plain ``org/name`` is said
    to have been read as a hub id because no such local directory exists (a mistyped relative path).
    """
    from huggingface_hub import errors

    name = source.hub_name
    endpoint = hub_endpoint() or DEFAULT_ENDPOINT
    if isinstance(error, errors.GatedRepoError):
        return ConfigError(f"{key}: {name} is gated on {endpoint}: accept its terms there and set HF_TOKEN")
    if isinstance(error, errors.RevisionNotFoundError):
        return ConfigError(
            f"{key}: {name}: {source.location} has no revision {source.revision!r} on {endpoint}; "
            "name an existing branch, tag or commit after @"
        )
    if isinstance(error, errors.RepositoryNotFoundError):
        if hint and not hint.startswith("hf://"):
            name += f" (no local directory {hint} exists, so it was read as a hub id)"
        return ConfigError(
            f"{key}: {name}: no such model repo on {endpoint} (private repos need HF_TOKEN); check the name, "
            "or pass a local checkpoint directory or an object-store URI"
        )
    if hub_offline() or isinstance(error, errors.OfflineModeIsEnabled):
        reason = "offline: HF_HUB_OFFLINE is set, and it is not in the local cache"
    elif isinstance(error, errors.RemoteEntryNotFoundError):
        reason = f"a file of the repo is missing on {endpoint}"
    else:
        detail = (str(error).strip().splitlines() or [""])[0][:200]
        reason = f"cannot reach {endpoint}: {type(error).__name__}" + (f": {detail}" if detail else "")
    folder = f"models/{source.location.rsplit('/', 1)[-1]}"
    revision = f" --revision {source.revision}" if source.revision else ""
    return ConfigError(
        f"{key}: cannot fetch {name} from the Hugging Face hub ({reason}); on a machine with access run "
        f"`hf download {source.location}{revision} --local-dir {folder}` and pass model.path={folder}, or copy "
        f"that folder to object storage (`aws s3 sync {folder} s3://BUCKET/{folder}`) and pass "
        f"model.path=s3://BUCKET/{folder}"
    )


# --- reading a checkpoint's metadata wherever it lives --------------------------------------------


@dataclass
class _Checkpoint:
    """The files of a checkpoint as the checks need them: names at its root and under twig/, and a reader."""

    names: frozenset[str]  # "config.json", "twig/twig.json", ...
    read: Callable[[str], bytes]


def _shallow(names) -> frozenset[str]:
    return frozenset(n for n in names if "/" not in n or (n.startswith(f"{TWIG_DIR}/") and n.count("/") == 1))


def _open_local(directory: Path, where: str) -> _Checkpoint:
    if not directory.is_dir():
        raise ConfigError(
            f"model.path: {where} is not a directory, an object-store URI or a Hugging Face hub id (org/name); "
            "pass a checkpoint directory, s3://bucket/prefix/ or a hub id such as llava-hf/llava-1.5-7b-hf"
        )
    names = [p.name for p in directory.iterdir() if p.is_file()]
    if (directory / TWIG_DIR).is_dir():
        names += [f"{TWIG_DIR}/{p.name}" for p in (directory / TWIG_DIR).iterdir() if p.is_file()]
    return _Checkpoint(frozenset(names), lambda name: (directory / name).read_bytes())


def _open_object_store(uri: str, config: Config) -> _Checkpoint:
    from pipeline import storage

    options = storage.fsspec_options(uri, **config.storage.model_dump())
    storage.check_access(uri, options)  # its messages name the URI, the endpoint and what to fix
    fs, root = storage.open_fs(uri, options)
    root = root.rstrip("/")
    names = [os.path.relpath(p, root) for p in fs.find(root, maxdepth=2)]
    return _Checkpoint(_shallow(names), lambda name: fs.cat_file(f"{root}/{name}"))


def _hub_reader(source: ModelSource, key: str = "model.path") -> Callable[[str], bytes]:
    """Reads single files of a hub repo through the node's cache (offline: from the cached snapshot only).
    A file the repo lacks raises FileNotFoundError; anything else, :func:`hub_error`'s ConfigError."""
    if hub_offline():
        directory = fetch_hub_model(source, key=key)
        return lambda name: (directory / name).read_bytes()
    from huggingface_hub import errors, hf_hub_download

    def read(name: str) -> bytes:
        try:
            path = hf_hub_download(
                source.location, name, revision=source.revision, cache_dir=hub_cache_dir(), endpoint=hub_endpoint()
            )
        except errors.EntryNotFoundError:
            raise FileNotFoundError(name) from None
        except Exception as error:
            raise hub_error(source, error, key) from None
        return Path(path).read_bytes()

    return read


def _open_hub(source: ModelSource, written: str) -> _Checkpoint:
    """The repo's file list and a reader (config.json, twig.json); the weights are the actors' to download."""
    if hub_offline():  # only the cache may serve it: check the cached copy as a local directory
        directory = fetch_hub_model(source, hint=written)
        if not any(directory.glob("*.safetensors")):
            # Only metadata is cached (an earlier dry run reads config.json alone): not runnable offline.
            raise hub_error(source, FileNotFoundError(f"no weights cached in {directory}"), hint=written)
        return _open_local(directory, source.hub_name)
    from huggingface_hub import HfApi

    try:
        # One request for existence, revision and file list, and without the retries with backoff
        # (about 20 s) that list_repo_tree makes when the hub cannot be reached.
        info = HfApi(endpoint=hub_endpoint()).model_info(source.location, revision=source.revision)
    except Exception as error:
        raise hub_error(source, error, hint=written) from None
    names = [sibling.rfilename for sibling in info.siblings or ()]
    return _Checkpoint(_shallow(names), _hub_reader(source))


def _open(source: ModelSource, config: Config) -> _Checkpoint:
    if source.kind == HUB:
        return _open_hub(source, config.model.path)
    if source.kind == OBJECT_STORE:
        return _open_object_store(source.location, config)
    return _open_local(Path(source.location), source.location)


def _read_json(checkpoint: _Checkpoint, name: str, key: str, where: str) -> dict:
    text = checkpoint.read(name)  # outside the try: a failed read raises ConfigError, itself a ValueError
    try:
        data = json.loads(text)
    except ValueError as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ConfigError(f"{key}: {where}/{name} is not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{key}: {where}/{name} does not hold a JSON object")
    return data


# --- the checks -------------------------------------------------------------------------------------


def check_model(config: Config) -> ModelInfo:
    """Check ``model.path`` (and ``decode.twig``) on the driver; ConfigError with one line on a problem.

    Reads ``config.json`` and the file list of the local directory, the object-store prefix or the
    hub repo (never the weights) and checks: a registered family serves its ``model_type``;
    safetensors weights are present (pickle-only checkpoints are refused); the processor and
    tokenizer files are present; the twig, when one will be loaded, fits the base.

    When the config needs a twig (``decode.strategy=ssd``, ``pruning.method=ttp``) and names none,
    the model's ``twig/`` folder is the default: for local models the config validator already
    set it; for object-store and hub models this function sets ``config.decode.twig`` (to
    ``s3://.../twig`` or ``hf://org/name[@rev]/twig``). ``pipeline.run.preflight`` calls it
    before the config fingerprint is taken, so the fingerprint includes the twig either way.
    """
    path = config.model.path
    if not path:
        raise ConfigError("model.path is not set: put it in the YAML or pass model.path=...")
    source = parse_model_path(path)
    checkpoint = _open(source, config)
    root = {n for n in checkpoint.names if "/" not in n}
    if "config.json" not in root:
        raise ConfigError(f"model.path: {path} is not a checkpoint (no config.json there)")
    raw = _read_json(checkpoint, "config.json", "model.path", path)
    model_type = raw.get("model_type")
    supported = registry.family_names()
    if model_type not in supported:
        raise ConfigError(
            f"model.path: {path} has model_type {model_type!r}, which this job does not serve; "
            f"supported: {', '.join(supported)}"
        )
    _check_weights(source, path, root, raw)
    _check_processor(path, root)
    hf_config = _hf_config(model_type, raw, path)
    twig = config.decode.twig
    if not twig and config.to_engine_config().needs_twig:
        if f"{TWIG_DIR}/{TWIG_CONFIG}" not in checkpoint.names:
            raise ConfigError(missing_twig_message(config, path))
        twig = config.decode.twig = source.join(TWIG_DIR)
    if twig:
        _check_twig(twig, model_type, hf_config, raw, config)
    return ModelInfo(
        source=source,
        model_type=model_type,
        family=registry.family_spec(model_type).summary,
        local_dir=Path(source.location) if source.kind == LOCAL else None,
        twig=twig,
        visual_tokens_per_image=_visual_tokens(model_type, hf_config),
        visual_tokens_rule=_visual_tokens_rule(model_type, hf_config),
    )


def _check_weights(source: ModelSource, path: str, root: set[str], raw: dict) -> None:
    if any(n.endswith(".safetensors") for n in root):
        return
    pickles = sorted(n for n in root if n.endswith(PICKLE_SUFFIXES))
    if not pickles:
        raise ConfigError(f"model.path: {path} has no weights (no *.safetensors files)")
    architecture = (raw.get("architectures") or ["AutoModelForImageTextToText"])[0]
    folder = source.location
    fetch = ""  # a remote checkpoint is converted from a local copy
    if source.kind != LOCAL:
        folder = f"models/{source.location.rstrip('/').rsplit('/', 1)[-1]}"
        copy = "hf download" if source.kind == HUB else "aws s3 sync"
        fetch = f"`{copy} {source.location} {'--local-dir ' if source.kind == HUB else ''}{folder}`, then "
    raise ConfigError(
        f"model.path: {path} has only pickle weights ({', '.join(pickles[:3])}); only safetensors load "
        f"(unpickling can run code). Convert once on a machine you trust: {fetch}"
        f"`python -c \"import transformers as t; t.{architecture}.from_pretrained('{folder}')"
        f".save_pretrained('{folder}-safetensors'); t.AutoProcessor.from_pretrained('{folder}')"
        f".save_pretrained('{folder}-safetensors')\"` and pass model.path={folder}-safetensors"
    )


def _check_processor(path: str, root: set[str]) -> None:
    """What the families' ``load_processor`` reads: an image-processor config, a tokenizer and its config."""
    missing = []
    if not root.intersection(IMAGE_PROCESSOR_FILES):
        missing.append(" or ".join(IMAGE_PROCESSOR_FILES))
    if not root.intersection(TOKENIZER_FILES):
        missing.append(" or ".join(TOKENIZER_FILES))
    if "tokenizer_config.json" not in root:
        missing.append("tokenizer_config.json")
    if missing:
        raise ConfigError(
            f"model.path: {path} has no processor (missing {'; '.join(missing)}); save the processor of the "
            "model it was trained from beside the weights: "
            "AutoProcessor.from_pretrained(BASE).save_pretrained(MODEL_DIR)"
        )


def _hf_config(model_type: str, raw: dict, path: str):
    """config.json as its transformers configuration class, so defaults a file leaves out are filled
    (e.g. llava-hf's text_config omits Llama's hidden_size and num_hidden_layers). None for a family
    transformers does not know (a plug-in); callers then read the raw JSON."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        return None
    try:
        return CONFIG_MAPPING[model_type].from_dict(dict(raw))
    except Exception as error:
        raise ConfigError(f"model.path: {path}/config.json is not a valid {model_type} config ({error})") from None


def _fixed_grid_tokens(hf_config) -> int | None:
    """LLaVA-1.5 and Video-LLaVA images: the CLIP patch grid, plus [CLS] with the 'full' feature strategy."""
    vision = hf_config.vision_config
    side = vision.image_size // vision.patch_size
    return side * side + int(getattr(hf_config, "vision_feature_select_strategy", "default") == "full")


# Per family: visual tokens per image from its transformers config. LLaVA-NeXT is absent: anyres
# crops make the count depend on the image's size.
VISUAL_TOKENS: dict[str, Callable] = {"llava": _fixed_grid_tokens, "video_llava": _fixed_grid_tokens}


def _merged_rule(hf_config) -> str:
    vision = hf_config.vision_config
    side = vision.patch_size * vision.spatial_merge_size
    return (
        f"one per {side}x{side} px of the image as the processor resizes it (within its min/max pixels); "
        f"a video: the same per frame pair ({vision.temporal_patch_size} frames a temporal step); a budget "
        "applies per image and per temporal step"
    )


def _crops_rule(hf_config) -> str:
    vision = hf_config.vision_config
    side = vision.image_size // vision.patch_size
    return (
        f"{side}x{side} per crop, a base crop plus AnyRes crops by the image's size, and row newlines; a "
        "budget applies per crop and per video frame"
    )


# Per family whose count depends on the image: how (for --dry-run).
VISUAL_TOKEN_RULES: dict[str, Callable] = {
    "qwen2_5_vl": _merged_rule,
    "qwen3_vl": _merged_rule,
    "llava_next": _crops_rule,
    "llava_onevision": _crops_rule,
}


def _visual_tokens_rule(model_type: str, hf_config) -> str | None:
    rule = VISUAL_TOKEN_RULES.get(model_type)
    try:
        return rule(hf_config) if rule and hf_config is not None else None
    except AttributeError:  # a config without the fields: say nothing rather than fail the check
        return None


def _visual_tokens(model_type: str, hf_config) -> int | None:
    rule = VISUAL_TOKENS.get(model_type)
    return rule(hf_config) if rule and hf_config is not None else None


# --- twig -------------------------------------------------------------------------------------------


def missing_twig_message(config: Config, model_path: str | None) -> str:
    """The one line for a config that needs a twig and has none to use."""
    message = (
        f"decode.twig is required when decode.strategy is {config.decode.strategy!r} and pruning.method is "
        f"{config.pruning.method!r} (a trained twig directory or URI)"
    )
    if model_path:
        message += f"; {model_path} has no {TWIG_DIR}/ folder (train one with jobs/train_twig.py)"
    return message


def default_twig(config: Config) -> str | None:
    """``decode.twig`` for a config that needs a twig and names none, decided from the config alone.

    A local model's ``twig/`` folder (ValueError when it has none, or when model.path is unset);
    None for object-store and hub models, whose folder :func:`check_model` looks into at preflight.
    Called by the config validator, so a local default is in the fingerprint from the start, exactly
    as if ``decode.twig`` had been written.
    """
    path = config.model.path
    if not path:
        raise ValueError(missing_twig_message(config, None))
    try:
        source = parse_model_path(path)
    except ConfigError as error:
        raise ValueError(str(error)) from None
    if source.kind != LOCAL:
        return None
    twig = source.join(TWIG_DIR)
    if not os.path.isfile(os.path.join(twig, TWIG_CONFIG)):
        raise ValueError(missing_twig_message(config, path))
    return twig


def _read_twig_config(twig: str, config: Config) -> dict:
    """twig.json of a local, object-store or hub twig directory."""
    where = twig.rstrip("/")
    if where.startswith("hf://"):
        match = HUB_URI.fullmatch(where)
        if not match:
            raise ConfigError(f"decode.twig: {twig} is not a hub reference; write hf://org/name[@revision]/folder")
        read = _hub_reader(ModelSource(HUB, match["repo"], match["revision"]), "decode.twig")
        prefix = f"{match['subpath']}/" if match["subpath"] else ""
        checkpoint = _Checkpoint(frozenset(), lambda name: read(prefix + name))
    elif "://" in where and not where.startswith("file://"):
        from pipeline import storage

        fs, root = storage.open_fs(where, storage.fsspec_options(where, **config.storage.model_dump()))
        checkpoint = _Checkpoint(frozenset(), lambda name: fs.cat_file(f"{root.rstrip('/')}/{name}"))
    else:
        directory = Path(where.removeprefix("file://"))
        checkpoint = _Checkpoint(frozenset(), lambda name: (directory / name).read_bytes())
    try:
        return _read_json(checkpoint, TWIG_CONFIG, "decode.twig", where)
    except FileNotFoundError:
        raise ConfigError(
            f"decode.twig: {twig} is not a twig directory (no {TWIG_CONFIG}); train one with jobs/train_twig.py"
        ) from None


def _check_twig(twig: str, model_type: str, hf_config, raw: dict, config: Config) -> None:
    """The twig's recorded base geometry against the model's config (the weight fingerprint is checked when
    the actor loads both: that needs the weights)."""
    twig_config = _read_twig_config(twig, config)
    path = config.model.path
    if twig_config.get("format") != TWIG_FORMAT:
        raise ConfigError(
            f"decode.twig: {twig} has twig format {twig_config.get('format')!r}; this job reads {TWIG_FORMAT!r} "
            "(train one with jobs/train_twig.py)"
        )
    # The transformers config fills defaults config.json leaves out; a plug-in family's raw JSON has to do.
    text = hf_config.get_text_config().to_dict() if hf_config is not None else raw.get("text_config", raw)
    base = {"layers": text.get("num_hidden_layers"), "hidden": text.get("hidden_size"), "vocab": text.get("vocab_size")}
    expected = {
        "base_model_type": model_type,
        "base_layers": base["layers"],
        "hidden_size": base["hidden"],
        "vocab_size": base["vocab"],
    }
    for key, value in expected.items():
        if key in twig_config and twig_config[key] != value:
            raise ConfigError(
                f"decode.twig: {twig} does not fit model.path {path}: the twig was trained on a base with "
                f"{key}={twig_config[key]!r} but this model has {key}={value!r}; train a twig for this model "
                "(jobs/train_twig.py) or use the model it was trained on"
            )
