"""pipeline.media: broken and odd media, frame sampling, and a decoder process that hangs or crashes."""

from __future__ import annotations

import io
import os
import pickle
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.media import ERROR_KINDS, Decoded, DecodeWorker, MediaError, MediaOptions, decode, sniff, sniffing, videos
from tests.broken_media import misbehaving_decode, mp4_bytes, write_broken_media, zero_packet

TIMEOUT_S = 1.0  # for the misbehaving decoders
SIGINT_AT_IMPORT = signal.getsignal(signal.SIGINT)  # inherited: Python's handler, or SIG_IGN in a background job


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, list]:
    directory = tmp_path_factory.mktemp("broken_media")
    return directory, write_broken_media(directory)


@pytest.fixture(scope="module")
def worker():
    with DecodeWorker(MediaOptions(timeout_s=30)) as w:
        yield w


def ramp_video(count: int = 30, height: int = 48, width: int = 64) -> np.ndarray:
    """Frame t is grey level 20 + 7 t with a little texture: distinct and increasing brightness."""
    rng = np.random.default_rng(3)
    texture = rng.integers(-6, 7, (height, width, 3))
    return np.stack([np.clip(20 + 7 * t + texture, 0, 255) for t in range(count)]).astype(np.uint8)


@pytest.fixture(scope="module")
def ramp() -> tuple[np.ndarray, bytes]:
    frames = ramp_video()
    return frames, mp4_bytes(frames, fps=12)


def _outcome(case, run) -> str | None:
    """None if the case decodes as expected, else what went wrong."""
    try:
        decoded = run()
    except MediaError as e:
        if case.expect_status != "error" or e.kind != case.expect_kind:
            return f"{case.name}: got error {e.kind} ({e}), expected {case.expect_status} {case.expect_kind}"
        if not e.message.strip() or str(e) != e.message:
            return f"{case.name}: empty or inconsistent message {e.message!r}"
        return None
    if case.expect_status != "ok" or decoded.kind != case.expect_media:
        return f"{case.name}: decoded as {decoded.kind}, expected {case.expect_status} {case.expect_media}"
    if case.expect_shape is not None and decoded.frames.shape != tuple(case.expect_shape):
        return f"{case.name}: shape {decoded.frames.shape}, expected {case.expect_shape}"
    if decoded.frames.dtype != np.uint8 or decoded.frames.ndim != 4 or decoded.frames.shape[-1] != 3:
        return f"{case.name}: frames {decoded.frames.dtype} {decoded.frames.shape} are not uint8 [T, H, W, 3]"
    return None


# ---------------------------------------------------------------------------------------------------------
# The broken corpus


def test_corpus_covers_every_input_error_kind(corpus):
    _, cases = corpus
    kinds = {case.expect_kind for case in cases if case.expect_status == "error"}
    assert kinds == set(ERROR_KINDS) - {"decode_timeout", "decode_crashed"}  # those two need a bad decoder
    assert len({case.name for case in cases}) == len(cases) >= 45


def test_broken_corpus_through_worker(corpus, worker):
    directory, cases = corpus
    restarts = worker.restarts
    problems = [_outcome(c, lambda c=c: worker.decode((directory / c.name).read_bytes(), c.name)) for c in cases]
    assert [p for p in problems if p] == []
    assert worker.restarts == restarts  # nothing in the corpus hung or crashed the decoder


def test_broken_corpus_in_process_matches_worker(corpus, worker):
    directory, cases = corpus
    problems = [_outcome(c, lambda c=c: decode((directory / c.name).read_bytes(), c.name)) for c in cases]
    assert [p for p in problems if p] == []
    data = (directory / "video.mp4").read_bytes()
    np.testing.assert_array_equal(worker.decode(data, "v.mp4").frames, decode(data, "v.mp4").frames)


