"""Decode untrusted image and video bytes into uint8 RGB frames without ever crashing or hanging the caller.

Two layers:

* ``decode(data, name, options)`` runs in the calling process. Every failure caused by the input becomes a
  ``MediaError`` whose ``kind`` (one of ``ERROR_KINDS``) is machine-readable and whose message is meant for
  the person reading the output row.
* ``DecodeWorker`` runs ``decode`` in a child process that it kills on a wall-clock timeout and restarts after
  a crash. FFmpeg (PyAV) and decord can hang holding the GIL or abort/segfault on bad media (decord #25,
  #269, #373; PyAV #2344): no ``try`` in the caller survives that, a separate process does.

What the decoders do:

* The content decides, the file name does not: magic bytes say image, video or neither (``sniff``). A PNG
  named ``x.mp4`` is an image, an MP4 named ``x.jpg`` a video, an HTML error page named ``x.mp4`` is
  ``unsupported_format`` with a message saying it looks like HTML. An animated GIF is a video.
* Images: Pillow, with an explicit allow-list of formats, the pixel count checked from the header before
  any pixel is decoded, truncated files refused (``ImageFile.LOAD_TRUNCATED_IMAGES`` stays False), EXIF
  orientation applied, every mode normalised to RGB (alpha composited on white).
* Videos: PyAV, decoding sequentially. A first pass only demuxes (cheap: no decoding) to learn the frame
  timeline; the frame indices are chosen from it; a second pass decodes the clip, keeps the chosen frames
  and counts the frames that really decode. If that count or timeline differs from the demuxed one (an
  undecodable packet), the indices are chosen again over the decodable frames and the clip decoded again.
  So sampling is always over decodable frames, never over the container's ``nb_frames``.

Why PyAV first and decord only as a fallback: on the H.264 MP4s of our corpus (written by PyAV) both are
frame-exact (tests/test_media.py checks it), but sequential PyAV decoding is what lets us count decodable
frames, it never seeks (decord's index-driven ``get_batch`` hangs when indices pass the decodable frames,
#373, and silently substitutes frames, #119), we can refuse a stream without a codec context before
decoding (#2344), and the container format is pinned from the magic bytes instead of probed. decord is
tried only when PyAV fails in a way that is not a data error (an exception from PyAV itself, e.g. #692),
and only when its frame count agrees with the demuxed one. The price of sequential decoding: a long video
is decoded in full (up to ``max_duration_s``), where a seeking decoder would touch only the keyframes'
groups around the sampled frames.
"""

from __future__ import annotations

import bisect
import io
import math
import multiprocessing
import multiprocessing.connection
import os
import re
import signal
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import av
import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

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
IMAGE_FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF")  # Pillow's format names: the allow-list
SAMPLINGS = ("uniform", "fps")

# Undecodable packets tolerated in a video before it counts as corrupt: H.264 conceals a damaged slice and
# carries on, so one bad packet in a long video should cost that frame, not the whole item.
_MAX_BAD_PACKET_FRACTION = 0.1
# A GIF frame delay of 0 or 10 ms means "as fast as possible"; browsers show such frames for 100 ms.
_GIF_MIN_DELAY_MS, _GIF_DEFAULT_DELAY_MS = 20, 100
_START_TIMEOUT_S = 60.0  # a decoder process that has not said "ready" by then is broken
_EXIT_OUT_OF_MEMORY = 75  # the child's exit status when even receiving a request ran out of memory


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


# ---------------------------------------------------------------------------------------------------------
# Sniffing: what the bytes are, whatever the name says


@dataclass(frozen=True)
class _Sniffed:
    kind: str | None  # "image", "video" or None (not something we decode)
    fmt: str  # short format name: "png", "jpeg", ..., "mp4", "mkv", ...; "" when unknown
    what: str  # what it looks like, for messages: "a PNG image", "UTF-8 text", ...
    known_media: bool = False  # an image/audio/video format we recognise but do not decode


_IMAGE_MAGIC = [
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"\xff\xd8\xff", "jpeg"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
]
# Recognised so the message can name them; none of them is decoded.
_OTHER_MAGIC = [
    (b"%PDF-", "a PDF document", False),
    (b"PK\x03\x04", "a ZIP archive", False),
    (b"\x1f\x8b", "gzip-compressed data", False),
    (b"7z\xbc\xaf\x27\x1c", "a 7-Zip archive", False),
    (b"Rar!\x1a\x07", "a RAR archive", False),
    (b"\x7fELF", "an executable (ELF)", False),
    (b"ID3", "MP3 audio", True),
    (b"fLaC", "FLAC audio", True),
    (b"8BPS", "a Photoshop (PSD) image", True),
    (b"\x00\x00\x01\x00", "an ICO icon", True),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "a JPEG 2000 image", True),
    (b"\xff\x4f\xff\x51", "a JPEG 2000 codestream", True),
]
_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1", b"avif", b"avis"}
_MOV_TOP_BOXES = {b"moov", b"mdat", b"wide", b"free", b"skip", b"pnot"}
_ASF_GUID = bytes.fromhex("3026b2758e66cf11a6d900aa0062ce6c")
_BMP_HEADER_SIZES = {12, 16, 40, 52, 56, 64, 108, 124}

