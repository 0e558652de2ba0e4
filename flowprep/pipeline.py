"""The per-video stages, as plain functions over iterators: decode -> chunk -> flow -> encode.

A video is processed as a stream of :class:`VideoChunk` of at most ``chunk_frames`` frames, so
memory per video is bounded whatever its length. Each chunk decodes one frame beyond its own
(the next chunk's first) so that flow ``t`` (frame ``t`` to ``t + 1``) is stored in the same row
as RGB frame ``t``: N frames give N-1 flows, and the last frame has none.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Iterator
from dataclasses import dataclass, field

import cv2
import numpy as np

from flowprep.codec import RGB_ONLY, Codec, quantize_flow
from flowprep.decode import SourceInfo, VideoDecoder
from flowprep.errors import DecodeError, FlowError, OptionError, VideoError
from flowprep.flow import FlowBackend, check_flow_options
from flowprep.sources import VideoSpec

# ``--flow none``: RGB-only shards, no flow solver run (docs/format.md).
NO_FLOW = "none"


@dataclass(frozen=True)
class ExtractConfig:
    """Every option that changes the bytes written; recorded in dataset.json.

    ``fps`` frames/s; ``short_side`` pixels; ``flow_bound`` pixels (flow is clipped to ±bound);
    ``flow_dtype`` ``"uint8"`` (quantized) or ``"float16"``; codecs as in :mod:`flowprep.codec`;
    ``shard_size`` bytes; ``chunk_frames`` frames per stored batch; ``fail_corrupt``: a video with
    a frame FFmpeg flags as corrupt fails (stage ``decode``) instead of being written with a warning.
    ``flow_backend`` ``NO_FLOW`` (``"none"``) writes RGB only; it takes no ``flow_params``, and the
    other flow options, unused, are recorded as given.
    Every value is checked here, the flow backend and its parameters included: a bad one raises
    :class:`OptionError` naming the field, before any file is written.
    """

    fps: int = 25
    short_side: int = 256
    max_frames: int | None = None
    trim: bool = False
    flow_backend: str = "opencv"
    flow_params: dict = field(default_factory=dict)
    flow_bound: float = 20.0
    flow_dtype: str = "uint8"
    rgb_codec: str = "jpeg-rst:95"
    flow_codec: str = "zstd:3"
    format: str = "arrow"
    shard_size: int = 1 << 30
    chunk_frames: int = 8
    fail_corrupt: bool = False

    def __post_init__(self):
        for option, least in (("fps", 1), ("short_side", 1), ("max_frames", 2), ("shard_size", 1), ("chunk_frames", 1)):
            value = getattr(self, option)
            if value is None and option == "max_frames":  # no limit
                continue
            if not (isinstance(value, numbers.Integral) and value >= least):
                rule = "a positive whole number" if least == 1 else f"a whole number >= {least}"
                raise OptionError(f"{option} must be {rule}, not {value!r}", option)
        if not (isinstance(self.flow_bound, numbers.Real) and math.isfinite(self.flow_bound) and self.flow_bound > 0):
            raise OptionError(f"flow_bound must be a positive finite number of pixels, not {self.flow_bound!r}", "flow_bound")
        if self.flow_dtype not in ("uint8", "float16"):
            raise OptionError(f"flow dtype must be uint8 or float16, not {self.flow_dtype!r}", "flow_dtype")
        for option in ("rgb_codec", "flow_codec"):
            try:
                Codec.parse(getattr(self, option))
            except ValueError as e:
                raise OptionError(f"{option}: {e}", option) from None
        if Codec.parse(self.flow_codec).name in RGB_ONLY:
            raise OptionError(f"{self.flow_codec} stores RGB frames only; flow takes zstd:L, png:L, jpeg:Q or raw", "flow_codec")
        if Codec.parse(self.flow_codec).name not in ("zstd", "raw") and self.flow_dtype == "float16":
            raise OptionError(f"float16 flow needs a zstd or raw codec, not {self.flow_codec}", "flow_codec")
        if self.format not in ("arrow", "hdf5"):
            raise OptionError(f"format must be arrow or hdf5, not {self.format!r}", "format")
        if not self.has_flow:
            if self.flow_params:
                raise OptionError(f"--flow {NO_FLOW} computes no flow: it takes no flow parameters, not {self.flow_params}",
                                  "flow_params")
        else:
            check_flow_options(self.flow_backend, self.flow_params)

    @property
    def has_flow(self) -> bool:
        """Whether the run computes and stores flow (every backend but ``NO_FLOW``)."""
        return self.flow_backend != NO_FLOW

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class VideoChunk:
    """Frames ``[start, start + len(rgb))`` of one video.

    ``rgb``: encoded ``[H, W, 3] uint8`` frames. ``gray``: ``[n, H, W] uint8`` frames for the flow
    solver, one more than ``rgb`` unless ``last``; dropped (``None``) once flow is computed, and
    never made for an RGB-only run. ``flow``: encoded ``[H, W, 2]`` flows, one per RGB frame
    except the video's last frame; ``None`` while pending, ``[]`` for an RGB-only run.
    ``corrupt_frames``: source frames FFmpeg flagged as corrupt in the video so far, up to this
    chunk's end (the last chunk's is the video's count).
    """

    video_id: str
    start: int
    rgb: list[bytes]
    gray: np.ndarray | None
    height: int
    width: int
    source: SourceInfo
    last: bool
    flow: list[bytes] | None = None
    corrupt_frames: int = 0


def decode_chunks(spec: VideoSpec, config: ExtractConfig, decoder_threads: int = 0) -> Iterator[VideoChunk]:
    """Decode ``spec`` into chunks of ``config.chunk_frames`` frames with RGB encoded, flow pending
    (or, for an RGB-only ``config``, none to come: the chunks are ready to write).

    ``decoder_threads``: FFmpeg's threads (0: its own choice, one per core). Raises
    :class:`DecodeError` for unreadable videos, for videos of fewer than 2 frames and, with
    ``config.fail_corrupt``, for videos with a frame FFmpeg flags as corrupt.
    """
    try:
        yield from _decode_chunks(spec, config, decoder_threads)
    except VideoError:
        raise
    except Exception as e:  # any library error on one bad file fails that video, not the run
        raise DecodeError(f"{type(e).__name__}: {e}") from e


def _decode_chunks(spec: VideoSpec, config: ExtractConfig, decoder_threads: int) -> Iterator[VideoChunk]:
    rgb_codec = Codec.parse(config.rgb_codec)
    n = config.chunk_frames
    with VideoDecoder(spec.path, decoder_threads) as video:
        frames = video.frames(config.fps, config.short_side, spec.start, spec.end, config.max_frames)
        rgb: list[bytes] = []
        gray: list[np.ndarray] = []
        start = 0
        shape = None

        def chunk(last: bool) -> VideoChunk:
            if config.fail_corrupt and video.corrupt_frames:
                raise DecodeError(f"{video.corrupt_frames} source frame(s) flagged corrupt by FFmpeg before output frame "
                                  f"{start + len(rgb)} (fail_corrupt is set)")
            gray_frames, flow = (np.stack(gray), None) if config.has_flow else (None, [])
            return VideoChunk(spec.video_id, start, rgb, gray_frames, *shape, video.info, last, flow,
                              corrupt_frames=video.corrupt_frames)

        for frame in frames:
            if config.has_flow:
                gray.append(cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY))
            if len(rgb) == n:
                # This frame is the next chunk's first; it closes this chunk's last flow pair.
                yield chunk(last=False)
                start += n
                rgb, gray = [], gray[-1:]
            if shape is None:
                shape = frame.shape[:2]
            elif frame.shape[:2] != shape:
                raise DecodeError(f"frame size changed mid-stream from {shape} to {frame.shape[:2]}")
            rgb.append(rgb_codec.encode(frame))
        if start + len(rgb) < 2:  # RGB-only runs too: they hold the same videos as a run with flow
            raise DecodeError(f"{start + len(rgb)} frame(s) decoded{_segment_note(spec, video.info)}: flow needs at least 2")
        yield chunk(last=True)


def _segment_note(spec: VideoSpec, info: SourceInfo) -> str:
    """Where the frames were looked for, when the video is trimmed: the segment, and why it may hold none."""
    if spec.start is None or spec.end is None:
        return ""
    segment = f" from the trim segment [{spec.start:g}, {spec.end:g}) s"
    if spec.end <= spec.start:
        return f"{segment}, which ends before it starts (time_end <= time_start)"
    return f"{segment} of a {info.duration:g} s video" if info.duration is not None else segment


def flow_chunk(chunk: VideoChunk, backend: FlowBackend, config: ExtractConfig) -> VideoChunk:
    """Compute, quantize and encode the chunk's flow; returns the chunk with ``flow`` set, ``gray`` dropped."""
    codec = Codec.parse(config.flow_codec)
    try:
        flow = backend.compute(chunk.gray)
    except VideoError:
        raise
    except Exception as e:
        raise FlowError(f"{backend.name}: {type(e).__name__}: {e}") from e
    expected = len(chunk.rgb) - 1 if chunk.last else len(chunk.rgb)
    if flow.shape != (expected, chunk.height, chunk.width, 2):
        raise FlowError(f"backend {backend.name} returned {flow.shape}, expected {(expected, chunk.height, chunk.width, 2)}")
    if not np.isfinite(flow).all():
        raise FlowError(f"backend {backend.name} returned non-finite flow")
    stored = quantize_flow(flow, config.flow_bound) if config.flow_dtype == "uint8" else flow.astype(np.float16)
    return dataclasses.replace(chunk, gray=None, flow=[codec.encode(f) for f in stored])


def video_chunks(spec: VideoSpec, config: ExtractConfig, backend: FlowBackend | None) -> Iterator[VideoChunk]:
    """All of ``spec``'s chunks, flow included, in one process (the stages composed without Ray).
    ``backend``: ``None`` for an RGB-only ``config``, whose decoded chunks are complete."""
    for chunk in decode_chunks(spec, config):
        yield chunk if backend is None else flow_chunk(chunk, backend, config)
