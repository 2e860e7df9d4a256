"""Decoding untrusted image and video bytes (the code lives in pipeline/media/worker.py until the split)."""

from pipeline.media.worker import (
    ERROR_KINDS,
    Decoded,
    DecodeWorker,
    MediaError,
    MediaOptions,
    _decode_video,
    _gif_scan,
    _sniff,
    decode,
    sniff,
)

__all__ = ["ERROR_KINDS", "Decoded", "DecodeWorker", "MediaError", "MediaOptions", "decode", "sniff"]
__all__ += ["_decode_video", "_gif_scan", "_sniff"]  # used by tests/test_media.py