# Container -> (label for messages, PyAV/FFmpeg demuxer). The demuxer is pinned, never probed: probing
# arbitrary bytes can pick demuxers that follow references (HLS, concat) or misread garbage.
_VIDEO_CONTAINERS = {
    "mp4": ("MP4", "mov"),
    "mov": ("QuickTime (MOV)", "mov"),
    "m4a": ("M4A/MP4", "mov"),
    "3gp": ("3GP", "mov"),
    "mkv": ("Matroska (MKV)", "matroska"),
    "webm": ("WebM", "matroska"),
    "avi": ("AVI", "avi"),
    "ts": ("MPEG-TS", "mpegts"),
    "mpg": ("MPEG-PS", "mpeg"),
    "flv": ("FLV", "flv"),
    "asf": ("ASF/WMV", "asf"),
    "ogg": ("Ogg", "ogg"),
}
_IMAGE_LABELS = {"png": "PNG", "jpeg": "JPEG", "gif": "GIF", "webp": "WEBP", "bmp": "BMP", "tiff": "TIFF"}


def _sniff(data: bytes) -> _Sniffed:
    head = data[:64]
    for magic, fmt in _IMAGE_MAGIC:
        if head.startswith(magic):
            if fmt == "gif" and _gif_scan(data)[0] > 1:
                return _Sniffed("video", "gif", "an animated GIF")
            return _Sniffed("image", fmt, f"a {_IMAGE_LABELS[fmt]} image")
    if head[:4] == b"RIFF" and len(head) >= 12:
        riff = {b"WEBP": ("image", "webp", "a WEBP image"), b"AVI ": ("video", "avi", "an AVI video")}
        if head[8:12] in riff:
            return _Sniffed(*riff[head[8:12]])
        if head[8:12] == b"WAVE":
            return _Sniffed(None, "", "WAV audio", known_media=True)
    if head[:2] == b"BM" and len(head) >= 18 and struct.unpack("<I", head[14:18])[0] in _BMP_HEADER_SIZES:
        return _Sniffed("image", "bmp", "a BMP image")
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in _HEIF_BRANDS:
            return _Sniffed(None, "", f"a HEIF/AVIF image (brand {brand.decode('latin-1').strip()!r})", True)
        fmt = {b"qt  ": "mov", b"M4A ": "m4a", b"M4B ": "m4a", b"3gp4": "3gp", b"3gp5": "3gp", b"3g2a": "3gp"}
        return _Sniffed("video", fmt.get(brand, "mp4"), "an MP4/QuickTime file")
    if head[4:8] in _MOV_TOP_BOXES:
        return _Sniffed("video", "mov", "a QuickTime file")
    if head[:4] == b"\x1a\x45\xdf\xa3":
        fmt = "webm" if b"webm" in data[:64] else "mkv"
        return _Sniffed("video", fmt, f"a {_VIDEO_CONTAINERS[fmt][0]} file")
    if _is_mpegts(data):
        return _Sniffed("video", "ts", "an MPEG transport stream")
    if head[:4] == b"\x00\x00\x01\xba":
        return _Sniffed("video", "mpg", "an MPEG program stream")
    if head[:4] == b"FLV\x01":
        return _Sniffed("video", "flv", "an FLV file")
    if head[:16] == _ASF_GUID:
        return _Sniffed("video", "asf", "an ASF/WMV file")
    if head[:4] == b"OggS":  # Theora video or, more often, Vorbis/Opus audio: the probe tells
        return _Sniffed("video", "ogg", "an Ogg file")
    for magic, what, known in _OTHER_MAGIC:
        if head.startswith(magic):
            return _Sniffed(None, "", what, known)
    if len(head) >= 2 and head[0] == 0xFF and head[1] in (0xFB, 0xF3, 0xF2):
        return _Sniffed(None, "", "MP3 audio", True)
    return _Sniffed(None, "", _describe_unknown(data))


def _gif_scan(data: bytes) -> tuple[int, str]:
    """(frames, "complete" / "truncated" / "damaged") from walking the GIF's blocks, without decoding."""
    size = len(data)
    if size < 13:
        return 0, "truncated"
    position, frames = 13, 0
    if data[10] & 0x80:  # global colour table
        position += 3 << ((data[10] & 7) + 1)
    while position < size:
        block = data[position]
        if block == 0x3B:  # trailer
            return frames, "complete"
        if block == 0x21:  # extension: introducer, label, sub-blocks
            position += 2
        elif block == 0x2C:  # image: descriptor, local colour table, LZW code size, sub-blocks
            if position + 10 > size:
                break
            flags = data[position + 9]
            position += 11 + ((3 << ((flags & 7) + 1)) if flags & 0x80 else 0)
            frames += 1
        else:
            return frames, "damaged"
        while position < size and data[position]:  # data sub-blocks, up to the 0-length terminator
            position += data[position] + 1
        position += 1
    return frames, "truncated"


