"""Videos: PyAV (a demux-only probe, then sequential decoding); decord as a fallback.

Why PyAV first and decord only as a fallback: see the package docstring (pipeline/media/__init__.py).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import av
import numpy as np
from PIL import Image

from pipeline.media.images import _check_pixels, _fit
from pipeline.media.sampling import _clip, _sample
from pipeline.media.sniffing import _VIDEO_CONTAINERS, _Sniffed, _truncation
from pipeline.media.types import Decoded, MediaError, MediaOptions

# Undecodable packets tolerated in a video before it counts as corrupt: H.264 conceals a damaged slice and
# carries on, so one bad packet in a long video should cost that frame, not the whole item.
_MAX_BAD_PACKET_FRACTION = 0.1


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
