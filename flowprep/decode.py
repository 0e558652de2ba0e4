"""Decode a video with PyAV into RGB frames at a fixed rate and size, streaming.

Frames are resampled by presentation timestamp: output frame ``k`` shows the source frame on
screen at ``origin + k / fps`` (the last source frame whose timestamp is at or before that
instant). This is exact rational arithmetic on the stream's time base, so 30, 50 or 60 fps to 25
picks the right frames, 15 to 25 repeats frames, and variable frame rate sources come out evenly
spaced. Rotation metadata (the display matrix) and non-square pixels are applied before resizing.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction

import av
import cv2
import numpy as np

from flowprep.errors import DecodeError


@dataclass(frozen=True)
class SourceInfo:
    """What the source container says about its video stream.

    ``fps`` is the stream's average rate (frames/s), ``duration`` seconds (``None`` when the
    container does not say), ``width``/``height`` the coded size in pixels before rotation,
    ``stream`` the index of the stream used among all the container's streams (see
    :func:`best_video_stream`).
    """

    codec: str
    fps: float
    duration: float | None
    width: int
    height: int
    stream: int = 0


def output_size(height: int, width: int, short_side: int) -> tuple[int, int]:
    """``(height, width)`` with the short side scaled to ``short_side``, aspect ratio kept."""
    if height <= width:
        return short_side, max(1, int(width * short_side / height + 0.5))
    return max(1, int(height * short_side / width + 0.5)), short_side


def resize_short_side(image: np.ndarray, short_side: int) -> np.ndarray:
    """Resize ``[H, W, C]`` so that ``min(H, W) == short_side``: area interpolation when shrinking
    (no aliasing), bilinear when enlarging (as I3D's preprocessing upscales small videos)."""
    h, w = image.shape[:2]
    nh, nw = output_size(h, w, short_side)
    if (nh, nw) == (h, w):
        return image
    interpolation = cv2.INTER_AREA if nh < h else cv2.INTER_LINEAR
    return cv2.resize(image, (nw, nh), interpolation=interpolation)


def _to_rgb(frame: av.VideoFrame, short_side: int, sar: Fraction | None) -> np.ndarray:
    rgb = frame.to_ndarray(format="rgb24")
    if sar and sar != 1:
        # Non-square pixels: stretch to the display aspect before the short-side resize.
        h, w = rgb.shape[:2]
        rgb = cv2.resize(rgb, (max(1, round(w * sar)), h), interpolation=cv2.INTER_LINEAR)
    quarter_turns = round((frame.rotation or 0) / 90) % 4
    if quarter_turns:
        # frame.rotation is how far the display turns the picture counter-clockwise.
        rgb = np.ascontiguousarray(np.rot90(rgb, quarter_turns))
    return resize_short_side(rgb, short_side)


def best_video_stream(container: av.container.InputContainer) -> av.VideoStream | None:
    """The video stream the ``ffmpeg`` command line picks: the largest picture that is not an
    attached picture (cover art), the first of equal ones; ``None`` when there is none.

    (``ffmpeg`` also favours a stream flagged ``default``, but muxers flag the first stream so
    whatever it holds, which would pick a small preview track over the video.)
    """
    def area(stream: av.VideoStream) -> int:
        ctx = stream.codec_context  # None when FFmpeg knows no codec for it
        return ctx.width * ctx.height if ctx is not None else 0

    pictures = [s for s in container.streams.video if not s.disposition & av.stream.Disposition.attached_pic]
    return max(pictures, key=area, default=None)


class VideoDecoder:
    """An open video file; use as a context manager.

    ``info`` describes the source and its chosen stream (:func:`best_video_stream`); :meth:`frames`
    streams resampled RGB frames, counting in ``corrupt_frames`` the source frames that FFmpeg
    flags as corrupt (``frame.is_corrupt``: damaged data it concealed). Opening raises
    :class:`DecodeError` with a readable reason for empty files, files FFmpeg cannot read and
    files without a video stream.
    """

    def __init__(self, path: str, decoder_threads: int = 0):
        if not os.path.exists(path):
            raise DecodeError(f"file not found: {path}")
        if os.path.getsize(path) == 0:
            raise DecodeError("empty file (0 bytes)")
        try:
            self._container = av.open(path)
        except av.FFmpegError as e:
            raise DecodeError(f"FFmpeg cannot open it: {e}") from None
        stream = best_video_stream(self._container)
        if stream is None:
            self._container.close()
            raise DecodeError("no video stream" + (" (only an attached picture)" if self._container.streams.video else ""))
        self._stream = stream
        self.corrupt_frames = 0
        ctx = self._stream.codec_context
        if ctx is None:  # e.g. an mp4 whose moov atom is cut short: FFmpeg knows no codec for it
            self._container.close()
            raise DecodeError("video stream has no decodable codec (truncated or unsupported file?)")
        if decoder_threads:
            ctx.thread_count = decoder_threads
        ctx.thread_type = "AUTO"
        duration = None
        if self._stream.duration is not None:
            duration = float(self._stream.duration * self._stream.time_base)
        elif self._container.duration is not None:
            duration = self._container.duration / av.time_base
        self.info = SourceInfo(
            codec=ctx.name,
            fps=float(self._stream.average_rate or self._stream.guessed_rate or 0),
            duration=duration,
            width=ctx.width,
            height=ctx.height,
            stream=stream.index,
        )

    def __enter__(self) -> VideoDecoder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._container.close()

    def _frame_duration(self, frame: av.VideoFrame, previous_gap: Fraction | None) -> Fraction:
        if frame.duration:
            return frame.duration * self._stream.time_base
        if self._stream.average_rate:
            return 1 / Fraction(self._stream.average_rate)
        return previous_gap or Fraction(1, 25)

    def frames(
        self,
        fps: int | Fraction = 25,
        short_side: int = 256,
        start: float | None = None,
        end: float | None = None,
        max_frames: int | None = None,
    ) -> Iterator[np.ndarray]:
        """Yield ``[H, W, 3] uint8`` RGB frames at ``fps``, short side ``short_side`` pixels.

        ``start``/``end`` are seconds from the stream's first timestamp; frames are never all held
        in memory. Raises :class:`DecodeError` when FFmpeg fails part-way.
        """
        stream, time_base = self._stream, self._stream.time_base
        step = 1 / Fraction(fps)
        first = Fraction(stream.start_time or 0) * time_base
        # Seconds through their decimal text, so that 0.3 means 3/10 and not the float just below it.
        origin = first + Fraction(str(start)) if start else None
        stop = first + Fraction(str(end)) if end is not None else None
        if origin is not None:
            self._container.seek(int(origin / time_base), stream=stream, backward=True, any_frame=False)
        k = 0
        previous: av.VideoFrame | None = None
        previous_time: Fraction | None = None
        previous_gap: Fraction | None = None
        converted: tuple[av.VideoFrame, np.ndarray] | None = None

        def finished() -> bool:
            return (stop is not None and origin + k * step >= stop) or (max_frames is not None and k >= max_frames)

        def emit_until(limit: Fraction) -> Iterator[np.ndarray]:
            # Emit every output instant before `limit` from the frame on screen until then.
            nonlocal k, converted
            while origin + k * step < limit and not finished():
                if converted is None or converted[0] is not previous:
                    converted = (previous, _to_rgb(previous, short_side, stream.sample_aspect_ratio))
                yield converted[1]
                k += 1

        try:
            for frame in self._container.decode(stream):
                self.corrupt_frames += frame.is_corrupt
                if frame.pts is None:
                    continue
                t = frame.pts * time_base
                if previous_time is not None and t <= previous_time:
                    continue  # a repeated or backwards timestamp carries no new instant
                if origin is None:
                    origin = t
                if previous is not None:
                    yield from emit_until(t)
                    previous_gap = t - previous_time
                    if finished():
                        return
                previous, previous_time = frame, t
        except av.FFmpegError as e:
            raise DecodeError(f"decoder error after {k} frames: {e}") from None
        if previous is not None:
            yield from emit_until(previous_time + self._frame_duration(previous, previous_gap))