def _is_mpegts(data: bytes) -> bool:
    for start, step in ((0, 188), (4, 192)):  # plain TS, and M2TS with its 4-byte timestamps
        syncs = range(start, min(len(data), start + 3 * step), step)
        if len(syncs) >= 2 and all(data[i] == 0x47 for i in syncs):
            return True
    return False


def _describe_unknown(data: bytes) -> str:
    head = data[:4096]
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as e:  # a character cut at the 4 KiB boundary is still text
        text = head[: e.start].decode("utf-8") if e.start >= len(head) - 3 and len(data) > len(head) else None
    if text:
        printable = sum(c.isprintable() or c in "\t\r\n\f" for c in text)
        if printable >= 0.95 * len(text):
            low = text.lstrip("\ufeff \t\r\n").lower()
            if low.startswith(("<!doctype html", "<html")) or "<html" in low[:1024]:
                return "an HTML page"
            if "<svg" in low[:1024]:
                return "an SVG image (vector graphics are not decoded)"
            if low.startswith("<?xml"):
                return "XML text"
            if low.startswith(("{", "[")):
                return "JSON text"
            return "UTF-8 text"
    return f"unrecognised binary data starting with {data[:8].hex(' ')}"


def sniff(data: bytes) -> str | None:
    """What the bytes are, from their magic numbers alone: "image", "video" (an animated GIF is one) or None."""
    return _sniff(data).kind


# ---------------------------------------------------------------------------------------------------------
# decode()


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


def _check_pixels(width: int, height: int, options: MediaOptions, what: str) -> None:
    if width * height > options.max_pixels:
        raise MediaError(
            "too_large",
            f"{what} is {width}x{height} = {_pixels(width * height)}, "
            f"over the {_pixels(options.max_pixels, 'pixel')} limit (max_pixels)",
        )
    if width <= 0 or height <= 0:
        raise MediaError("corrupt", f"{what} has an invalid size {width}x{height}")


def _pixels(count: int, unit: str = "pixels") -> str:
    return f"{count / 1e6:.1f} MP" if count >= 100_000 else f"{count:,} {unit}"


def _fit(image: Image.Image, max_side: int | None) -> Image.Image:
    """Downscale (never up) so the longer side is at most max_side, keeping the aspect ratio."""
    if max_side is None or max(image.size) <= max_side:
        return image
    scale = max_side / max(image.size)
    size = (max(1, min(max_side, round(image.width * scale))), max(1, min(max_side, round(image.height * scale))))
    return image.resize(size, Image.Resampling.BICUBIC)


# ---------------------------------------------------------------------------------------------------------
# Images (Pillow)


def _open_image(data: bytes, formats: list[str], label: str, options: MediaOptions) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data), formats=formats)
    except Image.DecompressionBombError as e:  # Pillow's own limit (2 x MAX_IMAGE_PIXELS), hit before ours
        size = _header_size(data, formats)
        if size is not None:
            _check_pixels(*size, options, f"{label} image")
        pixels = re.search(r"\((\d+) pixels\)", str(e))
        count = f"{int(pixels.group(1)) / 1e6:.1f} MP" if pixels else "too many pixels"
        raise MediaError("too_large", f"{label} image is {count}, over Pillow's decompression-bomb limit") from e
    except UnidentifiedImageError as e:  # the magic bytes matched but the header does not parse
        raise MediaError("corrupt", f"{label} image header is damaged: Pillow cannot parse it") from e
    except Exception as e:
        raise _pillow_error(e, label) from e
    _check_pixels(image.width, image.height, options, f"{label} image")
    return image


def _header_size(data: bytes, formats: list[str]) -> tuple[int, int] | None:
    """(width, height) from the header alone, skipping Image.open's bomb check (only to word the message)."""
    for fmt in formats:
        factory, accept = Image.OPEN.get(fmt, (None, None))
        try:
            if factory is not None and (accept is None or accept(data[:16])):
                return factory(io.BytesIO(data), None).size
        except Exception:
            continue
    return None


def _pillow_error(error: Exception, label: str) -> MediaError:
    text = str(error) or type(error).__name__
    if isinstance(error, EOFError) or "truncated" in text.lower():
        return MediaError("truncated", f"{label} image is truncated: the file ends before the image data does ({text})")
    return MediaError("corrupt", f"{label} image data is corrupt and cannot be decoded ({text})")


