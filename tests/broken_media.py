"""A deterministic corpus of broken and odd media files, for testing ``pipeline.media``.

``write_broken_media(directory)`` writes every file and returns one ``Case`` per file: what decoding it
should give (``"ok"``, or ``"error"`` with a ``MediaError`` kind). The expectations for broken videos were
observed with PyAV 18 / FFmpeg 8 and are explained in each case's ``note``.
"""

from __future__ import annotations

import io
import struct
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image

from synthetic.corpus import _mp4_bytes

VIDEO_FRAMES, VIDEO_SIDE, VIDEO_FPS = 12, 64, 12


@dataclass(frozen=True)
class Case:
    name: str  # file name under the directory
    expect_status: str  # "ok" or "error"
    expect_kind: str | None  # the MediaError kind of an error case; None for ok cases
    note: str
    expect_media: str | None = None  # ok cases: "image" or "video"
    expect_shape: tuple[int, ...] | None = None  # ok cases: the frames' shape with default MediaOptions


def video_frames(count: int = VIDEO_FRAMES, side: int = VIDEO_SIDE, seed: int = 0) -> np.ndarray:
    """uint8 [T, side, side, 3]: frame t has brightness 16 + 18 t (distinct, increasing), a moving square and
    mild noise (so H.264 has real data to code and a cut inside ``mdat`` loses frames)."""
    rng = np.random.default_rng(seed)
    frames = np.empty((count, side, side, 3), np.uint8)
    for t in range(count):
        base = 16 + 18 * t
        noise = rng.integers(-12, 13, (side, side, 3))
        frame = np.clip(base + noise, 0, 255)
        x = (4 * t) % (side - 12)
        frame[8:20, x : x + 12] = (255, 40, 40)
        frames[t] = frame
    return frames


def mp4_bytes(frames: np.ndarray, fps: int = VIDEO_FPS, faststart: bool = False, container: str = "mp4") -> bytes:
    """H.264 yuv420p video of ``frames`` in an MP4 (moov last, or first with ``faststart``) or another container."""
    if not faststart and container == "mp4":
        return _mp4_bytes(frames, fps, codec="libx264")
    # ffmpeg's faststart pass re-reads the output by name, so it needs a real file, not a BytesIO.
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "video"
        # bitexact: no random Matroska segment UID or muxing date, so the same frames give the same bytes
        options = {"fflags": "+bitexact", **({"movflags": "faststart"} if faststart else {})}
        with av.open(str(path), mode="w", format=container, options=options) as out:
            stream = out.add_stream("libx264", rate=fps)
            stream.width, stream.height = frames.shape[2], frames.shape[1]
            stream.pix_fmt = "yuv420p"
            stream.time_base = Fraction(1, fps)
            stream.codec_context.thread_count = 1
            stream.options = {"crf": "18", "preset": "medium"}
            for t, frame in enumerate(frames):
                video_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
                video_frame.pts = t
                out.mux(stream.encode(video_frame))
            out.mux(stream.encode())
        return path.read_bytes()


