"""Job configuration: pydantic models loaded from YAML plus dotted ``key=value`` overrides.

Everything is validated before any cluster work. A bad key or value raises :class:`ConfigError`
with one message that names the key and, where there is a closed set, the allowed values.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from operators.settings import CPU_LINEAR_KERNELS, EngineConfig, SettingError
from pipeline.faults import RetryPolicy
from pipeline.schema import FINGERPRINT_SCHEMA

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
VIDEO_EXTENSIONS = ("mp4", "mov", "mkv", "webm", "avi", "m4v", "mpg", "mpeg", "ts", "flv", "3gp")


class ConfigError(ValueError):
    """A configuration problem, worded for the person who wrote the YAML."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class InputConfig(_Section):
    uri: str | None = None  # a prefix/directory, a manifest file, or an annotation file
    kind: Literal["auto", "prefix", "manifest", "annotations"] = "auto"
    # annotations: which VideoQA layout; "auto" guesses from the file name and fields
    layout: Literal["auto", "msvd_qa", "msrvtt_qa", "videochatgpt", "activitynet_qa", "tgif_qa"] = "auto"
    media_prefix: str | None = None  # annotations: where the media files are (default: the file's directory)
    answers_uri: str | None = None  # videochatgpt/activitynet_qa: test_a.json (default: beside test_q.json)
    # prefix listing: file extensions to take (null: every file, e.g. media without extensions)
    extensions: list[str] | None = Field(default_factory=lambda: [*IMAGE_EXTENSIONS, *VIDEO_EXTENSIONS])
    limit: int | None = Field(None, ge=1)  # first N work rows (after sorting), for trials


class OutputConfig(_Section):
    uri: str | None = None  # directory or object-store prefix receiving part-*.parquet
    rows_per_file: int = Field(256, ge=1, le=1_000_000)
    # Error kinds a rerun redoes besides the retryable ones (--retry-errors), e.g. [decode_timeout]; [all]: every error
    retry_errors: list[str] = Field(default_factory=list)
    # Exit with status 5 when more than this share of the config's items ended in error (--max-error-rate)
    max_error_rate: float | None = Field(None, ge=0, le=1)


class StorageConfig(_Section):
    """Object-store access; unset values fall back to the standard AWS environment and profiles."""

    endpoint_url: str | None = None
    region: str | None = None
    profile: str | None = None
    key: str | None = None
    secret: str | None = Field(None, repr=False)
    anon: bool = False
    # Transient storage errors (pipeline.faults) are retried: this many tries, with waits drawn from
    # [0, min(retry_max_wait_s, retry_base_s * 2**n)]; the defaults ride out a ~30 s outage.
    retry_attempts: int = Field(RetryPolicy.attempts, ge=1, le=100)
    retry_base_s: float = Field(RetryPolicy.base_s, ge=0, le=60, allow_inf_nan=False)
    retry_max_wait_s: float = Field(RetryPolicy.max_wait_s, ge=0, le=600, allow_inf_nan=False)


class ModelConfig(_Section):
    path: str | None = None  # local checkpoint directory or object-store URI
    name: str | None = None  # written to the `model` column (default: the path's last component)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    pad_to_square: bool = False  # LLaVA-1.5's original evaluation pads images to a square

    @property
    def display_name(self) -> str:
        return self.name or (self.path or "").rstrip("/").rsplit("/", 1)[-1]


class PromptConfig(_Section):
    caption: str = "Describe the image in detail."  # task=caption
    caption_video: str | None = None  # task=caption on videos (default: `caption`)
    question: str = "{question}"  # task=qa: template around the row's question


class PruningConfig(_Section):
    """Visual-token pruning. Names and rules come from the engine (``operators.registry``,
    ``operators.settings.EngineConfig``), checked when the whole config is validated."""

    method: str = "none"  # a registered method: none, vispruner, fastv, random, pool, ttp, ...
    budget: int | None = None  # per image / crop / frame, in budget_unit
    budget_unit: str = "kept"  # kept: R, the tokens the method keeps; layer_mean: R-bar, their mean over LLM layers
    important_ratio: float = 0.5  # VisPruner: share of the budget for important tokens
    fastv_layer: int = 2  # FastV's K
    seed: int = 0  # random baseline
    finalwipe_layer: int | None = None  # TTP's K_f (None: 3/4 of the depth)


