"""``decode()`` in this process: size check, sniffing, then the image, GIF or video decoder.

Any failure caused by the input leaves here as a ``MediaError``.
"""

from __future__ import annotations

import os

from pipeline.media.images import IMAGE_FORMATS, _decode_gif, _decode_image
from pipeline.media.sniffing import _IMAGE_LABELS, _VIDEO_CONTAINERS, _sniff, _Sniffed
from pipeline.media.types import Decoded, MediaError, MediaOptions
from pipeline.media.videos import _decode_video


def decode(data: bytes, name: str, options: MediaOptions = MediaOptions()) -> Decoded:  # noqa: B008 (frozen)
    """Decode one image or video in this process; raises ``MediaError`` for anything wrong with the input.

    ``name`` is only a hint, used in messages: the bytes decide what the file is. Not protected against
    decoder hangs or crashes: use ``DecodeWorker`` for untrusted input. (In this process, truncated images
    are refused only while Pillow's global ``ImageFile.LOAD_TRUNCATED_IMAGES`` is False, its default; the
    DecodeWorker's child makes sure it is.)
    """
    _check_size(data, options)
    sniffed = _sniff(data)
    try:
        if sniffed.kind == "image":
            return _decode_image(data, sniffed, options)
        if sniffed.kind == "video" and sniffed.fmt == "gif":
            return _decode_gif(data, options)
        if sniffed.kind == "video":
            return _decode_video(data, sniffed, options, options.video_decoder)
    except MediaError:
        raise
    except MemoryError as e:
        raise MediaError("too_large", _memory_message(options)) from e
    except Exception as e:  # a failure not mapped above: still this item's error, with its type named
        label = _IMAGE_LABELS.get(sniffed.fmt) or _VIDEO_CONTAINERS.get(sniffed.fmt, ("",))[0] or "file"
        raise MediaError("corrupt", f"{label} could not be decoded: {type(e).__name__}: {e}") from e
    raise MediaError("unsupported_format", _unsupported_message(sniffed, name))


def _check_size(data: bytes, options: MediaOptions) -> None:
    if len(data) == 0:
        raise MediaError("empty", "file is empty (0 bytes)")
    if len(data) > options.max_bytes:
        raise MediaError(
            "too_large", f"file is {_bytes(len(data))}, over the {_bytes(options.max_bytes)} limit (max_bytes)"
        )


def _unsupported_message(sniffed: _Sniffed, name: str) -> str:
    if sniffed.known_media:
        return (
            f"{sniffed.what}: this format is not supported (images: {', '.join(IMAGE_FORMATS)}; videos: "
            "MP4, MOV, MKV, WebM, AVI, MPEG-TS/PS, FLV, WMV, Ogg)"
        )
    ext = os.path.splitext(name)[1].lower()
    hint = f", although the name ends in {ext}" if ext else ""
    return f"not an image or video (looks like {sniffed.what}{hint})"


def _memory_message(options: MediaOptions) -> str:
    if options.max_memory_mb is None:
        return "decoding ran out of memory"
    return f"decoding needs more memory than the decoder process may use ({options.max_memory_mb} MB, max_memory_mb)"


def _bytes(n: int) -> str:
    if n < 1024:
        return f"{n} bytes"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
    raise AssertionError