def test_messages_say_what_is_wrong(corpus):
    directory, _ = corpus

    def message(name: str, options: MediaOptions | None = None) -> str:
        with pytest.raises(MediaError) as info:
            decode((directory / name).read_bytes(), name, options or MediaOptions())
        return info.value.message

    assert message("empty.jpg") == "file is empty (0 bytes)"
    assert message("text.jpg") == "not an image or video (looks like UTF-8 text, although the name ends in .jpg)"
    assert "looks like an HTML page" in message("page.mp4")
    assert "looks like a PDF document" in message("document.png")
    assert "looks like a ZIP archive" in message("archive.mp4")
    assert message("bomb.png") == "PNG image is 20000x20000 = 400.0 MP, over the 64.0 MP limit (max_pixels)"
    assert message("audio_only.m4a") == "MP4 container has no video stream (audio only)"
    assert "truncated" in message("truncated.png") and "truncated" in message("faststart_truncated_60.mp4")
    assert "HEIF" in message("photo.heic.jpg")
    assert message("wide.png", MediaOptions(max_pixels=10_000)) == (
        "PNG image is 4000x16 = 64,000 pixels, over the 10,000 pixel limit (max_pixels)"
    )
    assert message("video.mp4", MediaOptions(max_bytes=1000)).startswith("file is 13.6 KiB, over the 1000 bytes")
    assert "(max_pixels)" in message("video.mp4", MediaOptions(max_pixels=1000))


def test_odd_images_are_normalised(corpus):
    directory, _ = corpus

    def frame(name: str) -> np.ndarray:
        decoded = decode((directory / name).read_bytes(), name)
        assert decoded.kind == "image" and decoded.frames.shape[0] == 1
        return decoded.frames[0].astype(int)

    stored = np.asarray(Image.open(directory / "exif_rotated.jpg").convert("RGB")).astype(int)  # 32 x 64
    assert np.abs(frame("exif_rotated.jpg") - np.rot90(stored, k=-1)).max() == 0  # orientation 6: 90 deg clockwise
    rgba = frame("rgba.png")  # alpha 0 in column 0, 255 in the last column, composited on white
    assert (rgba[:, 0] == 255).all() and abs(rgba[:, -1].mean() - 255) > 20
    assert frame("grey16.png").max() == round((40 * 50 - 1) * 32 / 257)  # 16 bits scaled to 8
    assert (frame("grey.png")[..., 0] == frame("grey.png")[..., 2]).all()
    cmyk_source = np.asarray(Image.open(directory / "image.bmp")).astype(int)  # same gradient
    assert np.abs(frame("cmyk.jpg") - cmyk_source).mean() < 6
    palette = frame("palette_transparent.png")
    assert (palette == 255).all(axis=-1).any()  # the transparent colour became white
    assert frame("one_pixel.png").tolist() == [[[200, 10, 10]]]


# ---------------------------------------------------------------------------------------------------------
# Sniffing and options


def test_sniff_uses_the_bytes_not_the_name(corpus):
    directory, _ = corpus
    expected = {
        "image_named.mp4": "image",
        "video_named.jpg": "video",
        "animated.gif": "video",
        "still.gif": "image",
        "video.mkv": "video",
        "video.ts": "video",
        "video.avi": "video",
        "image.webp": "image",
        "image.bmp": "image",
        "image.tiff": "image",
        "text.jpg": None,
        "page.mp4": None,
        "random.png": None,
        "empty.mp4": None,
    }
    assert {name: sniff((directory / name).read_bytes()) for name in expected} == expected


def test_options_are_validated():
    for kwargs, field in [
        ({"num_frames": 0}, "num_frames"),
        ({"sampling": "random"}, "sampling"),
        ({"sampling": "fps"}, "fps"),
        ({"fps": -1.0}, "fps"),
        ({"max_duration_s": 0}, "max_duration_s"),
        ({"max_side": 0}, "max_side"),
        ({"timeout_s": 0}, "timeout_s"),
        ({"max_memory_mb": 10}, "max_memory_mb"),
    ]:
        with pytest.raises(ValueError, match=rf"\b{field}\b"):
            MediaOptions(**kwargs)
    assert MediaOptions(sampling="fps", fps=2.0, max_memory_mb=None).fps == 2.0
    with pytest.raises(ValueError, match="start_method"):
        DecodeWorker(start_method="fork")


def test_media_error_pickles_and_prints_its_message():
    error = pickle.loads(pickle.dumps(MediaError("corrupt", "bad bytes")))
    assert (error.kind, error.message, str(error)) == ("corrupt", "bad bytes", "bad bytes")
    with pytest.raises(ValueError):
        MediaError("nope", "x")


# ---------------------------------------------------------------------------------------------------------
# Frame sampling on real H.264


