"""Images (Pillow), and animated GIFs decoded as videos.

Allow-listed formats, the pixel count checked from the header before any pixel is decoded, truncated
files refused, EXIF orientation applied, every mode normalised to RGB. The pixel limit (``_check_pixels``)
and the ``max_side`` downscaling (``_fit``) are shared with videos.
"""

from __future__ import annotations

import io
import re

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.media.sampling import _clip, _sample
from pipeline.media.sniffing import _IMAGE_LABELS, _gif_scan, _Sniffed
from pipeline.media.types import Decoded, MediaError, MediaOptions

IMAGE_FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF")  # Pillow's format names: the allow-list
# A GIF frame delay of 0 or 10 ms means "as fast as possible"; browsers show such frames for 100 ms.
_GIF_MIN_DELAY_MS, _GIF_DEFAULT_DELAY_MS = 20, 100


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
