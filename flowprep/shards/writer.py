"""Write the shards of a plan (:mod:`flowprep.shards.plan`), chunk by chunk.

A shard holds the videos its plan gives, in that order, so the same input and options give the
same shard files byte for byte wherever each shard is written, and a resumed run writes again
exactly the shards that were not complete.

A shard is written by :func:`write_shard` (a shard file on a :class:`~flowprep.storage.Storage`,
from its videos' chunks: in any process, a Ray worker's included) and made part of the output by
:func:`commit_shard` (its index part; the run's driver does it).
"""

from __future__ import annotations

import hashlib
import io
import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import pyarrow as pa

from flowprep.errors import VideoError
from flowprep.pipeline import ExtractConfig, VideoChunk
from flowprep.shards.layout import ARROW_RGB_SHARD_SCHEMA, ARROW_SHARD_SCHEMA, shard_name, update_checksum, write_index_part
from flowprep.shards.plan import ShardPlan
from flowprep.sources import VideoSpec
from flowprep.storage import Storage, storage


class ArrowShardFile:
    """An Arrow IPC file: one record batch per chunk (``ARROW_SHARD_SCHEMA``, or
    ``ARROW_RGB_SHARD_SCHEMA`` without ``has_flow``)."""

    def __init__(self, sink: pa.NativeFile, metadata: dict[str, str], has_flow: bool):
        self._sink = sink
        self._schema = ARROW_SHARD_SCHEMA if has_flow else ARROW_RGB_SHARD_SCHEMA
        self._writer = pa.ipc.new_file(self._sink, self._schema.with_metadata(metadata))
        self.batches = 0

    def begin_video(self, video_id: str) -> int:
        return self.batches

    def add(self, video_id: str, chunk: VideoChunk) -> None:
        n = len(chunk.rgb)
        columns = [pa.array([video_id] * n), pa.array(range(chunk.start, chunk.start + n), pa.int32()), pa.array(chunk.rgb, pa.binary())]
        if "flow" in self._schema.names:
            columns.append(pa.array(chunk.flow + [None] * (n - len(chunk.flow)), pa.binary()))
        self._writer.write_batch(pa.record_batch(columns, schema=self._schema))
        self.batches += 1

    def abort_video(self, video_id: str) -> None:
        pass  # its batches stay in the file, unreferenced by the index

    def close(self) -> None:
        self._writer.close()
        self._sink.close()


class HDF5ShardFile:
    """An HDF5 file: group ``videos/<video_id>`` with datasets ``rgb`` and ``flow`` (``rgb`` alone
    without ``has_flow``), each a chunked 1-D array of encoded frames (variable-length uint8),
    ``flow`` one shorter than ``rgb``.

    The file is built in memory and written to ``sink`` when closed: libhdf5 cannot stop cleanly
    when a write fails (a full disk crashed the process inside it), while Python's own write
    raises an ``OSError`` that the run reports in one line, leaving the output resumable. It costs
    the shard's size in memory (``--shard-size`` plus at most one video).
    """

    def __init__(self, sink: pa.NativeFile, metadata: dict[str, str], chunk_frames: int, has_flow: bool):
        self._sink = sink
        self._columns = ("rgb", "flow") if has_flow else ("rgb",)
        self._image = io.BytesIO()
        # Without timestamps and with a fixed format version, equal content gives equal bytes.
        self._file = h5py.File(self._image, "w", libver=("v110", "v110"), track_order=True)
        self._file.attrs.update(metadata)
        self._videos = self._file.create_group("videos", track_order=True)
        self._chunk_frames = chunk_frames
        self.count = 0

    def begin_video(self, video_id: str) -> int:
        group = self._videos.create_group(video_id)
        blob = h5py.vlen_dtype(np.uint8)
        for name in self._columns:
            group.create_dataset(name, shape=(0,), maxshape=(None,), dtype=blob, chunks=(self._chunk_frames,), track_times=False)
        self.count += 1
        return self.count - 1

    def add(self, video_id: str, chunk: VideoChunk) -> None:
        group = self._videos[video_id]
        stored = {"rgb": chunk.rgb, "flow": chunk.flow}
        for name in self._columns:
            blobs = stored[name]
            if not blobs:  # a video's last chunk may be one frame, without a flow
                continue
            ds = group[name]
            n = ds.shape[0]
            ds.resize((n + len(blobs),))
            ds[n:] = [np.frombuffer(b, np.uint8) for b in blobs]

    def abort_video(self, video_id: str) -> None:
        del self._videos[video_id]
        self.count -= 1

    def close(self) -> None:
        self._file.close()
        with self._sink:
            self._sink.write(self._image.getbuffer())
        self._image = None


