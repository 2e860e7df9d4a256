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

Modules: ``types`` (MediaOptions, Decoded, MediaError), ``sniffing`` (magic numbers, containers,
truncation), ``images`` (Pillow, GIF, pixel limits, RGB), ``sampling`` (frame sampling), ``videos``
(PyAV, decord), ``dispatch`` (``decode``), ``worker`` (``DecodeWorker``, the child process).
"""

from pipeline.media.dispatch import decode
from pipeline.media.images import IMAGE_FORMATS
from pipeline.media.sniffing import sniff
from pipeline.media.types import ERROR_KINDS, Decoded, MediaError, MediaOptions
from pipeline.media.worker import DecodeFn, DecodeWorker

__all__ = [
    "ERROR_KINDS",
    "IMAGE_FORMATS",
    "DecodeFn",
    "DecodeWorker",
    "Decoded",
    "MediaError",
    "MediaOptions",
    "decode",
    "sniff",
]