class DecodeConfig(_Section):
    strategy: str = "greedy"  # greedy (one base step per token) or ssd (TwigVLM self-speculative)
    max_new_tokens: int = 64
    ignore_eos: bool = False  # generate exactly max_new_tokens per row (benchmarks with random weights)
    twig: str | None = None  # trained twig directory or URI (decode.strategy=ssd, pruning.method=ttp)
    max_draft: int = 5  # SSD: draft tokens per round (delta)
    draft_threshold: float = 0.6  # SSD: stop drafting below this probability (theta)
    # SSD, greedy: more twig candidates verified beside the draft at depth 1, 2, ... (a draft tree; [] a chain)
    draft_alternatives: list[int] = Field(default_factory=lambda: list(EngineConfig.draft_alternatives))
    temperature: float = 0.0  # 0: greedy; > 0: sampling (SSD: speculative sampling, same distribution)
    top_k: int | None = None  # sampling: only the k most likely tokens
    top_p: float = 1.0  # sampling: nucleus mass
    seed: int = 0  # sampling: each row's generator is seeded from this and its item id


class MediaOptions(_Section):
    """How media are read and decoded (CPU tasks, before the GPU actors; ``pipeline.media``).

    The one definition of these settings and their defaults: the job's ``media.*`` keys and the
    decoder itself (``pipeline.media.decode``, ``DecodeWorker``) both take this class. Frozen and
    hashable: one decode worker per distinct options.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_frames: int = Field(8, ge=1, le=1024)  # frames sampled per video (uniform: exactly this many; fps: at most)
    # "uniform": np.linspace(0, n - 1, num_frames).round() over the n decodable frames, first and last
    # included (the demo model was trained with exactly this). "fps": the frame on screen at t = 0, 1/fps,
    # 2/fps, ... seconds, at most num_frames of them.
    sampling: Literal["uniform", "fps"] = "uniform"
    fps: float | None = Field(None, gt=0, allow_inf_nan=False)  # required when sampling is "fps"
    max_duration_s: float | None = Field(None, gt=0, allow_inf_nan=False)  # sample only the first seconds
    max_bytes: int = Field(1 << 30, ge=1)  # larger input: too_large
    max_pixels: int = Field(64_000_000, ge=1)  # width * height of an image or frame, checked before decoding
    # Downscale (aspect kept, bicubic) so that max(height, width) <= max_side before frames travel to the
    # GPU actors; None: never.
    max_side: int | None = Field(1344, ge=16)
    timeout_s: float = Field(60.0, gt=0, allow_inf_nan=False)  # wall clock per item in the decode child
    # Address-space cap (RLIMIT_AS) of the decode child; None: no cap. The child maps ~300 MB (Python,
    # numpy, FFmpeg, Pillow) before it decodes anything, so smaller caps leave next to nothing.
    max_memory_mb: int | None = Field(8192, ge=512)
    # "pyav": decode every frame in order (frame counts from frames that really decode; decord as the
    # fallback). "decord": decord's seeking get_batch at the sampled indices, after PyAV's demux-only probe
    # (faster on long videos; refuses a file whose frame count the two disagree on).
    video_decoder: Literal["pyav", "decord"] = "pyav"

    @model_validator(mode="after")
    def _fps_needed(self) -> MediaOptions:
        if self.sampling == "fps" and self.fps is None:
            raise ValueError("media.fps is required when media.sampling is 'fps'")
        return self


class ComputeConfig(_Section):
    """Ray resources: CPU decode tasks and the inference actor pool."""

    decode_tasks: int | None = Field(None, ge=1)  # max concurrent decode tasks (None: Ray decides)
    decode_cpus: float = Field(1.0, gt=0)
    decode_batch_size: int = Field(16, ge=1)
    actors: int = Field(1, ge=1)  # inference actors (fixed pool: loading a model is slow)
    gpus_per_actor: float = Field(0.0, ge=0)
    cpus_per_actor: float = Field(1.0, gt=0)
    batch_size: int = Field(8, ge=1)  # rows handed to an actor per call (and per engine batch at most)
    # Engine batches sized by tokens: the actor sorts a call's rows by pruned prompt length and splits
    # them so rows x (longest prompt + decode.max_new_tokens) <= batch_tokens. None: one engine batch per call.
    batch_tokens: int | None = None
    max_tasks_in_flight_per_actor: int = Field(2, ge=1)  # >= 2 overlaps an actor's input transfer with compute
    torch_threads: int | None = Field(None, ge=1)  # CPU inference threads per actor (default: cpus_per_actor)
    # CPU actors: "onednn" runs linear layers through oneDNN with weights packed once (faster decoding;
    # the weights are held twice) for models with 64 MB of linear weights or more (smaller ones stay in
    # the caches, where PyTorch's own is faster); "aten": PyTorch's own. Not in the fingerprint: a
    # kernel choice, like batch composition, changes float rounding only.
    cpu_linear: Literal[CPU_LINEAR_KERNELS] = "onednn"


class RayConfig(_Section):
    address: str | None = None  # None: RAY_ADDRESS or a running local cluster, else start one in-process
    # Ray Data's progress bars, when stdout and stderr are a terminal; otherwise (or when false) the driver
    # prints its own one-line progress every progress_interval_s seconds instead (null: never).
    progress_bars: bool = True
    progress_interval_s: float | None = Field(10.0, gt=0)


class Config(_Section):
    task: Literal["caption", "qa"] = "caption"
    input: InputConfig = Field(default_factory=InputConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    prompt: PromptConfig = Field(default_factory=PromptConfig)
    pruning: PruningConfig = Field(default_factory=PruningConfig)
    decode: DecodeConfig = Field(default_factory=DecodeConfig)
    media: MediaOptions = Field(default_factory=MediaOptions)
    compute: ComputeConfig = Field(default_factory=ComputeConfig)
    ray: RayConfig = Field(default_factory=RayConfig)

    @model_validator(mode="after")
    def _engine_rules(self) -> Config:
        # The engine's own checks (operators.settings), so a bad method, budget or decoder setting
        # is found here, on the driver, before any cluster work.
        engine = self.to_engine_config()
        if engine.needs_twig and not self.decode.twig:
            # The model folder's twig/ is the default. A local one is set here, so the fingerprint is the one
            # naming it gives; object-store and hub models get theirs from pipeline.models.check_model (preflight).
            from pipeline.models import default_twig

            twig = default_twig(self)  # ValueError when a local model has no twig/ folder
            if twig:
                self.decode.twig = twig
        return self

    def to_engine_config(self) -> EngineConfig:
        """The engine's settings: the one translation from this config to ``operators``."""
        pruning, decode = self.pruning, self.decode
        try:
            return EngineConfig(
                pruning.method,
                budget=pruning.budget,
                budget_unit=pruning.budget_unit,
                important_ratio=pruning.important_ratio,
                fastv_layer=pruning.fastv_layer,
                seed=pruning.seed,
                finalwipe_layer=pruning.finalwipe_layer,
                pad_to_square=self.model.pad_to_square,
                decode_strategy=decode.strategy,
                max_new_tokens=decode.max_new_tokens,
                ignore_eos=decode.ignore_eos,
                max_draft=decode.max_draft,
                draft_threshold=decode.draft_threshold,
                draft_alternatives=tuple(decode.draft_alternatives),
                temperature=decode.temperature,
                top_k=decode.top_k,
                top_p=decode.top_p,
                sampling_seed=decode.seed,
                batch_tokens=self.compute.batch_tokens,
            )
        except SettingError as e:
            raise ValueError(str(e)) from None

    def require_paths(self) -> None:
        """The keys a run cannot do without (YAML may leave them to the command line)."""
        for key, value in (
            ("input.uri", self.input.uri),
            ("output.uri", self.output.uri),
            ("model.path", self.model.path),
        ):
            if not value:
                raise ConfigError(f"{key} is not set: put it in the YAML or pass {key}=... (or --input/--output)")

    def fingerprint(self) -> str:
        """Hash of everything that changes a row's output; rows are resumed by (item_id, fingerprint).

        Input, output, storage, resources and Ray settings are left out: they change where and how
        fast, not what. Batch composition is left out too: batched output equals per-row output.
        """
        sampling = self.decode.temperature > 0
        relevant = {
            "schema": FINGERPRINT_SCHEMA,  # not OUTPUT_SCHEMA_VERSION: added columns must not orphan output
            "task": self.task,
            "model": {"path": self.model.path, "dtype": self.model.dtype, "pad_to_square": self.model.pad_to_square},
            "prompt": self.prompt.model_dump(),
            "pruning": {k: v for k, v in self.pruning.model_dump().items() if NEUTRAL_PRUNING.get(k, object()) != v},
            "decode": {
                k: v
                for k, v in self.decode.model_dump().items()
                if (sampling or k not in SAMPLING_KEYS) and NEUTRAL_DECODE.get(k, object()) != v
            },
            "media": self.media.model_dump(exclude={"timeout_s", "max_memory_mb", "max_bytes", "video_decoder"}),
        }
        return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