def test_uniform_sampling_is_the_linspace_formula_and_frames_match(ramp):
    source, data = ramp
    decoded = decode(data, "ramp.mp4", MediaOptions(num_frames=8))
    expected = np.linspace(0, len(source) - 1, 8).round().astype(int)
    assert decoded.info["frame_indices"] == expected.tolist()
    assert decoded.info["source_frames"] == len(source) and decoded.info["format"] == "h264/mp4"
    assert decoded.frames.shape == (8, 48, 64, 3)
    assert np.abs(decoded.frames.astype(int) - source[expected]).mean() < 8  # lossy, but the same frames
    assert (np.diff(decoded.frames.mean(axis=(1, 2, 3))) > 0).all()  # in order
    assert decoded.info["fps"] == 12 and decoded.info["duration_s"] == pytest.approx(30 / 12)


def test_every_frame_decodes_in_order(ramp):
    source, data = ramp
    decoded = decode(data, "ramp.mp4", MediaOptions(num_frames=len(source)))
    assert decoded.info["frame_indices"] == list(range(len(source)))
    error = np.abs(decoded.frames.astype(int) - source).mean(axis=(1, 2, 3))
    assert error.max() < 8
    # each decoded frame is nearest to its own source frame, not a neighbour
    means = source.mean(axis=(1, 2, 3))
    nearest = np.abs(decoded.frames.mean(axis=(1, 2, 3))[:, None] - means[None]).argmin(axis=1)
    assert nearest.tolist() == list(range(len(source)))


def test_sampling_runs_over_the_frames_that_decode(ramp):
    source, data = ramp
    damaged = zero_packet(data, 15)  # frame 15's packet: the H.264 decoder rejects it, 29 frames remain
    decoded = decode(damaged, "damaged.mp4", MediaOptions(num_frames=8))
    assert decoded.info["source_frames"] == len(source) - 1
    assert decoded.info["frame_indices"] == np.linspace(0, len(source) - 2, 8).round().astype(int).tolist()
    assert (np.diff(decoded.frames.mean(axis=(1, 2, 3))) > 0).all()
    every = decode(damaged, "damaged.mp4", MediaOptions(num_frames=len(source) - 1))
    # The decodable frames are the other 29, by their timestamps. (Their pixels after the loss are off:
    # each P-frame adds its change to a reference the decoder never had, the brightness lags one step.)
    assert [round(t * 12) for t in every.info["frame_times_s"]] == [i for i in range(len(source)) if i != 15]
    assert (np.diff(every.frames.mean(axis=(1, 2, 3))) > 0).all()
    too_damaged = data
    for index in (5, 10, 15, 20):  # 4 of 30 packets: over the 10% tolerance
        too_damaged = zero_packet(too_damaged, index)
    with pytest.raises(MediaError, match="4 of 30 MP4 video packets could not be decoded") as info:
        decode(too_damaged, "damaged.mp4")
    assert info.value.kind == "corrupt"


def test_fps_sampling_and_max_duration(ramp):
    _, data = ramp  # 30 frames at 12 fps: frame i at i/12 s, last at 2.417 s

    def indices(**kwargs) -> list[int]:
        return decode(data, "ramp.mp4", MediaOptions(**kwargs)).info["frame_indices"]

    assert indices(sampling="fps", fps=2.0, num_frames=8) == [0, 6, 12, 18, 24]  # t = 0, .5, 1, 1.5, 2
    assert indices(sampling="fps", fps=2.0, num_frames=3) == [0, 6, 12]
    assert indices(sampling="fps", fps=5.0, num_frames=4) == [0, 2, 4, 7]  # t = 0.6 shows frame 7 (0.583 s)
    assert indices(sampling="fps", fps=1.0, num_frames=8, max_duration_s=2.0) == [0, 12]
    decoded = decode(data, "ramp.mp4", MediaOptions(num_frames=8, max_duration_s=1.0))
    assert decoded.info["source_frames"] == 12  # frames before t = 1 s
    assert decoded.info["frame_indices"] == np.linspace(0, 11, 8).round().astype(int).tolist()
    assert decoded.info["duration_s"] == pytest.approx(30 / 12)  # of the whole video


def test_gif_timing_and_single_frame_video(corpus):
    directory, _ = corpus
    gif = (directory / "animated.gif").read_bytes()  # 6 frames, 100 ms each, grey level 20 t
    decoded = decode(gif, "a.gif", MediaOptions(sampling="fps", fps=5.0))
    assert decoded.info["frame_indices"] == [0, 2, 4]
    with Image.open(io.BytesIO(gif)) as reference:
        for frame, index in zip(decoded.frames, [0, 2, 4], strict=True):
            reference.seek(index)
            np.testing.assert_array_equal(frame, np.asarray(reference.convert("RGB")))
    assert decoded.info["duration_s"] == pytest.approx(0.6)
    one = decode((directory / "one_frame.mp4").read_bytes(), "one.mp4", MediaOptions(num_frames=4))
    assert one.info["frame_indices"] == [0, 0, 0, 0] and one.info["source_frames"] == 1