def _decode_image(data: bytes, sniffed: _Sniffed, options: MediaOptions) -> Decoded:
    label = _IMAGE_LABELS[sniffed.fmt]
    if sniffed.fmt == "gif":
        _check_gif_complete(data)
    image = _open_image(data, list(IMAGE_FORMATS), label, options)
    mode = image.mode
    try:
        image.load()  # the pixel count was checked from the header first: no decompression bomb gets here
    except MemoryError:
        raise
    except Exception as e:
        raise _pillow_error(e, label) from e
    orientation = None
    try:
        orientation = image.getexif().get(0x0112)
        image = ImageOps.exif_transpose(image)
    except Exception:  # a damaged EXIF block should not cost the picture: keep it as stored
        orientation = None
    rgb = _to_rgb(image)
    info = {"width": rgb.width, "height": rgb.height, "format": sniffed.fmt, "mode": mode}
    if orientation not in (None, 1):
        info["exif_orientation"] = orientation
    return Decoded("image", np.asarray(_fit(rgb, options.max_side), dtype=np.uint8)[None], info)


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB. Transparency is composited on white; high bit depths are scaled to 8 bits."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif mode in ("PA", "LA", "La", "RGBa"):
        image = image.convert("RGBA")
    elif mode in ("L", "RGB") and "transparency" in image.info:  # a tRNS colour key
        image = image.convert("RGBA")
    elif mode.startswith("I") or mode == "F":
        image = Image.fromarray(_grey_to_uint8(np.asarray(image), mode), "L")
    if image.mode == "RGBA":
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image).convert("RGB")
    return image.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV, RGBX


def _grey_to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """16/32-bit integer or float grey -> 8 bits: 16-bit data by /257, floats in [0, 1] by x255, else clipped."""
    values = values.astype(np.float64)
    if mode == "F":
        if values.size and 0.0 <= values.min() and values.max() <= 1.0:
            values = values * 255.0
    elif mode.startswith("I;16") or (values.size and values.max() > 255):
        values = values / 257.0
    return np.clip(np.round(values), 0, 255).astype(np.uint8)


def _check_gif_complete(data: bytes) -> None:
    # Pillow stops quietly at a cut between two frames and shows the frames before it: look for the trailer.
    frames, state = _gif_scan(data)
    if state == "truncated":
        raise MediaError(
            "truncated", f"GIF is truncated: the file ends before the GIF trailer ({frames} frames started)"
        )


def _decode_gif(data: bytes, options: MediaOptions) -> Decoded:
    """An animated GIF as a video: frame times from the frame delays."""
    _check_gif_complete(data)
    image = _open_image(data, ["GIF"], "GIF", options)
    delays = []
    try:
        for index in range(image.n_frames):
            image.seek(index)
            delay = image.info.get("duration") or 0
            delays.append(delay if delay >= _GIF_MIN_DELAY_MS else _GIF_DEFAULT_DELAY_MS)
    except MemoryError:
        raise
    except Exception as e:
        raise _pillow_error(e, "GIF") from e
    times = [float(t) / 1000.0 for t in np.cumsum([0, *delays[:-1]])]
    clip = _clip(times, options)
    indices = _sample(clip, options)
    frames = {}
    try:
        for index in sorted(set(indices)):  # ascending: GIF frames build on the previous ones
            image.seek(index)
            frames[index] = np.asarray(_fit(_to_rgb(image.convert("RGBA")), options.max_side), dtype=np.uint8)
    except MemoryError:
        raise
    except Exception as e:
        raise _pillow_error(e, "GIF") from e
    duration = sum(delays) / 1000.0
    info = {
        "width": image.width,
        "height": image.height,
        "format": "gif",
        "source_frames": len(clip),
        "fps": len(delays) / duration,
        "duration_s": duration,
        "frame_indices": indices,
        "frame_times_s": [clip[i] for i in indices],
    }
    return Decoded("video", np.stack([frames[i] for i in indices]), info)


# ---------------------------------------------------------------------------------------------------------
# Frame sampling


def _clip(times: list[float], options: MediaOptions) -> list[float]:
    """The frame times (seconds from the first frame, ascending) within max_duration_s."""
    if options.max_duration_s is None:
        return times
    return times[: bisect.bisect_left(times, options.max_duration_s - 1e-9)]


def _sample(times: list[float], options: MediaOptions) -> list[int]:
    """Indices into ``times`` (the clip's frames, in presentation order) of the frames to keep."""
    n = len(times)
    if options.sampling == "uniform":
        # Exactly the demo model's training formula: num_frames indices, duplicates when n < num_frames.
        return np.linspace(0, n - 1, options.num_frames).round().astype(int).tolist()
    indices = []
    for k in range(options.num_frames):
        t = k / options.fps
        if t > times[-1] + 1e-6:
            break
        indices.append(bisect.bisect_right(times, t + 1e-6) - 1)  # the frame on screen at t
    return indices


# ---------------------------------------------------------------------------------------------------------
# Videos (PyAV; decord as a fallback)


@dataclass
class _Probe:
    label: str  # "MP4", ...
    codec: str
    width: int
    height: int
    times: list[float]  # every packet's presentation time, seconds from the first, ascending
    fps: float
    duration_s: float


