"""Write videos, chunk by chunk, into shard files of about ``shard_size`` bytes.

Videos go in the order they are given and a video never spans two shards, so the same input and
options give the same shard files byte for byte, and a resumed run continues exactly where the
killed one's last complete shard ended.

A shard is written by :func:`open_shard` (a shard file on a :class:`~flowprep.storage.Storage`,
taking chunks) and :func:`commit_shard` (its index part, which makes it part of the output):
nothing else, so any process that holds a shard's chunks can write it.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pyarrow as pa

from flowprep.pipeline import ExtractConfig, VideoChunk
from flowprep.shards.layout import (
    ARROW_RGB_SHARD_SCHEMA,
    ARROW_SHARD_SCHEMA,
    SHARDS,
    shard_name,
    update_checksum,
    write_index_part,
)
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


def open_shard(store: Storage, shard: str, config: ExtractConfig, metadata: dict[str, str]) -> ArrowShardFile | HDF5ShardFile:
    """A new shard file ``shard`` (a relative name, :func:`~flowprep.shards.layout.shard_name`)
    in ``config.format``, not part of the output until :func:`commit_shard`."""
    sink = store.open_output(shard)
    if config.format == "arrow":
        return ArrowShardFile(sink, metadata, config.has_flow)
    return HDF5ShardFile(sink, metadata, config.chunk_frames, config.has_flow)


def commit_shard(store: Storage, shard: str, rows: list[dict]) -> None:
    """Make the closed shard file ``shard`` part of the output, with its videos' index ``rows``:
    its index part (recording its size) is written after the shard is complete, and then a local
    shard is renamed from ``.partial``."""
    write_index_part(store, shard, rows, store.size(store.staged(shard)))
    store.publish(shard)


class ShardWriter:
    """Appends videos to the current shard and closes it once it reaches ``config.shard_size``.

    Use per video: :meth:`begin_video`, :meth:`add_chunk` for each chunk in order, then
    :meth:`end_video` (returns its index row) or :meth:`abort_video`. ``before_commit`` is called
    with each complete shard's relative name just before it is committed (what must be durable
    before the shard counts), ``on_shard_complete`` with its name and index rows after.
    """

    def __init__(
        self,
        out: str | Path | Storage,
        config: ExtractConfig,
        first_shard: int = 0,
        metadata: dict[str, str] | None = None,
        before_commit: Callable[[str], None] | None = None,
        on_shard_complete: Callable[[str, list[dict]], None] | None = None,
    ):
        self.storage = storage(out)
        self.config = config
        self._metadata = metadata or {}
        self._next_shard = first_shard
        self._before_commit = before_commit
        self._on_shard_complete = on_shard_complete
        self._file: ArrowShardFile | HDF5ShardFile | None = None
        self._shard: str | None = None
        self._rows: list[dict] = []
        self._bytes = 0
        self._video: dict | None = None
        self.storage.makedirs(SHARDS)

    def _open_shard(self) -> None:
        self._shard = shard_name(self._next_shard, self.config.format)
        self._next_shard += 1
        self._file = open_shard(self.storage, self._shard, self.config, self._metadata)
        self._rows, self._bytes = [], 0

    def begin_video(self, row: dict) -> None:
        """Start a video; ``row`` holds its index fields known before decoding (id, label, source...)."""
        if self._file is None:
            self._open_shard()
        offset = self._file.begin_video(row["video_id"])
        self._video = {**row, "shard": self._shard, "shard_offset": offset, "num_frames": 0, "bytes": 0, "_sha": hashlib.sha256()}

    def add_chunk(self, chunk: VideoChunk) -> None:
        video = self._video
        if chunk.start != video["num_frames"]:
            raise ValueError(f"{video['video_id']}: chunk starts at frame {chunk.start}, expected {video['num_frames']}")
        self._file.add(video["video_id"], chunk)
        update_checksum(video["_sha"], chunk.rgb, chunk.flow)
        size = sum(map(len, chunk.rgb)) + sum(map(len, chunk.flow))
        video["bytes"] += size
        video["num_frames"] += len(chunk.rgb)
        video.update(height=chunk.height, width=chunk.width, source_fps=chunk.source.fps,
                     source_duration=chunk.source.duration, source_codec=chunk.source.codec,
                     source_stream=chunk.source.stream, corrupt_frames=chunk.corrupt_frames)
        self._bytes += size

    def end_video(self) -> dict:
        """Finish the video; returns its index row. Closes the shard when it is full."""
        row = self._video
        row["checksum"] = row.pop("_sha").hexdigest()
        self._rows.append(row)
        self._video = None
        if self._bytes >= self.config.shard_size:
            self._close_shard()
        return row

    def abort_video(self) -> str:
        """Drop the video begun last (a failure part-way); it gets no index row. Returns the shard
        it was in: a rerun redoes the failure only if that shard was not completed."""
        self._file.abort_video(self._video["video_id"])
        self._video = None
        return self._shard

    def _close_shard(self) -> None:
        self._file.close()
        self._file = None
        if not self._rows:  # every video in it failed
            self.storage.delete(self.storage.staged(self._shard))
            self._next_shard -= 1
            return
        if self._before_commit:
            self._before_commit(self._shard)
        commit_shard(self.storage, self._shard, self._rows)
        if self._on_shard_complete:
            self._on_shard_complete(self._shard, self._rows)

    def close(self) -> None:
        """Close the last shard (if any video went into it)."""
        if self._file is not None:
            self._close_shard()