def m4a_bytes(seconds: float = 1.0, rate: int = 44100) -> bytes:
    """An audio-only MP4 (AAC, mono sine)."""
    buffer = io.BytesIO()
    samples = int(seconds * rate)
    wave = (0.3 * np.sin(2 * np.pi * 440 * np.arange(samples) / rate)).astype(np.float32)[None]
    with av.open(buffer, mode="w", format="mp4") as out:
        stream = out.add_stream("aac", rate=rate)
        stream.layout = "mono"
        for start in range(0, samples, 1024):
            frame = av.AudioFrame.from_ndarray(wave[:, start : start + 1024].copy(), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = rate, start
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    return buffer.getvalue()


_MP4_CONTAINER_BOXES = {b"moov", b"trak", b"mdia", b"minf", b"stbl"}


def mp4_boxes(data: bytes | bytearray, start: int = 0, end: int | None = None):
    """Yield (type, offset, size) of every box, descending into moov/trak/mdia/minf/stbl."""
    end = len(data) if end is None else min(end, len(data))
    offset = start
    while offset + 8 <= end:
        size, kind = struct.unpack(">I4s", data[offset : offset + 8])
        if size < 8:
            return
        yield kind, offset, size
        if kind in _MP4_CONTAINER_BOXES:
            yield from mp4_boxes(data, offset + 8, offset + size)
        offset += size


def zero_sample_tables(data: bytes) -> bytes:
    """An MP4 whose video track keeps its decoder configuration but lists zero samples.

    FFmpeg's muxer drops a track that never got a packet, so a zero-frame MP4 is made by zeroing the
    entry counts of a real file's sample tables.
    """
    out = bytearray(data)
    for kind, offset, _ in mp4_boxes(data):
        if kind in (b"stts", b"stss", b"ctts", b"stsc", b"stco"):
            out[offset + 12 : offset + 16] = bytes(4)  # version/flags, then entry_count
        elif kind == b"stsz":
            out[offset + 12 : offset + 20] = bytes(8)  # sample_size, sample_count
    return bytes(out)


def mdat_span(data: bytes) -> tuple[int, int]:
    """(start, end) of the mdat payload."""
    for kind, offset, size in mp4_boxes(data):
        if kind == b"mdat":
            return offset + 8, offset + size
    raise ValueError("no mdat box")


def zero_packet(data: bytes, index: int) -> bytes:
    """``data`` with the payload of its video packet number ``index`` (in presentation order) zeroed."""
    with av.open(io.BytesIO(data)) as container:
        packets = sorted((p.pts, p.pos, p.size) for p in container.demux(video=0) if p.size)
    _, position, size = packets[index]
    out = bytearray(data)
    out[position : position + size] = bytes(size)
    return bytes(out)


def _image_bytes(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def _flip(data: bytes, start: int, count: int) -> bytes:
    """``data`` with ``count`` bytes from ``start`` inverted."""
    out = bytearray(data)
    for offset in range(start, start + count):
        out[offset] ^= 0xFF
    return bytes(out)


def _gradient(height: int, width: int) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], -1).astype(np.uint8)


