"""What pipeline.media takes and gives: ``MediaOptions``, ``Decoded``, and ``MediaError`` with its ``ERROR_KINDS``."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.config import MediaOptions  # noqa: F401  (the one definition of the media settings, re-exported)

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


class MediaError(Exception):
    """Bad input: ``kind`` is one of ``ERROR_KINDS``, ``message`` is for a person (``str(e) == message``)."""

    def __init__(self, kind: str, message: str) -> None:
        if kind not in ERROR_KINDS:
            raise ValueError(f"MediaError kind {kind!r} is not one of {ERROR_KINDS}")
        super().__init__(kind, message)  # both in args, so the error pickles across processes
        self.kind, self.message = kind, message

    def __str__(self) -> str:
        return self.message


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
