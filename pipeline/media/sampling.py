"""Frame sampling: which frames of a video (or an animated GIF) to keep, from its frame times."""

from __future__ import annotations

import bisect

import numpy as np

from pipeline.media.types import MediaOptions


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