def _decode_video(data: bytes, sniffed: _Sniffed, options: MediaOptions, backend: str = "pyav") -> Decoded:
    label, demuxer = _VIDEO_CONTAINERS[sniffed.fmt]
    truncation = _truncation(data, sniffed.fmt)
    if truncation:
        raise MediaError("truncated", f"{label} file is truncated: {truncation}")
    probe = _probe_video(data, label, demuxer, options)
    predicted = _clip(probe.times, options)
    if not predicted:
        raise MediaError("no_frames", f"{label} video stream has no frames")
    if backend == "decord":
        times, frames, indices = _decord_frames(data, predicted, options)
    else:
        try:
            times, frames, indices = _pyav_frames(data, demuxer, probe, predicted, options)
        except (MediaError, MemoryError):
            raise
        except Exception as pyav_error:  # PyAV itself failed (not the data): decord reads the same FFmpeg data
            try:
                times, frames, indices = _decord_frames(data, predicted, options)
            except MemoryError:
                raise
            except Exception as decord_error:
                if isinstance(decord_error, MediaError) and decord_error.kind != "corrupt":
                    raise  # e.g. too_large: a verdict on the file, not a decoder failure
                raise MediaError(
                    "corrupt",
                    f"{label} video could not be decoded: PyAV failed ({type(pyav_error).__name__}: {pyav_error})"
                    f" and so did decord ({type(decord_error).__name__}: {decord_error})",
                ) from decord_error
    first = frames[indices[0]]
    stacked = np.stack([_same_size(frames[i], first.shape) for i in indices])
    info = {
        "width": probe.width or first.shape[1],
        "height": probe.height or first.shape[0],
        "format": f"{probe.codec}/{sniffed.fmt}",
        "source_frames": len(times),
        "fps": probe.fps,
        "duration_s": probe.duration_s,
        "frame_indices": indices,
        "frame_times_s": [round(times[i], 6) for i in indices],
    }
    return Decoded("video", stacked, info)


def _open_container(data: bytes, label: str, demuxer: str):
    try:
        return av.open(io.BytesIO(data), mode="r", format=demuxer, metadata_errors="replace")
    except av.error.FFmpegError as e:
        raise MediaError("corrupt", f"{label} container could not be opened: {_av_text(e)}") from e


def _av_text(error: Exception) -> str:
    return getattr(error, "strerror", None) or str(error) or type(error).__name__


def _video_stream(container, label: str):
    streams = list(container.streams)
    video = [s for s in streams if s.type == "video" and av.stream.Disposition.attached_pic not in s.disposition]
    if video:
        return video[0]
    if any(s.type == "audio" for s in streams):
        why = "audio only"
    elif any(s.type == "video" for s in streams):
        why = "only an attached cover picture"
    else:
        why = f"streams: {', '.join(sorted({s.type for s in streams}))}" if streams else "no streams at all"
    raise MediaError("no_video_stream", f"{label} container has no video stream ({why})")


def _probe_video(data: bytes, label: str, demuxer: str, options: MediaOptions) -> _Probe:
    """Open the container, check its video stream, and demux (no decoding) to learn the frame timeline."""
    with _open_container(data, label, demuxer) as container:
        stream = _video_stream(container, label)
        context = stream.codec_context
        if context is None:  # PyAV #2344: decoding such a stream segfaults
            raise MediaError("corrupt", f"{label} video stream has no decoder configuration (codec parameters)")
        if context.width and context.height:
            _check_pixels(context.width, context.height, options, f"{label} video frames")
        pts = []
        try:
            for packet in container.demux(stream):
                if packet.size:  # the last, empty packet only flushes the decoder
                    pts.append(packet.pts if packet.pts is not None else packet.dts)
        except av.error.FFmpegError:
            pass  # a container damaged part-way: the decoding pass counts what really decodes
        rate = stream.average_rate or stream.guessed_rate
        fps = float(rate) if rate else 0.0
        time_base = stream.time_base
        codec = context.name
        width, height = context.width, context.height
    if pts and None not in pts and time_base:
        ordered = sorted(pts)
        times = [float((p - ordered[0]) * time_base) for p in ordered]
        if not fps and len(times) > 1 and times[-1] > 0:
            fps = (len(times) - 1) / times[-1]
    else:  # no timestamps: frames are evenly spaced at the nominal rate
        fps = fps or 25.0
        times = [i / fps for i in range(len(pts))]
    duration = times[-1] + 1 / fps if times and fps else 0.0
    return _Probe(label, codec, width, height, times, fps, duration)


def _pyav_frames(
    data: bytes, demuxer: str, probe: _Probe, predicted: list[float], options: MediaOptions
) -> tuple[list[float], dict[int, np.ndarray], list[int]]:
    """Decode the clip sequentially: (decodable frame times, kept frames by index, sampled indices)."""
    indices = _sample(predicted, options)
    times, frames, bad, error = _pyav_pass(data, demuxer, probe, set(indices), options)
    if not times:
        if bad:
            raise MediaError(
                "corrupt",
                f"none of the {bad} {probe.label} video packets could be decoded: the video data is corrupt "
                f"({probe.codec}: {_av_text(error)})",
            )
        raise MediaError("no_frames", f"{probe.label} video stream has no decodable frames")
    if bad > _MAX_BAD_PACKET_FRACTION * (bad + len(times)):
        raise MediaError(
            "corrupt",
            f"{bad} of {bad + len(times)} {probe.label} video packets could not be decoded "
            f"({probe.codec}: {_av_text(error)})",
        )
    if len(times) != len(predicted) or not np.allclose(times, predicted, atol=1e-6):
        # Fewer (or differently timed) frames decoded than demuxed: sample over what really decodes.
        indices = _sample(times, options)
        if not set(indices) <= frames.keys():
            times, frames, _, _ = _pyav_pass(data, demuxer, probe, set(indices), options)
    return times, frames, indices