def png_bomb(side: int = 20_000) -> bytes:
    """A real decompression bomb: a valid 1-bit ``side`` x ``side`` PNG of zeros, a few tens of KB on disk."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    row = bytes(1 + (side + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row * 1000) for _ in range(side // 1000)) + compressor.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # bit depth 1, greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def write_broken_media(directory: Path) -> list[Case]:
    """Write the corpus into ``directory`` (created if missing); same bytes on every call."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1234)
    cases: list[Case] = []

    def add(name: str, data: bytes, status: str, kind: str, note: str, shape=None) -> None:
        """``kind``: the error kind, or for an ok case the media kind ("image"/"video")."""
        (directory / name).write_bytes(data)
        if status == "ok":
            cases.append(Case(name, status, None, note, expect_media=kind, expect_shape=shape))
        else:
            cases.append(Case(name, status, kind, note))

    frames = video_frames()
    mp4 = mp4_bytes(frames)
    faststart = mp4_bytes(frames, faststart=True)
    png = _image_bytes(Image.fromarray(_gradient(48, 64)), "PNG")
    jpeg = _image_bytes(Image.fromarray(_gradient(48, 64)), "JPEG", quality=90)
    video_shape = (8, VIDEO_SIDE, VIDEO_SIDE, 3)

    # --- not media at all -------------------------------------------------------------------------------
    add("empty.jpg", b"", "error", "empty", "0 bytes")
    add("empty.mp4", b"", "error", "empty", "0 bytes")
    add("three_bytes.jpg", b"\x00\x01\x02", "error", "unsupported_format", "3 bytes of garbage")
    add("random.png", rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(), "error", "unsupported_format",
        "4 KiB of random bytes named .png")  # fmt: skip
    add("text.jpg", b"Hello, this is not a picture.\nJust some text in a file named like a JPEG.\n", "error",
        "unsupported_format", "UTF-8 text named .jpg")  # fmt: skip
    add("page.mp4", b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head><body>gone</body></html>\n",
        "error", "unsupported_format", "an HTML error page saved as .mp4 (a classic crawler artefact)")  # fmt: skip
    add("document.png", b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog >>\nendobj\n", "error",
        "unsupported_format", "PDF magic named .png")  # fmt: skip
    zip_buffer = io.BytesIO()
    with zipfile.ZipFile(zip_buffer, "w") as archive:
        archive.writestr(zipfile.ZipInfo("frame.png", date_time=(2026, 1, 1, 0, 0, 0)), png)  # fixed time
    add("archive.mp4", zip_buffer.getvalue(), "error", "unsupported_format", "a ZIP archive named .mp4")

    # --- broken images ----------------------------------------------------------------------------------
    add("truncated.png", png[: len(png) // 2], "error", "truncated", "PNG cut in the middle of IDAT")
    add("truncated.jpg", jpeg[: len(jpeg) // 2], "error", "truncated", "JPEG cut in the middle of the scan")
    add("header_only.jpg", jpeg[:300], "error", "truncated", "JPEG cut right after its headers")
    corrupt = bytearray(jpeg)
    sos = corrupt.index(b"\xff\xda")  # start of scan: flip bytes in the entropy-coded data after it
    for offset in range(sos + 40, len(corrupt) - 2, 7):
        corrupt[offset] ^= 0x5A
    add("corrupt_scan.jpg", bytes(corrupt), "ok", "image",
        "JPEG with every 7th byte of the scan flipped: libjpeg conceals it and Pillow decodes garbage pixels "
        "without an error; undetectable, so expected ok", (1, 48, 64, 3))  # fmt: skip
    add("corrupt_tables.jpg", _flip(jpeg, jpeg.index(b"\xff\xc4") + 4, 16), "error", "corrupt",
        "JPEG whose Huffman table (DHT) is garbled: 'broken data stream'")  # fmt: skip
    add("corrupt_header.jpg", _flip(jpeg, jpeg.index(b"\xff\xc0") + 4, 16), "error", "corrupt",
        "JPEG whose frame header (SOF) is garbled: Pillow cannot parse the header")  # fmt: skip
    add("bomb.png", png_bomb(), "error", "too_large",
        "valid 20000x20000 1-bit PNG of zeros (~50 KB): 400 MP, refused from the header before decoding")  # fmt: skip
    corrupt_idat = bytearray(png)
    corrupt_idat[png.index(b"IDAT") + 10] ^= 0xFF
    add("corrupt_idat.png", bytes(corrupt_idat), "error", "corrupt", "PNG with a byte of its zlib data inverted")

    # --- mislabelled but fine ---------------------------------------------------------------------------
    add("image_named.mp4", png, "ok", "image", "a PNG named .mp4 decodes as an image", (1, 48, 64, 3))
    add("video_named.jpg", mp4, "ok", "video", "an MP4 named .jpg decodes as a video", video_shape)

    # --- odd but valid images ---------------------------------------------------------------------------
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    add("exif_rotated.jpg", _image_bytes(Image.fromarray(_gradient(32, 64)), "JPEG", exif=exif), "ok", "image",
        "stored 64 wide x 32 high with EXIF orientation 6: displayed 32 wide x 64 high", (1, 64, 32, 3))  # fmt: skip
    add("grey.png", _image_bytes(Image.fromarray(_gradient(40, 50)[..., 0]), "PNG"), "ok", "image",
        "8-bit greyscale (L)", (1, 40, 50, 3))  # fmt: skip
    grey16 = (np.arange(40 * 50, dtype=np.uint16).reshape(40, 50) * 32).astype(np.uint16)
    add("grey16.png", _image_bytes(Image.fromarray(grey16), "PNG"), "ok", "image", "16-bit greyscale (I;16)",
        (1, 40, 50, 3))  # fmt: skip
    cmyk = Image.fromarray(_gradient(40, 50)).convert("CMYK")
    add("cmyk.jpg", _image_bytes(cmyk, "JPEG", quality=90), "ok", "image", "CMYK JPEG", (1, 40, 50, 3))
    palette = Image.fromarray(_gradient(40, 50)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    add("palette_transparent.png", _image_bytes(palette, "PNG", transparency=0), "ok", "image",
        "palette PNG whose colour 0 is transparent (composited on white)", (1, 40, 50, 3))  # fmt: skip
    rgba = np.dstack([_gradient(40, 50), np.tile(np.linspace(0, 255, 50).astype(np.uint8), (40, 1))])
    add("rgba.png", _image_bytes(Image.fromarray(rgba, "RGBA"), "PNG"), "ok", "image",
        "RGBA with an alpha ramp (composited on white)", (1, 40, 50, 3))  # fmt: skip
    add("la.png", _image_bytes(Image.fromarray(rgba[..., [0, 3]], "LA"), "PNG"), "ok", "image",
        "greyscale + alpha (LA)", (1, 40, 50, 3))  # fmt: skip
    add("one_pixel.png", _image_bytes(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"), "ok", "image", "1x1",
        (1, 1, 1, 3))  # fmt: skip
    add("wide.png", _image_bytes(Image.fromarray(_gradient(16, 4000)), "PNG"), "ok", "image",
        "4000x16 strip, downscaled to the default media.max_side 1344", (1, 5, 1344, 3))  # fmt: skip
    add("image.webp", _image_bytes(Image.fromarray(_gradient(40, 50)), "WEBP", quality=90), "ok", "image", "WEBP",
        (1, 40, 50, 3))  # fmt: skip
    add("image.bmp", _image_bytes(Image.fromarray(_gradient(40, 50)), "BMP"), "ok", "image", "BMP", (1, 40, 50, 3))
    add("image.tiff", _image_bytes(Image.fromarray(_gradient(40, 50)), "TIFF", compression="tiff_lzw"), "ok",
        "image", "LZW TIFF", (1, 40, 50, 3))  # fmt: skip
    add("still.gif", _image_bytes(Image.fromarray(_gradient(40, 50)).convert("P"), "GIF"), "ok", "image",
        "single-frame GIF is an image", (1, 40, 50, 3))  # fmt: skip
    gif_frames = [Image.fromarray(np.full((40, 50, 3), 20 * t, np.uint8)).convert("P") for t in range(6)]
    gif = _image_bytes(gif_frames[0], "GIF", save_all=True, append_images=gif_frames[1:], duration=100, loop=0)
    add("animated.gif", gif, "ok", "video", "6-frame animated GIF (100 ms a frame) is a video", (8, 40, 50, 3))
    add("truncated_animated.gif", gif[: len(gif) * 6 // 10], "error", "truncated", "animated GIF cut at 60%")

    # --- videos -----------------------------------------------------------------------------------------
    add("video.mp4", mp4, "ok", "video", "12-frame 64x64 H.264 MP4 (moov at the end)", video_shape)
    add("faststart.mp4", faststart, "ok", "video", "same frames, moov first (movflags=faststart)", video_shape)
    mkv = mp4_bytes(frames, container="matroska")
    add("video.mkv", mkv, "ok", "video", "H.264 in Matroska", video_shape)
    add("one_frame.mp4", mp4_bytes(frames[:1]), "ok", "video",
        "a 1-frame video: uniform sampling repeats frame 0 num_frames times", video_shape)  # fmt: skip
    add("truncated_30.mp4", mp4[: len(mp4) * 3 // 10], "error", "truncated",
        "moov-at-end MP4 cut at 30%: no index at all ('moov atom not found')")  # fmt: skip
    add("truncated_60.mp4", mp4[: len(mp4) * 6 // 10], "error", "truncated",
        "moov-at-end MP4 cut at 60%: mdat complete, moov missing")  # fmt: skip
    add("faststart_truncated_10.mp4", faststart[: len(faststart) // 10], "error", "truncated",
        "faststart MP4 cut inside mdat near the start: the index lists 12 frames, the first frame is cut")  # fmt: skip
    add("faststart_truncated_60.mp4", faststart[: len(faststart) * 6 // 10], "error", "truncated",
        "faststart MP4 cut at 60%: the index is whole but frames past the cut are missing")  # fmt: skip
    moov_cut = next(offset + size // 2 for kind, offset, size in mp4_boxes(faststart) if kind == b"moov")
    add("faststart_cut_in_moov.mp4", faststart[:moov_cut], "error", "truncated",
        "faststart MP4 cut in the middle of its moov box")  # fmt: skip
    start, end = mdat_span(mp4)
    zeroed = bytearray(mp4)
    zeroed[start:end] = bytes(end - start)
    add("mdat_zeroed.mp4", bytes(zeroed), "error", "corrupt",
        "valid index, every sample zeroed: the H.264 decoder rejects all 12 packets")  # fmt: skip
    garbled = bytearray(mp4)
    noise = np.random.default_rng(7).integers(0, 256, end - start, dtype=np.uint8).tobytes()
    garbled[start:end] = noise
    add("mdat_random.mp4", bytes(garbled), "error", "corrupt",
        "valid index, samples replaced by random bytes: the H.264 decoder rejects every packet")  # fmt: skip
    add("mdat_flipped.mp4", _flip(mp4, start + (end - start) * 2 // 3, 64), "ok", "video",
        "64 bytes inverted inside a late P-frame: H.264 conceals the damage, frames decode (garbled)",
        video_shape)  # fmt: skip
    add("one_packet_zeroed.mp4", zero_packet(mp4, 6), "ok", "video",
        "the packet of frame 6 zeroed: that packet fails to decode (1 of 12, under the 10% tolerance), "
        "sampling runs over the 11 frames that decode", video_shape)  # fmt: skip
    add("truncated.mkv", mkv[: len(mkv) * 6 // 10], "error", "truncated",
        "Matroska cut at 60%: its Segment size says more bytes follow")  # fmt: skip
    add("video.ts", mp4_bytes(frames, container="mpegts"), "ok", "video", "H.264 in an MPEG transport stream",
        video_shape)  # fmt: skip
    add("video.avi", mp4_bytes(frames, container="avi"), "ok", "video", "H.264 in AVI", video_shape)
    add("ftyp_only.mp4", mp4[:32], "error", "corrupt", "just the 32-byte ftyp box: no media data, no index")
    heic = struct.pack(">I4s4sI", 24, b"ftyp", b"heic", 0) + b"mif1heic" + bytes(64)
    add(
        "photo.heic.jpg", heic, "error", "unsupported_format", "a HEIC (HEIF) photo named .jpg: recognised, not decoded"
    )
    add("audio_only.m4a", m4a_bytes(), "error", "no_video_stream", "AAC audio in an MP4 (M4A)")
    add("zero_frames.mp4", zero_sample_tables(mp4_bytes(frames[:2])), "error", "no_frames",
        "MP4 with an H.264 track whose sample tables list no samples")  # fmt: skip
    return cases


def misbehaving_decode(data: bytes, name: str, options):
    """A test-only ``DecodeWorker(_decode_fn=...)``: misbehaves, like a decoder on a poisoned file, when the
    bytes start with a command word, and is ``pipeline.media.decode`` otherwise.

    The failures are the ones no ``try`` in the decoding process survives: a sleep that never ends, a loop in
    C holding the GIL (signals and ``SIGALRM`` cannot interrupt it, like decord #373), a stopped process,
    SIGSEGV, a real NULL dereference, ``abort()`` (decord #25), ``os._exit``, and running out of memory.
    """
    import ctypes
    import os
    import re
    import signal
    import time

    from pipeline.media import decode

    command = data.partition(b"\n")[0]
    if command == b"SLEEP":
        time.sleep(3600)
    elif command == b"SPIN_GIL":
        re.match(r"(a+)+$", "a" * 64 + "b")  # catastrophic backtracking inside the C regex engine
    elif command == b"SIGSTOP":
        os.kill(os.getpid(), signal.SIGSTOP)
    elif command == b"SIGSEGV":
        os.kill(os.getpid(), signal.SIGSEGV)
    elif command == b"NULLPTR":
        ctypes.string_at(0)
    elif command == b"ABORT":
        os.abort()
    elif command == b"EXIT3":
        os._exit(3)
    elif command == b"SLOW":  # a slow but working decoder: the rest of the bytes, after five seconds
        time.sleep(5.0)
        return decode(data.partition(b"\n")[2], name, options)
    elif command == b"OOM":
        if options.max_memory_mb is None:  # uncapped, a real 64 GiB allocation would hurt the machine
            raise MemoryError("simulated")
        np.ones(1 << 36, np.uint8)  # 64 GiB: over any max_memory_mb cap, so the allocation fails
    return decode(data, name, options)
