"""Read frames back from an output folder, either format, by (video, frame range)."""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import cv2
import h5py
import numpy as np
import pyarrow as pa

from flowprep.codec import Codec, dequantize_flow
from flowprep.jpeg import crop_jpeg
from flowprep.shards.layout import (
    DATASET_JSON,
    INDEX,
    SCHEMA_VERSION,
    complete_shards,
    has_flow,
    parse_table,
    read_dataset_json,
    update_checksum,
)
from flowprep.storage import Storage, storage


class ShardReader:
    """Random access to the videos of an extract output folder.

    The index is read on first use and shard files are opened when first needed, once per process
    (a handle never crosses a fork). Arrow shards are memory-mapped, or on object storage
    (``s3://``, ``gs://``) read by ranged requests: opening a shard fetches its footer, reading a
    frame range fetches only the record batches holding those frames, never the whole shard.
    ``out`` is the output's path or URI (:mod:`flowprep.storage`); the connection is made per process.

    A frame whose stored bytes do not decode to the stored shape is a ``ValueError`` naming the
    shard, the video and the frame. A flipped byte that still decodes (inside JPEG data, say) is
    found only by the checksum: with ``verify=True`` each video's stored bytes are checked against
    the index checksum the first time any of its frames is read, in this process. That costs one
    read of all of the video's stored bytes and sha256 over them (about 1 GB/s on one core): about
    10 ms for a 10 s clip at the defaults (~10 MB), before the frames asked for, once per video.

    ``has_flow`` is ``False`` for an output extracted with ``--flow none``: its shards hold RGB
    only, and asking for flow is a ``ValueError``.

    >>> reader = ShardReader("out/")
    >>> rgb = reader.rgb(reader.video_ids[0], 0, 16)    # [16, H, W, 3] uint8
    >>> flow = reader.flow(reader.video_ids[0], 0, 16)  # [16, H, W, 2] float32, pixels
    """

    max_open_shards = 64

    def __init__(self, out: str | Path | Storage, verify: bool = False):
        self.storage = storage(out)
        self.out = self.storage.location  # a Path, or a Uri for object storage
        if not self.storage.exists(DATASET_JSON):
            raise FileNotFoundError(f"{self.out} is not a flowprep output folder: {DATASET_JSON} is missing")
        self.dataset: dict = read_dataset_json(self.storage)
        if self.dataset.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(f"{self.out / DATASET_JSON}: schema version {self.dataset.get('schema_version')}, this flowprep reads {SCHEMA_VERSION}")
        params = self.dataset["params"]
        self.format: str = params["format"]
        self.chunk_frames: int = params["chunk_frames"]
        self.flow_bound: float = params["flow_bound"]
        self.flow_dtype = np.dtype(params["flow_dtype"])
        self.has_flow: bool = has_flow(self.dataset)
        self._rgb_codec = Codec.parse(params["rgb_codec"])
        self._flow_codec = Codec.parse(params["flow_codec"])
        self._rows: dict[str, dict] | None = None
        self._files: OrderedDict[str, object] = OrderedDict()
        self._pid = os.getpid()
        self.verify = verify
        self._verified: set[str] = set()
        # The columns this process has read frames of: how a training job shows it never read flow.
        self.columns_read: set[str] = set()

    @property
    def _index(self) -> dict[str, dict]:
        if self._rows is None:
            path = self.out / INDEX
            if not self.storage.exists(INDEX):
                if complete_shards(self.storage):
                    raise FileNotFoundError(f"{path} is missing: rerun the extract command (same options) to rebuild it from the shards")
                raise FileNotFoundError(f"{path} is missing: no shard of this output is complete yet")
            table = parse_table(self.storage.read_bytes(INDEX))
            self._rows = {row["video_id"]: row for row in table.to_pylist()}
        return self._rows

    @property
    def video_ids(self) -> list[str]:
        """Every written video, in shard order."""
        return list(self._index)

    @property
    def label_map(self) -> dict[str, int]:
        return self.dataset["label_map"]

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, video_id: str) -> bool:
        return video_id in self._index

    def meta(self, video_id: str) -> dict:
        """The video's index row (a copy): label, label_index, num_frames, height, width, fps, source, ..."""
        return dict(self._row(video_id))

    def _row(self, video_id: str) -> dict:
        try:
            return self._index[video_id]
        except KeyError:
            raise KeyError(f"no video {video_id!r} in {self.out}") from None

    def _shard(self, shard: str):
        if self._pid != os.getpid():  # forked: the parent's handles are not ours to use
            self._files, self._pid = OrderedDict(), os.getpid()
        if shard in self._files:
            self._files.move_to_end(shard)
            return self._files[shard]
        path = self.out / shard
        if not self.storage.exists(shard):
            raise FileNotFoundError(f"shard {path} is missing: a rerun of the extract command (same options) extracts its videos again")
        damaged = f"`flowprep verify {self.out} --repair` drops it, then a rerun of the extract command extracts its videos again"
        try:
            handle = pa.ipc.open_file(self.storage.open_input(shard)) if self.format == "arrow" else h5py.File(path, "r")
        except pa.ArrowInvalid as e:
            raise OSError(f"shard {path} is corrupt or truncated ({e}): {damaged}") from None
        except OSError as e:
            if e.errno is not None:  # out of file handles, no permission: not the file's fault
                raise
            raise OSError(f"shard {path} is corrupt or truncated ({e}): {damaged}") from None
        self._files[shard] = handle
        if len(self._files) > self.max_open_shards:  # random access over thousands of shards
            _, oldest = self._files.popitem(last=False)
            if isinstance(oldest, h5py.File):
                oldest.close()
        return handle

    def blobs(self, video_id: str, column: str, indices: Sequence[int]) -> list:
        """The stored bytes of frames ``indices`` of ``column`` (``"rgb"`` or ``"flow"``), as buffers
        (zero-copy views of the memory-mapped file for Arrow)."""
        if column == "flow":
            self.require_flow()
        row = self._row(video_id)
        length = row["num_frames"] - (column == "flow")
        bad = [i for i in indices if not 0 <= i < length]
        if bad:
            raise IndexError(f"{video_id}: {column} frame {bad[0]} out of range [0, {length})")
        if self.verify and video_id not in self._verified:
            if self.checksum(video_id) != row["checksum"]:
                raise ValueError(f"{self.out / row['shard']}: {video_id}: stored bytes do not match the index checksum "
                                 f"(`flowprep verify {self.out} --repair` drops the damaged shard)")
            self._verified.add(video_id)
        self.columns_read.add(column)
        return self._blobs(row, video_id, column, indices)

    def checksum(self, video_id: str) -> str:
        """sha256 (hex) over the video's stored bytes as the index ``checksum`` is defined
        (:func:`~flowprep.shards.layout.update_checksum`): what it is now, to compare."""
        row = self._row(video_id)
        n = row["num_frames"]
        sha = hashlib.sha256()
        flow = self._blobs(row, video_id, "flow", range(n - 1)) if self.has_flow else []
        update_checksum(sha, self._blobs(row, video_id, "rgb", range(n)), flow)
        return sha.hexdigest()

    def require_flow(self) -> None:
        """Raise ``ValueError`` unless this output holds flow (``has_flow``)."""
        if not self.has_flow:
            raise ValueError(f"{self.out} was extracted with --flow none: it holds no flow")

    def _blobs(self, row: dict, video_id: str, column: str, indices: Sequence[int]) -> list:
        shard = self._shard(row["shard"])
        if self.format == "hdf5":
            dataset = shard[f"videos/{video_id}/{column}"]
            if len(indices) > 1 and list(indices) == list(range(indices[0], indices[-1] + 1)):
                return list(dataset[indices[0] : indices[-1] + 1])
            return [dataset[i] for i in indices]
        # Slices of each batch's data buffer by its offsets: a pyarrow scalar per frame costs more
        # than decoding a crop of it.
        columns: dict[int, tuple[memoryview, list[int]]] = {}
        blobs = []
        for i in indices:
            b = i // self.chunk_frames
            if b not in columns:
                array = shard.get_batch(row["shard_offset"] + b).column(column)
                _, offsets, data = array.buffers()
                columns[b] = memoryview(data), np.frombuffer(offsets, np.int32)[array.offset :].tolist()
            data, offsets = columns[b]
            j = i % self.chunk_frames
            blobs.append(data[offsets[j] : offsets[j + 1]])
        return blobs

    def _decode(self, video_id: str, column: str, indices: Sequence[int], codec: Codec, channels: int, dtype,
                window: tuple[slice, slice] | None, planar: bool = False) -> np.ndarray:
        """Frames ``[T, h, w, C]``, or ``[C, T, h, w]`` when ``planar``: each decoded frame is split
        straight into the planes, so no transpose of the clip follows."""
        row = self._row(video_id)
        shape = (row["height"], row["width"], channels)
        window = window or (slice(None), slice(None))
        blobs = self.blobs(video_id, column, indices)
        size = (len(range(shape[0])[window[0]]), len(range(shape[1])[window[1]]))
        out = np.empty((channels, len(blobs), *size) if planar else (len(blobs), *size, channels), dtype)
        split = planar and dtype == np.uint8  # OpenCV's split writes uint8 planes in place
        for i, (index, blob) in enumerate(zip(indices, blobs)):
            try:
                frame = codec.decode(blob, shape, dtype, window)
            except (ValueError, OSError) as e:
                raise ValueError(f"{self.out / row['shard']}: {video_id} {column} frame {index}: {e}") from None
            if split:
                cv2.split(frame, [out[c, i] for c in range(channels)])
            elif planar:
                out[:, i] = np.moveaxis(frame, -1, 0)
            else:
                out[i] = frame
        return out

    def _range(self, video_id: str, start: int, stop: int | None, length: int) -> range:
        stop = length if stop is None else stop
        if not 0 <= start <= stop <= length:
            raise IndexError(f"{video_id}: frames [{start}, {stop}) out of range [0, {length})")
        return range(start, stop)

    def rgb(self, video_id: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """RGB frames ``[start, stop)`` as ``[T, H, W, 3] uint8``."""
        return self.rgb_at(video_id, self._range(video_id, start, stop, self._row(video_id)["num_frames"]))

    def rgb_at(self, video_id: str, indices: Sequence[int], window: tuple[slice, slice] | None = None,
               planar: bool = False) -> np.ndarray:
        """RGB frames at ``indices`` (any order, repeats allowed) as ``[T, H, W, 3] uint8``, or
        ``[3, T, H, W]`` when ``planar``; ``window`` (rows, columns) crops each frame as it is
        decoded (``jpeg-rst`` and ``yuv420`` frames decode only around it)."""
        return self._decode(video_id, "rgb", indices, self._rgb_codec, 3, np.uint8, window, planar)

    def rgb_jpegs(self, video_id: str, indices: Sequence[int], window: tuple[slice, slice]) -> list[tuple[bytes, tuple[slice, slice]]]:
        """For decoding elsewhere (nvJPEG on the training GPU): the stored JPEG of each RGB frame at
        ``indices``, cut to the MCUs around ``window`` for ``jpeg-rst`` frames, each with where the
        window lies in it (:func:`flowprep.jpeg.crop_jpeg`). ``ValueError`` unless RGB is JPEG."""
        if not self._rgb_codec.name.startswith("jpeg"):
            raise ValueError(f"{self.out} stores RGB as {self._rgb_codec}: only JPEG frames can be decoded elsewhere")
        row = self._row(video_id)
        cut = []
        for index, blob in zip(indices, self.blobs(video_id, "rgb", indices)):
            try:
                jpeg, inside = crop_jpeg(blob, window)
            except ValueError as e:
                raise ValueError(f"{self.out / row['shard']}: {video_id} rgb frame {index}: {e}") from None
            cut.append((bytes(jpeg), inside))
        return cut

    def flow(self, video_id: str, start: int = 0, stop: int | None = None, raw: bool = False) -> np.ndarray:
        """Flows ``[start, stop)`` (flow t: frame t to t + 1) as ``[T, H, W, 2] float32`` pixels.

        ``raw=True`` returns the stored values instead: uint8 ``q`` (pixels = ``q * 2b / 255 - b``)
        or float16. ``ValueError`` for an output without flow (``has_flow``).
        """
        self.require_flow()  # before the range check, whose length would mean nothing here
        return self.flow_at(video_id, self._range(video_id, start, stop, self._row(video_id)["num_frames"] - 1), raw)

    def flow_at(self, video_id: str, indices: Sequence[int], raw: bool = False,
                window: tuple[slice, slice] | None = None, planar: bool = False) -> np.ndarray:
        """Flows at ``indices`` as ``[T, H, W, 2]`` (``[2, T, H, W]`` when ``planar``): float32
        pixels, or the stored values with ``raw``; ``window`` (rows, columns) crops each flow as it
        is decoded. ``ValueError`` for an output without flow (``has_flow``; :meth:`blobs` checks)."""
        stored = self._decode(video_id, "flow", indices, self._flow_codec, 2, self.flow_dtype, window, planar)
        if raw:
            return stored
        if self.flow_dtype == np.uint8:
            return dequantize_flow(stored, self.flow_bound)
        return stored.astype(np.float32)

    def __getstate__(self) -> dict:
        # Open files stay with the process that opened them; a pickled reader (DataLoader with
        # spawn) opens its own (and its own connection to object storage: Storage pickles without).
        return {**self.__dict__, "_files": OrderedDict()}

    def close(self) -> None:
        for f in self._files.values():
            if isinstance(f, h5py.File):
                f.close()
        self._files = OrderedDict()

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def spread_indices(length: int, count: int) -> np.ndarray:
    """Up to ``count`` distinct indices spread evenly over ``[0, length)``, first and last included."""
    return np.unique(np.linspace(0, length - 1, min(count, length)).round().astype(int))
