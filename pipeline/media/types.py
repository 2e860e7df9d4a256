"""What pipeline.media takes and gives: ``MediaOptions``, ``Decoded``, and ``MediaError`` with its ``ERROR_KINDS``."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

ERROR_KINDS = (
    "empty",
    "too_large",
    "unsupported_format",
    "corrupt",
    "truncated",
    "no_video_stream",
    "no_frames",
    "decode_timeout",
    "decode_crashed",
)
SAMPLINGS = ("uniform", "fps")


class MediaError(Exception):
    """Bad input: ``kind`` is one of ``ERROR_KINDS``, ``message`` is for a person (``str(e) == message``)."""

    def __init__(self, kind: str, message: str) -> None:
        if kind not in ERROR_KINDS:
            raise ValueError(f"MediaError kind {kind!r} is not one of {ERROR_KINDS}")
        super().__init__(kind, message)  # both in args, so the error pickles across processes
        self.kind, self.message = kind, message

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class MediaOptions:
    """How to decode. Frozen (and hashable): one DecodeWorker per distinct options."""

    num_frames: int = 8  # frames sampled per video (uniform: exactly this many; fps: at most)
    # "uniform": np.linspace(0, n - 1, num_frames).round() over the n decodable frames, first and last
    # included (the demo model was trained with exactly this). "fps": the frame on screen at t = 0, 1/fps,
    # 2/fps, ... seconds, at most num_frames of them.
    sampling: str = "uniform"
    fps: float | None = None  # required when sampling == "fps"
    max_duration_s: float | None = None  # only the first max_duration_s seconds of a video are sampled
    max_bytes: int = 1 << 30  # larger input: too_large
    max_pixels: int = 64_000_000  # width * height of an image or video frame, checked before decoding
    max_side: int | None = None  # if set, downscale (aspect kept, bicubic) so that max(height, width) <= max_side
    timeout_s: float = 60.0  # wall clock per item in the DecodeWorker's child process
    max_memory_mb: int | None = 8192  # address-space cap (RLIMIT_AS) of the child process; None: no cap
    # "pyav": decode every frame in order (frame counts from frames that really decode; decord as the
    # fallback). "decord": decord's seeking get_batch at the sampled indices, after PyAV's demux-only probe
    # (faster on long videos; refuses a file whose frame count the two disagree on).
    video_decoder: str = "pyav"

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, allowed: str) -> None:
            if not ok:
                raise ValueError(f"MediaOptions.{name} = {getattr(self, name)!r} is invalid: {allowed}")

        def is_int(value) -> bool:
            return isinstance(value, int | np.integer) and not isinstance(value, bool)

        def is_positive(value) -> bool:
            return isinstance(value, int | float | np.number) and not isinstance(value, bool) and 0 < value < math.inf

        need(is_int(self.num_frames) and self.num_frames >= 1, "num_frames", "an integer >= 1")
        need(self.sampling in SAMPLINGS, "sampling", f"one of {', '.join(map(repr, SAMPLINGS))}")
        need(self.fps is None or is_positive(self.fps), "fps", "None or a number of frames per second > 0")
        need(self.sampling != "fps" or self.fps is not None, "fps", "required (> 0) when sampling is 'fps'")
        need(self.max_duration_s is None or is_positive(self.max_duration_s), "max_duration_s", "None or > 0")
        need(is_int(self.max_bytes) and self.max_bytes >= 1, "max_bytes", "an integer >= 1")
        need(is_int(self.max_pixels) and self.max_pixels >= 1, "max_pixels", "an integer >= 1")
        need(self.max_side is None or (is_int(self.max_side) and self.max_side >= 1), "max_side", "None or >= 1")
        need(is_positive(self.timeout_s), "timeout_s", "a number of seconds > 0")
        need(self.video_decoder in ("pyav", "decord"), "video_decoder", "'pyav' or 'decord'")
        # The child maps ~300 MB of address space (Python, numpy, FFmpeg, Pillow) before it decodes anything,
        # so caps under ~512 MB leave next to nothing for decoding (256 is pipeline.config's lower bound).
        need(
            self.max_memory_mb is None or (is_int(self.max_memory_mb) and self.max_memory_mb >= 256),
            "max_memory_mb",
            "None (no cap) or an integer >= 256",
        )


@dataclass
class Decoded:
    """Frames of one image or video.

    ``info``: ``width``/``height`` of the source (after EXIF orientation, before ``max_side``), ``format``
    (e.g. "png", "h264/mp4", "gif"); for videos also ``source_frames`` (decodable frames that sampling ran
    over, i.e. within ``max_duration_s``), ``fps``, ``duration_s`` (of the whole stream, from its
    timestamps), ``frame_indices`` and ``frame_times_s`` of the sampled frames.
    """

    kind: str  # "image" or "video"
    frames: np.ndarray  # uint8 [T, H, W, 3] RGB; T == 1 for an image
    info: dict
