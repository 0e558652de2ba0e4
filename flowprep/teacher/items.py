"""The teacher's work: views cut into work items, and the stored flow an item needs.

* :func:`plan_items` cuts each frame shard's views (in video and grid order) into
  :class:`WorkItem` s of ``views_per_item`` views, so batches span videos and a shard's items,
  hence its batches, are the same in any run (resume reproduces the bytes);
* :func:`read_windows` reads the stored flow an item needs, each frame once: ``[F, H, W, 2]``
  per video and, per view, the rows of its clip.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from flowprep.clips import clip_indices
from flowprep.shards.reader import ShardReader
from flowprep.teacher.views import View, ViewGrid

# Views per work item, rounded to whole batches: about 11 starts of the default grid, 240 flow
# frames (40 MB at 256x340) read once for 64 model inputs.
ITEM_VIEWS = 64


def views_per_item(batch_size: int) -> int:
    """:data:`ITEM_VIEWS` rounded to whole batches of ``batch_size``."""
    return batch_size * max(1, round(ITEM_VIEWS / batch_size))


@dataclass(frozen=True)
class Segment:
    """Consecutive views of one video of ``positions`` flow positions, in grid order."""

    video_id: str
    positions: int
    views: tuple[View, ...]


@dataclass(frozen=True)
class WorkItem:
    """Views of one frame shard's videos. ``last``: the shard's final item, which also carries
    ``unviewable``, the shard's videos that have no view, as ``(video_id, reason)``."""

    shard: str
    segments: tuple[Segment, ...]
    last: bool = False
    unviewable: tuple[tuple[str, str], ...] = ()


@dataclass
class FlowWindows:
    """What the model needs for one segment: ``frames`` ``[F, H, W, 2]`` stored flow (uint8 or
    float16) and ``rows`` ``[V, T]``, for each view, the rows of ``frames`` that make its clip;
    or ``error``."""

    segment: Segment
    frames: np.ndarray | None = None
    rows: np.ndarray | None = None
    error: str | None = None


def plan_items(reader: ShardReader, shards: Iterable[str], grid: ViewGrid, per_item: int) -> Iterator[WorkItem]:
    """The work items of ``shards``, ``per_item`` views each, in order; every shard ends with a
    ``last`` item (empty when none of its videos has a view)."""
    by_shard: dict[str, list[str]] = {}
    for video_id in reader.video_ids:
        by_shard.setdefault(reader.meta(video_id)["shard"], []).append(video_id)
    for shard in shards:
        segments: list[Segment] = []
        unviewable: list[tuple[str, str]] = []
        for video_id in by_shard.get(shard, []):
            meta = reader.meta(video_id)
            positions = meta["num_frames"] - 1
            try:
                views = grid.views(positions, meta["height"], meta["width"])
            except ValueError as e:
                unviewable.append((video_id, str(e)))
                continue
            first = 0
            while first < len(views):
                room = per_item - sum(len(s.views) for s in segments)
                segments.append(Segment(video_id, positions, tuple(views[first : first + room])))
                first += room
                if sum(len(s.views) for s in segments) == per_item:
                    yield WorkItem(shard, tuple(segments))
                    segments = []
        yield WorkItem(shard, tuple(segments), last=True, unviewable=tuple(unviewable))


def read_windows(reader: ShardReader, item: WorkItem, grid: ViewGrid) -> list[FlowWindows]:
    """Read the stored flow of ``item``'s views, each frame once per segment."""
    windows = []
    for segment in item.segments:
        clips = np.stack([clip_indices(segment.positions, grid.clip_len, grid.frame_stride, v.start) for v in segment.views])
        needed = np.unique(clips)
        try:
            frames = reader.flow_at(segment.video_id, needed.tolist(), raw=True)
        except (OSError, ValueError, IndexError, KeyError) as e:
            windows.append(FlowWindows(segment, error=f"{type(e).__name__}: {e}"))
            continue
        windows.append(FlowWindows(segment, frames, np.searchsorted(needed, clips)))
    return windows


def views_to_compute(reader: ShardReader, shards: Iterable[str], grid: ViewGrid) -> int:
    """Views of the videos of ``shards`` (a video too small for the crop has none), counted from the grid."""
    todo = set(shards)
    total = 0
    for video_id in reader.video_ids:
        meta = reader.meta(video_id)
        if meta["shard"] in todo:
            try:
                total += grid.count(meta["num_frames"] - 1, meta["height"], meta["width"])
            except ValueError:  # too small for the crop: no view
                pass
    return total