def test_max_side_downscales_keeping_the_aspect(ramp, corpus):
    _, data = ramp
    assert decode(data, "ramp.mp4", MediaOptions(max_side=32)).frames.shape == (8, 24, 32, 3)
    directory, _ = corpus
    wide = decode((directory / "wide.png").read_bytes(), "wide.png", MediaOptions(max_side=1000))
    assert wide.frames.shape == (1, 4, 1000, 3) and (wide.info["width"], wide.info["height"]) == (4000, 16)
    small = decode((directory / "one_pixel.png").read_bytes(), "p.png", MediaOptions(max_side=16))
    assert small.frames.shape == (1, 1, 1, 3)  # never upscaled


def test_decord_fallback_is_frame_exact_with_pyav(ramp):
    _, data = ramp
    sniffed = sniffing._sniff(data)
    options = MediaOptions(num_frames=8)
    pyav = videos._decode_video(data, sniffed, options, backend="pyav")
    decord = videos._decode_video(data, sniffed, options, backend="decord")
    assert pyav.info["frame_indices"] == decord.info["frame_indices"]
    np.testing.assert_array_equal(pyav.frames, decord.frames)


def test_decord_is_the_fallback_when_pyav_itself_fails(ramp, monkeypatch):
    _, data = ramp
    expected = decode(data, "ramp.mp4")

    def broken(*args, **kwargs):
        raise IndexError("tuple index out of range")  # the kind of PyAV bug #692 describes

    monkeypatch.setattr(videos, "_pyav_frames", broken)
    fallback = decode(data, "ramp.mp4")
    assert fallback.info["frame_indices"] == expected.info["frame_indices"]
    np.testing.assert_array_equal(fallback.frames, expected.frames)


def test_gif_scan_counts_frames():
    frames = [Image.new("RGB", (8, 8), (80 * i, 0, 0)) for i in range(3)]
    frames[1].putpixel((0, 0), (0, 255, 0))
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=50, transparency=0)
    data = buffer.getvalue()
    assert Image.open(io.BytesIO(data)).n_frames == 3
    assert sniffing._gif_scan(data) == (3, "complete")
    assert sniffing._gif_scan(data + b"trailing junk") == (3, "complete")
    assert sniffing._gif_scan(data[:-1])[1] == "truncated"


# ---------------------------------------------------------------------------------------------------------
# A decoder that hangs or crashes


def _gone(pid: int, within_s: float = 5.0) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


@pytest.fixture(scope="module")
def bad_worker():
    options = MediaOptions(timeout_s=TIMEOUT_S, max_memory_mb=1024)
    with DecodeWorker(options, _decode_fn=misbehaving_decode) as w:
        yield w


@pytest.mark.parametrize("command", ["SLEEP", "SPIN_GIL", "SIGSTOP"])
def test_hanging_decoder_is_killed_and_replaced(bad_worker, ramp, command):
    _, good = ramp
    assert bad_worker.decode(good, "good.mp4").kind == "video"
    pid, restarts = bad_worker._process.pid, bad_worker.restarts
    start = time.monotonic()
    with pytest.raises(MediaError) as info:
        bad_worker.decode(command.encode() + b"\n", "poison.mp4")
    elapsed = time.monotonic() - start
    assert info.value.kind == "decode_timeout"
    assert info.value.message == "decoding took longer than 1 s (timeout_s); the decoder was killed"
    assert TIMEOUT_S <= elapsed < TIMEOUT_S + 3
    assert _gone(pid) and bad_worker.restarts == restarts + 1
    assert bad_worker.decode(good, "good.mp4").frames.shape == (8, 48, 64, 3)


