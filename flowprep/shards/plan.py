"""Which videos go into which shard, decided before any video is decoded.

Shards are cut by input position from each video's *estimated* stored size, so that any number of
writers, on any machines, can each write whole shards at once and still produce the very shards a
single process would: the plan depends only on the input and the options, never on timing.

A video's estimate is its output frames (from the container's duration and frame rate, the trim
segment and ``max_frames``) times its output pixels (``short_side`` scaling of the coded size)
times the bytes a pixel takes in its codecs (:data:`BYTES_PER_PIXEL`, measured on real clips:
docs/benchmarks.md). A shard takes videos in input order until its estimate reaches
``shard_size``; content makes real sizes differ from the estimate by tens of percent per video,
much less over the dozens of videos of a shard.

The plan is stored with the output (``plan.parquet``), so that a resumed run writes exactly the
shards the first run planned; videos the input gains later are planned into new shards after it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow as pa

from flowprep.codec import Codec
from flowprep.decode import VideoDecoder, output_size
from flowprep.errors import DecodeError
from flowprep.pipeline import ExtractConfig
from flowprep.sources import VideoSpec

# Stored bytes per output pixel and frame, by codec name: RGB (jpeg at q95, its usual quality) and
# uint8 flow (both x and y); float16 flow is stored at 4 bytes a pixel, barely compressed.
BYTES_PER_PIXEL = {
    "rgb": {"jpeg": 0.31, "jpeg-rst": 0.32, "yuv420:lz4": 1.1, "yuv420:zstd": 0.88, "yuv420:raw": 1.5, "png": 1.7, "zstd": 2.3,
            "raw": 3.0},
    "flow": {"jpeg": 0.1, "png": 0.32, "zstd": 0.3, "raw": 2.0},
}
UNKNOWN_DURATION = 10.0  # seconds assumed when the container does not say (a Kinetics clip)
PROBE_THREADS = 16  # containers opened at once to plan shards (header reads: I/O bound)

PLAN_SCHEMA = pa.schema([("video_id", pa.string()), ("shard", pa.int64()), ("estimated_bytes", pa.int64())])


@dataclass(frozen=True)
class ShardPlan:
    """Shard ``number``: its ``videos`` in input order."""

    number: int
    videos: tuple[VideoSpec, ...]


def bytes_per_frame_pixel(config: ExtractConfig) -> float:
    """Estimated stored bytes per output pixel and frame, RGB plus flow, for ``config``'s codecs."""
    codec = Codec.parse(config.rgb_codec)
    rgb = BYTES_PER_PIXEL["rgb"][f"yuv420:{codec.packing}" if codec.packing else codec.name]
    if not config.has_flow:
        return rgb
    flow = 4.0 if config.flow_dtype == "float16" else BYTES_PER_PIXEL["flow"][Codec.parse(config.flow_codec).name]
    return rgb + flow


@dataclass(frozen=True)
class VideoSize:
    """What a video's container header says its output will be: ``frames`` frames of ``height x
    width`` pixels (after the ``short_side`` scaling), each decoded from a source frame of
    ``source_pixels`` (its coded width x height). A header that cannot be read gives all 0 and
    its ``error``: such a video fails when decoded, storing nothing."""

    frames: int
    height: int
    width: int
    source_pixels: int
    error: str | None = None

    @property
    def pixels(self) -> int:
        """Output pixels over all frames."""
        return self.frames * self.height * self.width


def probe_size(spec: VideoSpec, config: ExtractConfig) -> VideoSize:
    """The :class:`VideoSize` of ``spec`` under ``config``, from its container's header alone (no
    frame is decoded): frames from the duration (or the trim segment) at ``config.fps``, capped by
    ``max_frames``."""
    try:
        with VideoDecoder(spec.path, decoder_threads=1) as video:
            info = video.info
    except DecodeError as e:
        return VideoSize(0, 0, 0, 0, str(e))
    start = spec.start or 0.0
    end = spec.end if spec.end is not None else (info.duration if info.duration else start + UNKNOWN_DURATION)
    frames = max(int((end - start) * config.fps), 0)
    if config.max_frames is not None:
        frames = min(frames, config.max_frames)
    height, width = output_size(info.height, info.width, config.short_side)
    return VideoSize(frames, height, width, info.height * info.width)


def probe_sizes(specs: Sequence[VideoSpec], config: ExtractConfig) -> dict[str, VideoSize]:
    """:func:`probe_size` of each of ``specs``, by video id, ``PROBE_THREADS`` headers at a time."""
    with ThreadPoolExecutor(PROBE_THREADS) as pool:  # FFmpeg opens files without the GIL
        return dict(zip((spec.video_id for spec in specs), pool.map(lambda spec: probe_size(spec, config), specs)))


def estimate_bytes(size: VideoSize, config: ExtractConfig) -> int:
    """The estimated stored bytes of a video of ``size`` under ``config``'s codecs."""
    return int(size.pixels * bytes_per_frame_pixel(config))


def plan_shards(videos: Sequence[tuple[VideoSpec, int]], shard_size: int, first_number: int = 0) -> list[ShardPlan]:
    """Cut ``(spec, estimated bytes)`` pairs, in order, into shards numbered from ``first_number``:
    each takes videos until its estimate reaches ``shard_size`` (a video is never split)."""
    plans: list[ShardPlan] = []
    current: list[VideoSpec] = []
    total = 0
    for spec, estimate in videos:
        current.append(spec)
        total += estimate
        if total >= shard_size:
            plans.append(ShardPlan(first_number + len(plans), tuple(current)))
            current, total = [], 0
    if current:
        plans.append(ShardPlan(first_number + len(plans), tuple(current)))
    return plans


def plan_table(plans: Iterable[ShardPlan], estimates: dict[str, int]) -> pa.Table:
    """The stored form of ``plans``: one row per video (``PLAN_SCHEMA``)."""
    rows = [{"video_id": spec.video_id, "shard": plan.number, "estimated_bytes": estimates[spec.video_id]}
            for plan in plans for spec in plan.videos]
    return pa.Table.from_pylist(rows, schema=PLAN_SCHEMA)


def replan(table: pa.Table, specs: Sequence[VideoSpec], estimates: dict[str, int], shard_size: int,
           after: int = -1) -> list[ShardPlan]:
    """The stored plan ``table`` over today's ``specs``: its shards as planned (with the specs of
    their videos still in the input), then the videos it does not hold, planned from ``estimates``
    (which need only cover those) into new shards numbered after both ``table``'s last shard and
    ``after`` (a number already taken elsewhere, which a new shard must never reuse)."""
    by_id = {spec.video_id: spec for spec in specs}
    planned: dict[int, list[VideoSpec]] = {}
    for row in table.to_pylist():
        planned.setdefault(row["shard"], [])
        if row["video_id"] in by_id:
            planned[row["shard"]].append(by_id.pop(row["video_id"]))
    plans = [ShardPlan(number, tuple(videos)) for number, videos in sorted(planned.items())]
    new = [(spec, estimates[spec.video_id]) for spec in specs if spec.video_id in by_id]
    return plans + plan_shards(new, shard_size, first_number=max(plans[-1].number if plans else -1, after) + 1)