# Keys added after schema v3 enter the fingerprint only when they change the output, so upgrading does
# not orphan earlier output: budget_unit when it is not "kept" (the meaning budgets had before), ignore_eos
# when it is set, draft_alternatives when there are some, the
# sampling keys only when sampling (at temperature 0 they change nothing).
NEUTRAL_PRUNING = {"budget_unit": "kept"}
NEUTRAL_DECODE = {"ignore_eos": False, "draft_alternatives": []}
SAMPLING_KEYS = ("temperature", "top_k", "top_p", "seed")


def parse_override(text: str) -> tuple[list[str], Any]:
    """``pruning.budget=64`` -> (["pruning", "budget"], 64); the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not of the form dotted.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {key}: cannot parse value {raw!r}: {e}") from None
    return key.strip().split("."), value


def apply_override(data: dict, path: list[str], value: Any) -> None:
    """Set ``data[path[0]][path[1]]... = value``, refusing keys the schema does not have."""
    model: type[BaseModel] = Config
    node = data
    for depth, part in enumerate(path):
        fields = model.model_fields
        if part not in fields:
            where = ".".join(path[:depth]) or "top level"
            raise ConfigError(f"unknown key {'.'.join(path)!r}: {where} has {', '.join(fields)}")
        annotation = fields[part].annotation
        if depth == len(path) - 1:
            node[part] = value
            return
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            raise ConfigError(f"unknown key {'.'.join(path)!r}: {'.'.join(path[: depth + 1])} is not a section")
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{'.'.join(path[: depth + 1])} must be a mapping")
        model = annotation


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Read YAML (optional), apply overrides in order, validate; raises ConfigError."""
    data: dict = {}
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
    from_command_line: dict[str, str] = {}
    for text in overrides:
        key, value = parse_override(text)
        apply_override(data, key, value)
        from_command_line[".".join(key)] = text
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(describe_validation_error(e, str(path) if path else None, from_command_line)) from None