@pytest.mark.parametrize(
    ("command", "needle"),
    [("SIGSEGV", "signal SIGSEGV"), ("NULLPTR", "signal SIGSEGV"), ("ABORT", "signal SIGABRT"), ("EXIT3", "code 3")],
)
def test_crashing_decoder_is_reported_and_replaced(bad_worker, ramp, command, needle):
    _, good = ramp
    bad_worker.decode(good, "good.mp4")
    pid = bad_worker._process.pid
    start = time.monotonic()
    with pytest.raises(MediaError) as info:
        bad_worker.decode(command.encode() + b"\n", "poison.mp4")
    assert time.monotonic() - start < TIMEOUT_S  # noticed at once, not at the timeout
    assert info.value.kind == "decode_crashed" and needle in info.value.message
    assert info.value.message.startswith("the decoder process ")
    assert _gone(pid)
    assert bad_worker.decode(good, "good.mp4").kind == "video"


def test_an_interrupted_call_does_not_leave_its_answer_to_the_next(ramp, corpus):
    _, good = ramp
    directory, _ = corpus
    # A timeout far beyond the slow decode's 5 s, so only the Ctrl-C can end the call, however loaded
    # the machine is; a real SIGINT (not interrupt_main) wakes the parent out of its wait at once.
    # Python's own Ctrl-C handler, whatever was inherited (a shell starts background jobs with SIGINT ignored).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with DecodeWorker(MediaOptions(timeout_s=60), _decode_fn=misbehaving_decode) as worker:
            worker.decode(good, "good.mp4")
            pid = worker._process.pid
            png = (directory / "one_pixel.png").read_bytes()
            timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT))  # Ctrl-C while the child is busy
            timer.start()
            with pytest.raises(KeyboardInterrupt):
                worker.decode(b"SLOW\n" + png, "slow.png")
            timer.join()
            assert _gone(pid)  # its answer (an image) can no longer arrive as the next call's
            assert worker.decode(good, "good.mp4").kind == "video"
    finally:
        signal.signal(signal.SIGINT, previous)


def test_out_of_memory_is_too_large_and_the_decoder_survives(bad_worker, ramp):
    _, good = ramp
    bad_worker.decode(good, "good.mp4")
    pid, restarts = bad_worker._process.pid, bad_worker.restarts
    with pytest.raises(MediaError) as info:
        bad_worker.decode(b"OOM\n", "huge.mp4")
    assert info.value.kind == "too_large" and "max_memory_mb" in info.value.message
    assert bad_worker._process.pid == pid and bad_worker.restarts == restarts  # a MemoryError is catchable
    assert bad_worker.decode(good, "good.mp4").kind == "video"


def test_spawn_start_method_and_close(ramp):
    _, good = ramp
    worker = DecodeWorker(MediaOptions(timeout_s=TIMEOUT_S), start_method="spawn", _decode_fn=misbehaving_decode)
    try:
        assert isinstance(worker.decode(good, "good.mp4"), Decoded)
        with pytest.raises(MediaError, match="SIGSEGV") as info:
            worker.decode(b"SIGSEGV\n", "poison.mp4")
        assert info.value.kind == "decode_crashed"
        assert worker.decode(good, "good.mp4").kind == "video"
        pid = worker._process.pid
    finally:
        worker.close()
    assert worker._process is None and _gone(pid)
    assert worker.decode(good, "good.mp4").kind == "video"  # a closed worker starts a new child on demand
    worker.close()
    copy = pickle.loads(pickle.dumps(worker))  # travels as its settings, e.g. into a Ray actor
    assert (copy.options, copy.start_method, copy._decode_fn) == (worker.options, "spawn", misbehaving_decode)


def test_the_caller_is_still_alive():
    # Every test above ran in this process; being here is the assertion. Make it explicit anyway.
    os.kill(os.getpid(), 0)
    assert signal.getsignal(signal.SIGINT) is SIGINT_AT_IMPORT  # the child's SIG_IGN stayed in the child


def test_decord_option_decodes_the_same_frames(ramp):
    """media.video_decoder=decord (seeking get_batch) picks and decodes the same frames as PyAV."""
    _, data = ramp
    for sampling in (MediaOptions(num_frames=5), MediaOptions(num_frames=4, sampling="fps", fps=3.0)):
        pyav = decode(data, "ramp.mp4", sampling)
        seeking = decode(data, "ramp.mp4", sampling.model_copy(update={"video_decoder": "decord"}))
        assert seeking.info["frame_indices"] == pyav.info["frame_indices"]
        np.testing.assert_array_equal(seeking.frames, pyav.frames)
    with pytest.raises(ValueError, match="video_decoder"):
        MediaOptions(video_decoder="opencv")