def open_shard(store: Storage, staged: str, config: ExtractConfig, metadata: dict[str, str]) -> ArrowShardFile | HDF5ShardFile:
    """A new shard file in ``config.format`` under the staged name ``staged``
    (:meth:`~flowprep.storage.Storage.staged`), not part of the output until :func:`commit_shard`."""
    sink = store.open_output(staged)
    if config.format == "arrow":
        return ArrowShardFile(sink, metadata, config.has_flow)
    return HDF5ShardFile(sink, metadata, config.chunk_frames, config.has_flow)


def commit_shard(store: Storage, result: ShardResult) -> None:
    """Make the closed shard file of ``result`` part of the output, with its videos' index rows:
    its index part (recording its size) is written after the shard is complete, and then a local
    shard is renamed from the staged name its writer used. Only that writer's file is published:
    another attempt at the same shard (one thought lost that still runs) writes a file of its own."""
    write_index_part(store, result.shard, result.rows, store.size(result.staged))
    store.publish(result.staged, result.shard)


@dataclass
class ShardResult:
    """What writing one shard gave: ``shard`` (its relative name), ``staged`` (the name its file was
    written under: closed but not yet committed; ``None`` when not ``written`` at all), the index
    ``rows`` of its videos and the ``failures`` (``failures.jsonl`` entries) of those that failed,
    both in input order."""

    shard: str
    staged: str | None
    rows: list[dict] = field(default_factory=list)
    failures: list[dict] = field(default_factory=list)
    written: bool = True


def failure(spec: VideoSpec, stage: str, error: str, shard: str | None) -> dict:
    """A ``failures.jsonl`` entry."""
    return {"video_id": spec.video_id, "source": spec.path, "stage": stage, "error": error, "shard": shard}


def write_shard(out: str | Path | Storage, plan: ShardPlan, config: ExtractConfig, label_map: dict[str, int],
                metadata: dict[str, str], videos: Iterable[tuple[VideoSpec, Iterable[VideoChunk]]],
                on_video: Callable[[dict | None], None] | None = None) -> ShardResult:
    """Write shard ``plan.number`` of ``out`` from ``videos``, the ``(spec, chunks)`` of the plan's
    videos in order (chunks in frame order; a failing video raises :class:`VideoError` from its
    chunks, is left out and recorded). The file is closed, not committed (:func:`commit_shard`).
    ``on_video`` gets each video's index row as it is written (``None`` when it failed)."""
    store = storage(out)
    shard = shard_name(plan.number, config.format)
    result = ShardResult(shard, store.staged(shard))  # this attempt's own file
    file = open_shard(store, result.staged, config, metadata)
    for spec, chunks in videos:
        offset = file.begin_video(spec.video_id)
        row = {"video_id": spec.video_id, "label": spec.label, "label_index": label_map.get(spec.label, -1), "split": spec.split,
               "shard": shard, "shard_offset": offset, "num_frames": 0, "fps": config.fps, "source": spec.path,
               "segment_start": spec.start, "segment_end": spec.end, "bytes": 0}
        sha = hashlib.sha256()
        try:
            for chunk in chunks:
                if chunk.start != row["num_frames"]:
                    raise ValueError(f"{spec.video_id}: chunk starts at frame {chunk.start}, expected {row['num_frames']}")
                file.add(spec.video_id, chunk)
                update_checksum(sha, chunk.rgb, chunk.flow)
                row["bytes"] += sum(map(len, chunk.rgb)) + sum(map(len, chunk.flow))
                row["num_frames"] += len(chunk.rgb)
                row.update(height=chunk.height, width=chunk.width, source_fps=chunk.source.fps, source_duration=chunk.source.duration,
                           source_codec=chunk.source.codec, source_stream=chunk.source.stream, corrupt_frames=chunk.corrupt_frames)
        except VideoError as e:
            file.abort_video(spec.video_id)
            result.failures.append(failure(spec, e.stage, str(e), shard))
            if on_video:
                on_video(None)
            continue
        row["checksum"] = sha.hexdigest()
        result.rows.append(row)
        if on_video:
            on_video(row)
    file.close()
    return result


def write_in_order(out: str | Path | Storage, plans: Iterable[ShardPlan], config: ExtractConfig, label_map: dict[str, int],
                   metadata: dict[str, str], videos: Iterator[tuple[VideoSpec, Iterable[VideoChunk]]],
                   on_video: Callable[[dict | None], None] | None = None) -> Iterator[tuple[ShardPlan, ShardResult]]:
    """Write ``plans`` one after the other in this process from ``videos``, the ``(spec, chunks)``
    of every planned video in plan order; yield each plan with its :class:`ShardResult`."""
    for plan in plans:
        yield plan, write_shard(out, plan, config, label_map, metadata, itertools.islice(videos, len(plan.videos)), on_video)


def lost_shard(plan: ShardPlan, config: ExtractConfig, error: str) -> ShardResult:
    """The result of a shard that could not be written (its worker lost too often): every video
    failed at stage ``worker``. It is not committed, so the next run writes it again."""
    shard = shard_name(plan.number, config.format)
    return ShardResult(shard, None, failures=[failure(spec, "worker", error, None) for spec in plan.videos], written=False)
