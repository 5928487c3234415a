"""Camera frames in video files, decoded and encoded with PyAV (`pip install av`, mmfm's `video` extra).

LeRobot data sets store a camera as MP4 (mmfm.embodied.lerobot). Reading picks, for each time asked for, the decoded
frame nearest it, within a tolerance; decoding runs once over the span asked for (one episode), keeping only the
frames picked.
"""

from __future__ import annotations

import itertools
import os
from fractions import Fraction
from pathlib import Path
from typing import Callable, Iterable, Iterator, TypeVar

import numpy as np

from mmfm.data.manifest import DataError

# lerobot's defaults for a camera (lerobot.configs.video.VideoEncoderConfig): AV1 by SVT-AV1, 4:2:0, a keyframe every
# 2 frames, quality 30, the fastest preset
CODEC, PIX_FMT = "libsvtav1", "yuv420p"
CODEC_OPTIONS = {"g": "2", "crf": "30", "preset": "12"}

T = TypeVar("T")


class UnusableFrames(Exception):
    """An episode's frames that cannot be had, and why: "bad_video" (the video file is missing or does not decode),
    "missing_frames" (a time without a decoded frame within the tolerance)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def pyav():
    """The av module, or a one-line error saying how to install it."""
    try:
        import av
    except ImportError:
        raise DataError("decoding or encoding video needs PyAV, which is not installed: pip install av (or pip "
                        "install 'mmfm[video]')") from None
    return av


def frames_at(path: Path, times: Iterable[float], tolerance: float, convert: Callable[[object], T]) -> list[T]:
    """For each of `times` (seconds in the file), convert(the decoded av.VideoFrame nearest it), which must lie within
    `tolerance` seconds; UnusableFrames when a time has no such frame ("missing_frames") or the file is missing or
    does not decode ("bad_video")."""
    av = pyav()
    times = np.asarray(list(times), dtype=np.float64)
    if not path.is_file():
        raise UnusableFrames("bad_video", f"{path} is missing")
    if not len(times) or not np.isfinite(times).all():
        raise UnusableFrames("missing_frames", f"frame times {times[:3].tolist()}... are not all numbers")
    best, picked = np.full(len(times), np.inf), [None] * len(times)
    try:
        for time, frame in _decoded(av, path, times.min() - tolerance, times.max() + tolerance):
            distance = np.abs(times - time)
            nearer = np.flatnonzero((distance <= tolerance) & (distance < best))
            value = convert(frame) if len(nearer) else None  # converted at once: no decoded frame is kept
            for i in nearer:
                best[i], picked[i] = distance[i], value
    except (av.FFmpegError, OSError) as exc:
        why = getattr(exc, "strerror", None) or exc  # PyAV's message without the file name again
        raise UnusableFrames("bad_video", f"{path} does not decode ({type(exc).__name__}: {why})") from None
    missing = np.flatnonzero(np.isinf(best))
    if len(missing):
        raise UnusableFrames("missing_frames", f"{path} has no frame within {tolerance:.4g} s of "
                                              f"{times[missing[0]]:.4g} s (the episode's frame {missing[0]}; "
                                              f"{len(missing)} such)")
    return picked


def _decoded(av, path: Path, start: float, end: float) -> Iterator[tuple[float, object]]:
    """(time in seconds, frame) of the video's frames from the keyframe before `start` up to the first past `end`."""
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise UnusableFrames("bad_video", f"{path} has no video stream")
        stream = container.streams.video[0]
        if start > 0:
            container.seek(int(start / stream.time_base), stream=stream, backward=True, any_frame=False)
        for frame in container.decode(stream):
            if frame.pts is None:
                continue
            yield float(frame.pts * stream.time_base), frame
            if frame.pts * stream.time_base > end:
                return


def rgb(frame) -> np.ndarray:
    """A decoded frame as RGB uint8 [H, W, 3]."""
    return frame.to_ndarray(format="rgb24")


def write_video(path: Path, frames: Iterable[np.ndarray], fps: int) -> dict:
    """RGB uint8 [H, W, 3] frames as an MP4 with lerobot's camera settings, frame i at i / fps seconds; returns
    lerobot's `info` of a video feature."""
    av = pyav()
    os.environ.setdefault("SVT_LOG", "1")  # SVT-AV1 prints its settings at each start unless told: errors only
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = iter(frames)
    first = next(frames)
    height, width = first.shape[:2]
    with av.open(str(path), "w") as container:
        stream = container.add_stream(CODEC, rate=fps, options=CODEC_OPTIONS)
        stream.pix_fmt, stream.height, stream.width = PIX_FMT, height, width
        for i, image in enumerate(itertools.chain([first], frames)):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, fps)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())  # the frames the encoder still holds
    return {"video.height": height, "video.width": width, "video.codec": "av1", "video.pix_fmt": PIX_FMT,
            "video.is_depth_map": False, "video.fps": fps, "video.channels": 3, "has_audio": False}