def _pyav_pass(data: bytes, demuxer: str, probe: _Probe, wanted: set[int], options: MediaOptions):
    """One sequential decoding pass over the clip, keeping frames in ``wanted``.

    Returns (times of the decodable frames, {index: RGB frame}, undecodable packets, first decoder error).
    """
    times: list[float] = []
    frames: dict[int, np.ndarray] = {}
    bad, first_error, start = 0, None, None
    end = options.max_duration_s
    with _open_container(data, probe.label, demuxer) as container:
        stream = _video_stream(container, probe.label)
        stream.codec_context.thread_count = 1  # a Ray decode task owns one CPU; threads would oversubscribe
        time_base = stream.time_base
        packets = container.demux(stream)
        while True:
            try:
                packet = next(packets)
            except StopIteration:
                break
            except av.error.FFmpegError:  # damaged container: flush what the decoder holds, then stop
                packet = None
            try:
                decoded = stream.decode(packet)
            except av.error.FFmpegError as e:
                if isinstance(e, MemoryError):
                    raise
                bad, first_error = bad + 1, first_error or e
                decoded = []
            for frame in decoded:
                if frame.pts is not None and time_base:
                    start = frame.pts if start is None else start
                    t = float((frame.pts - start) * time_base)
                else:
                    t = len(times) / probe.fps
                if end is not None and t >= end - 1e-9:
                    return times, frames, bad, first_error
                if len(times) in wanted:
                    _check_pixels(frame.width, frame.height, options, f"{probe.label} video frame")
                    frames[len(times)] = np.asarray(_fit(frame.to_image(), options.max_side), dtype=np.uint8)
                times.append(t)
            if packet is None:
                break
    return times, frames, bad, first_error


def _decord_frames(data: bytes, predicted: list[float], options: MediaOptions):
    """The fallback decoder: decord's ``get_batch`` at indices sampled over the demuxed timeline."""
    import decord  # imported here: only the fallback needs it (and its own copy of FFmpeg)

    reader = decord.VideoReader(io.BytesIO(data), num_threads=1)
    if len(reader) != len(predicted):  # indices past the decodable frames hang decord (#373): refuse
        raise MediaError(
            "corrupt",
            f"decoders disagree on the frame count (decord {len(reader)}, PyAV demuxer {len(predicted)})",
        )
    indices = _sample(predicted, options)
    wanted = sorted(set(indices))
    batch = reader.get_batch(wanted).asnumpy()
    frames = {}
    for i, array in zip(wanted, batch, strict=True):
        _check_pixels(array.shape[1], array.shape[0], options, "video frame")
        frames[i] = np.asarray(_fit(Image.fromarray(array), options.max_side), dtype=np.uint8)
    return predicted, frames, indices