def describe_validation_error(
    error: ValidationError, path: str | None = None, from_command_line: dict[str, str] | None = None
) -> str:
    """One line per problem, naming where the bad value came from:
    ``pruning.budget: Input should be a valid integer (got 'abc'; from the command line: pruning.budget=abc)``."""
    from_command_line = from_command_line or {}
    lines = []
    for problem in error.errors():
        key = ".".join(str(p) for p in problem["loc"]) or "top level"
        origin = _origin(key, path, from_command_line)
        message = problem["msg"].removeprefix("Value error, ")
        if problem["type"] == "extra_forbidden":
            parent = _section_for(problem["loc"][:-1])
            message = f"unknown key; {'.'.join(map(str, problem['loc'][:-1])) or 'top level'} has " + ", ".join(
                parent.model_fields
            )
        elif "input" in problem and problem["type"] != "value_error":
            message += f" (got {problem['input']!r}; {origin})"
        elif not problem["loc"]:  # the engine's rules (Config._engine_rules): the message starts with its key
            named = message.split(":", 1)[0] if ":" in message else ""
            if named and " " not in named:
                message += f" ({_origin(named, path, from_command_line)})"
            lines.append(message)
            continue
        else:
            message += f" ({origin})"
        lines.append(f"{key}: {message}")
    return "invalid config:\n  " + "\n  ".join(lines)


def _origin(key: str, path: str | None, from_command_line: dict[str, str]) -> str:
    """Where a key's value came from: the command line override that set it (or a section above
    it), else the YAML file, else the default."""
    parts = key.split(".")
    for depth in range(len(parts), 0, -1):
        text = from_command_line.get(".".join(parts[:depth]))
        if text is not None:
            return f"from the command line: {text}"
    return f"from {path}" if path else "the default"


def _section_for(loc: tuple) -> type[BaseModel]:
    model: type[BaseModel] = Config
    for part in loc:
        annotation = model.model_fields[str(part)].annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
    return model
