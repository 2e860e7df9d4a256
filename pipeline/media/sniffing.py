"""Format sniffing: what the bytes are, whatever the name says.

Magic numbers decide image, video (an animated GIF is one) or neither, and name the container
(``_sniff``); the container's own size fields tell a file that was cut short (``_truncation``).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass


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