def _same_size(frame: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A frame resized to ``shape`` (streams may change resolution part-way; the batch needs one size)."""
    if frame.shape == shape:
        return frame
    return np.asarray(Image.fromarray(frame).resize((shape[1], shape[0]), Image.Resampling.BICUBIC))


# ---------------------------------------------------------------------------------------------------------
# Truncation: the container's own size fields claim more bytes than the file has


def _truncation(data: bytes, fmt: str) -> str | None:
    """Why the file is truncated, from the container structure, or None if it looks whole (or is unknown)."""
    size = len(data)
    if fmt in ("mp4", "mov", "m4a", "3gp"):
        offset, seen = 0, set()
        while offset + 8 <= size:
            box_size, box = struct.unpack(">I4s", data[offset : offset + 8])
            if box_size == 1 and offset + 16 <= size:
                box_size = struct.unpack(">Q", data[offset + 8 : offset + 16])[0]
            elif box_size == 0:  # "to the end of the file"
                box_size = size - offset
            if box_size < 8:
                return None  # not a box structure we can follow: let the demuxer judge
            name = box.decode("latin-1")
            seen.add(box)
            if offset + box_size > size:
                missing = " and its index ('moov' box) is missing" if b"moov" not in seen else ""
                return (
                    f"the file ends at byte {size:,} but its '{name}' box runs to byte {offset + box_size:,} "
                    f"(at least {1 - size / (offset + box_size):.0%} of the file is missing){missing}"
                )
            offset += box_size
        if b"mdat" in seen and not seen & {b"moov", b"moof"}:
            return f"the file ({size:,} bytes) has its data ('mdat') but no index ('moov' box); it was cut short"
        return None
    if fmt == "avi":
        declared = struct.unpack("<I", data[4:8])[0] + 8
        if declared > size and declared < 0xFFFFFFFF:
            return f"the file ends at byte {size:,} but its RIFF header says {declared:,} bytes"
        return None
    if fmt in ("mkv", "webm"):
        declared = _ebml_segment_end(data)
        if declared is not None and declared > size:
            return f"the file ends at byte {size:,} but its Segment says {declared:,} bytes"
    return None


def _ebml_segment_end(data: bytes) -> int | None:
    """Byte where the Matroska Segment ends, from its size field; None if unknown ("live") or unparsable."""

    def vint(offset: int, strip: bool) -> tuple[int, int, bool] | None:
        if offset >= len(data) or data[offset] == 0:
            return None
        length = 8 - data[offset].bit_length() + 1
        if offset + length > len(data):
            return None
        value = int.from_bytes(data[offset : offset + length], "big")
        all_ones = strip and value & ((1 << (7 * length)) - 1) == (1 << (7 * length)) - 1
        if strip:
            value &= (1 << (7 * length)) - 1
        return value, offset + length, all_ones

    header_id = vint(0, strip=False)
    header_size = header_id and vint(header_id[1], strip=True)
    if not header_size:
        return None
    segment_id = vint(header_size[1] + header_size[0], strip=False)
    if not segment_id or segment_id[0] != 0x18538067:
        return None
    segment_size = vint(segment_id[1], strip=True)
    if not segment_size or segment_size[2]:
        return None
    return segment_size[1] + segment_size[0]


# ---------------------------------------------------------------------------------------------------------
# DecodeWorker: decode() in a killable child process


DecodeFn = Callable[[bytes, str, MediaOptions], Decoded]


class DecodeWorker:
    """Runs ``decode`` in a child process reused across calls; the caller never hangs or dies.

    A call that takes longer than ``options.timeout_s`` gets the child SIGKILLed and raises ``decode_timeout``;
    a child that dies (segfault, abort, exit) raises ``decode_crashed``; either way the next call starts a
    fresh child. The child's address space is capped at ``options.max_memory_mb`` (RLIMIT_AS), so a file
    that needs more raises ``too_large`` instead of swapping the machine.

    ``start_method``: "forkserver" (default) or "spawn", never "fork". A Ray worker process runs threads
    (gRPC, the core worker, maybe OpenMP pools); forking it copies whatever locks those threads held at that
    instant into a child where nobody will release them (malloc, logging, decord #294), a deadlock.
    "forkserver" starts one clean single-threaded server process once (it imports this module up front)
    and forks every decoder child from it, so restarting a child after a kill is quick (no re-import of
    numpy, Pillow and FFmpeg).
    "spawn" is as safe but each (re)start imports numpy, Pillow and FFmpeg again (about a second).

    ``_decode_fn`` is for tests only: a picklable module-level function used instead of ``decode``.
    """

    def __init__(
        self,
        options: MediaOptions = MediaOptions(),  # noqa: B008 (frozen dataclass)
        start_method: str = "forkserver",
        _decode_fn: DecodeFn | None = None,
    ) -> None:
        if start_method not in ("forkserver", "spawn"):
            raise ValueError(f"DecodeWorker start_method = {start_method!r} is invalid: 'forkserver' or 'spawn'")
        self.options = options
        self.start_method = start_method
        self._decode_fn = _decode_fn or decode
        self._context = multiprocessing.get_context(start_method)
        if start_method == "forkserver":
            # Only matters before the server starts: then it imports us once, and children are forked warm.
            self._context.set_forkserver_preload([__name__])
        self._process = None
        self._connection = None
        self._lock = threading.Lock()  # one request at a time on the pipe
        self.restarts = 0  # children killed or found dead so far (for monitoring)

    def __reduce__(self):
        # Shipped to another process (a Ray actor or task), a worker travels as its settings; it starts its
        # own child there on first use.
        custom = self._decode_fn if self._decode_fn is not decode else None
        return DecodeWorker, (self.options, self.start_method, custom)

    def __enter__(self) -> DecodeWorker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def decode(self, data: bytes, name: str) -> Decoded:
        """``decode(data, name, options)`` in the child process; raises ``MediaError``."""
        _check_size(data, self.options)  # cheap, and spares shipping an oversized file to the child
        with self._lock:
            if self._process is None or not self._process.is_alive():
                self._start()
            answered = False
            try:
                self._connection.send((data, name))
                ready = multiprocessing.connection.wait(
                    [self._connection, self._process.sentinel], timeout=self.options.timeout_s
                )
                if not ready:
                    self._stop(kill=True)
                    raise MediaError(
                        "decode_timeout",
                        f"decoding took longer than {self.options.timeout_s:g} s (timeout_s); the decoder was killed",
                    )
                reply = self._connection.recv() if self._connection in ready else None
                answered = True
            except (EOFError, OSError):  # the pipe broke: the child died while reading or answering
                reply, answered = None, True
            finally:
                if not answered and self._process is not None:
                    # Interrupted while the child works (KeyboardInterrupt, ...): its late answer would be
                    # read as the next call's, so it must not live on.
                    self._stop(kill=True)
            if reply is None:
                raise self._crashed()
        if reply[0] == "ok":
            return reply[1]
        raise MediaError(reply[1], reply[2])

    def close(self) -> None:
        """Stop the child process (a later ``decode`` would start a new one)."""
        with self._lock:
            self._stop(kill=False)

    def _start(self) -> None:
        parent, child = self._context.Pipe(duplex=True)
        process = self._context.Process(
            target=_child_main,
            args=(child, self.options, self._decode_fn, self.start_method),
            name="media-decoder",
            daemon=True,
        )
        process.start()
        child.close()  # the child's end lives in the child only, so its death reads as EOF here
        self._process, self._connection = process, parent
        # Start-up (imports under "spawn") must not eat into the first item's timeout: wait for "ready".
        try:
            ready = parent.poll(_START_TIMEOUT_S) and parent.recv() == "ready"
        except (EOFError, OSError):
            ready = False
        if not ready:
            self._stop(kill=True)
            raise MediaError(
                "decode_crashed",
                f"the decoder process failed to start ({self.start_method}); note that it imports the main "
                "module again, which must guard its work with `if __name__ == '__main__':`",
            )

    def _crashed(self) -> MediaError:
        process = self._process
        process.join(5)
        code = process.exitcode
        self._stop(kill=True)
        if code == _EXIT_OUT_OF_MEMORY:
            return MediaError("too_large", _memory_message(self.options))
        if code is not None and code < 0:
            try:
                signame = signal.Signals(-code).name
            except ValueError:
                signame = f"signal {-code}"
            why = " (killed from outside, often by the out-of-memory killer)" if -code == signal.SIGKILL else ""
            return MediaError(
                "decode_crashed",
                f"the decoder process died with signal {signame}{why} while decoding this file; "
                "the decoding library crashed on it",
            )
        return MediaError(
            "decode_crashed", f"the decoder process exited unexpectedly (exit code {code}) while decoding"
        )

    def _stop(self, kill: bool) -> None:
        process, connection = self._process, self._connection
        self._process = self._connection = None
        if process is None:
            return
        if kill:
            self.restarts += 1
        else:
            try:
                connection.send(None)  # "exit": lets the child leave cleanly
            except (OSError, ValueError):
                pass
            process.join(2)
        if process.is_alive():
            process.kill()  # SIGKILL: a child spinning in C holding the GIL ignores everything else
        process.join(5)
        connection.close()


def _child_main(connection, options: MediaOptions, decode_fn: DecodeFn, start_method: str) -> None:
    """The decoder process: answer (data, name) requests until told to stop or the parent goes away."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it then stops us
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # whatever the re-imported main module did: truncated is an error
    _die_with_parent(start_method)
    if options.max_memory_mb is not None:
        import resource

        cap = options.max_memory_mb << 20
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    connection.send("ready")
    while True:
        try:
            request = connection.recv()
        except EOFError:  # the parent is gone
            return
        except MemoryError:  # the request did not fit under the cap; the pipe is now mid-message
            os._exit(_EXIT_OUT_OF_MEMORY)
        if request is None:
            return
        data, name = request
        del request
        try:
            reply = ("ok", decode_fn(data, name, options))
        except MediaError as e:
            reply = ("error", e.kind, e.message)
        except MemoryError:
            reply = ("error", "too_large", _memory_message(options))
        except Exception as e:  # decode() maps its own failures; this is a non-standard decode_fn
            reply = ("error", "corrupt", f"decoding failed: {type(e).__name__}: {e}")
        del data
        try:
            connection.send(reply)
        except MemoryError:  # pickling the frames did not fit
            connection.send(("error", "too_large", _memory_message(options)))


def _die_with_parent(start_method: str) -> None:
    """Make sure a decoder stuck in C does not outlive the process that started it."""
    if start_method == "forkserver":
        # CPython hands every forkserver child a copy of the write end of the server's "alive" pipe; the
        # server exits when that pipe closes, which never happens while a hung child holds a copy. Drop ours:
        # then the server exits with the worker process, and PR_SET_PDEATHSIG below kills us with it.
        try:
            from multiprocessing import forkserver

            server = forkserver._forkserver
            if server._forkserver_alive_fd is not None:
                os.close(server._forkserver_alive_fd)
                server._forkserver_alive_fd = None
        except Exception:
            pass
        try:  # Linux: SIGKILL us when our parent (the single-threaded server) exits
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except Exception:
            pass
    else:
        # Under spawn our parent is the worker process itself, and PR_SET_PDEATHSIG would fire when the
        # *thread* that started us exits, not the process. Poll instead; this cannot stop a loop that holds
        # the GIL, only everything else.
        parent = os.getppid()

        def watch() -> None:
            while os.getppid() == parent:
                time.sleep(1.0)
            os._exit(1)

        threading.Thread(target=watch, name="media-decoder-watchdog", daemon=True).start()
