"""Teacher targets on disk: the one place that names their files and fields, the writer and the reader.

::

    <out>/teachers/<name>/teacher.json                 model, checkpoint, options, grid, sources, versions
    <out>/teachers/<name>/index.parquet                one row per video (TARGET_INDEX_SCHEMA)
    <out>/teachers/<name>/failures.jsonl               one JSON object per video without targets
    <out>/teachers/<name>/shards/shard-00000.arrow     the targets of the videos of <out>/shards/shard-00000.*
    <out>/teachers/<name>/shards/shard-00000.parquet   the index rows of that target shard, its size and sha256

A target shard is an Arrow IPC file of one record batch (whatever the frame shards' format): one
row per view (``video_id, start, top, left, flip``, then each output as a fixed-size list of
float16), a video's views contiguous and in :class:`~flowprep.teacher.views.ViewGrid` order. Its
schema metadata holds the teacher.json entries it was made under. It is published like a frame
shard (index part first, then the file renamed from its staged name), so a visible target shard
is always whole; its recorded size and sha256 are checked when a run resumes and by ``flowprep
verify``, and the reader checks that each row it serves is the view asked for.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa

from flowprep.shards.layout import DATASET_JSON, INDEX, SHARDS, TEACHER_JSON, TEACHERS, parse_table, write_index_part, write_table
from flowprep.shards.reader import ShardReader
from flowprep.storage import Storage, storage
from flowprep.teacher.views import View, ViewGrid

TEACHER_SCHEMA_VERSION = 2  # 2: target shards always .arrow; index parts record size and sha256

TARGET_INDEX_SCHEMA = pa.schema(
    [
        ("video_id", pa.string()),
        ("shard", pa.string()),  # path relative to the teacher folder
        ("row", pa.int64()),  # the video's first view
        ("views", pa.int32()),
        ("positions", pa.int32()),  # flow positions of the video (num_frames - 1)
        ("height", pa.int32()),
        ("width", pa.int32()),
    ]
)
VIEW_FIELDS = [("video_id", pa.string()), ("start", pa.int32()), ("top", pa.int32()), ("left", pa.int32()), ("flip", pa.bool_())]


def teacher_dir(out: str | Path, name: str) -> Path:
    """``out/teachers/name``; a ValueError for an output on object storage (targets are local)."""
    if not storage(out).local:
        raise ValueError(f"teacher targets need a local --shards folder: {out} is on object storage")
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"teacher name {name!r} must be a plain folder name")
    return Path(out) / TEACHERS / name


def teacher_storage(out: str | Path | Storage, name: str) -> Storage:
    """Where teacher ``name`` of ``out`` is, for reading: a local folder or an object storage prefix."""
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"teacher name {name!r} must be a plain folder name")
    store = storage(out)
    return storage(store / f"{TEACHERS}/{name}")


def target_shard(frame_shard: str) -> str:
    """The target shard of a frame shard: ``shards/shard-00000.arrow`` for ``shards/shard-00000.h5`` too."""
    return f"{SHARDS}/{Path(frame_shard).stem}.arrow"


def list_teachers(out: str | Path) -> list[str]:
    """Names of the teachers of an output folder that have a teacher.json."""
    store = storage(out)
    return [name for name, kind in store.entries(TEACHERS) if kind == "dir" and store.exists(f"{TEACHERS}/{name}/{TEACHER_JSON}")]


def target_schema(outputs: dict[str, int], metadata: dict[str, str] | None = None) -> pa.Schema:
    """The view columns, then ``name: fixed_size_list<float16>[dim]`` for each output."""
    fields = VIEW_FIELDS + [(name, pa.list_(pa.float16(), dim)) for name, dim in outputs.items()]
    return pa.schema(fields, metadata=metadata)


def source_checksums(reader: ShardReader) -> dict[str, str]:
    """What the targets were computed from: sha256 of the shards' dataset.json and of the
    ``video_id checksum`` lines of ``reader``'s index (so re-extracted frames show as a change)."""
    rows = sorted((reader.meta(v) for v in reader.video_ids), key=lambda r: r["video_id"])
    lines = "".join(f"{r['video_id']} {r['checksum']}\n" for r in rows)
    return {"dataset_json_sha256": hashlib.sha256(reader.storage.read_bytes(DATASET_JSON)).hexdigest(),
            "index_sha256": hashlib.sha256(lines.encode()).hexdigest()}


def write_target_shard(folder: Storage, shard: str, views: list[tuple[str, View]], outputs: dict[str, np.ndarray],
                       schema: pa.Schema, index_rows: list[dict]) -> None:
    """Publish a target shard: ``views`` (video id, view) in row order and ``outputs`` name ->
    ``[rows, dim]`` float16; its index part first, so the shard is visible only once indexed."""
    columns = [pa.array([v[0] for v in views], pa.string())]
    columns += [pa.array([v[1][i] for v in views], schema.field(i + 1).type) for i in range(4)]
    for name, values in outputs.items():
        dim = schema.field(name).type.list_size
        columns.append(pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), pa.float16()), dim))
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, schema) as writer:
        writer.write_batch(pa.record_batch(columns, schema=schema))
    data = sink.getvalue().to_pybytes()
    folder.makedirs(str(Path(shard).parent))
    write_index_part(folder, shard, index_rows, len(data), TARGET_INDEX_SCHEMA, hashlib.sha256(data).hexdigest())
    folder.write(shard, data)


class TeacherTargets:
    """Random access to the stored targets of teacher ``name`` of output folder ``out`` (a local
    folder or an object storage prefix).

    >>> targets = TeacherTargets("out/", "flow_i3d")
    >>> view = targets.views(video_id)[0]                  # View(start, top, left, flip)
    >>> targets.get(video_id, *view)["logits"]             # [C] float32

    Target shards are opened once per process (memory-mapped when local); a lookup is a dict
    access and arithmetic on the view grid (no search), a check that the row holds that view,
    then a copy of a few hundred bytes. A file that cannot be read is a ValueError naming it.
    """

    def __init__(self, out: str | Path | Storage, name: str):
        self.store = teacher_storage(out, name)
        self.folder = self.store.location
        path = self.folder / TEACHER_JSON
        if not self.store.exists(TEACHER_JSON):
            raise FileNotFoundError(f"{storage(out)} has no teacher {name!r} ({path} is missing); teachers there: "
                                    f"{', '.join(list_teachers(out)) or 'none'}")
        try:
            self.description: dict = json.loads(self.store.read_bytes(TEACHER_JSON))
            if self.description.get("schema_version") != TEACHER_SCHEMA_VERSION:
                raise ValueError(f"schema version {self.description.get('schema_version')}, this flowprep reads "
                                 f"{TEACHER_SCHEMA_VERSION} (rerun flowprep teacher with --overwrite)")
            params = self.description["params"]
            self.grid = ViewGrid(**params["grid"])
            self.outputs: dict[str, int] = dict(params["outputs"])
        except (ValueError, KeyError, TypeError, AttributeError) as e:  # JSON errors are ValueErrors
            raise ValueError(f"{path} is not a teacher description flowprep can read: {type(e).__name__}: {e}") from None
        self.name = name
        self._rows: dict[str, dict] | None = None
        self._columns: dict[str, dict[str, np.ndarray]] = {}
        self._pid = os.getpid()

    @property
    def _index(self) -> dict[str, dict]:
        if self._rows is None:
            try:
                table = parse_table(self.store.read_bytes(INDEX)) if self.store.exists(INDEX) else None
            except (OSError, ValueError) as e:
                raise ValueError(f"{self.folder / INDEX} cannot be read ({e}): run `flowprep verify` on the output") from None
            self._rows = {r["video_id"]: r for r in table.to_pylist()} if table is not None else {}
        return self._rows

    @property
    def video_ids(self) -> list[str]:
        return list(self._index)

    def __len__(self) -> int:
        return len(self._index)

    @property
    def total_views(self) -> int:
        """Views stored, over every video (from the index)."""
        return sum(row["views"] for row in self._index.values())

    def __contains__(self, video_id: str) -> bool:
        return video_id in self._index

    def _video(self, video_id: str) -> dict:
        try:
            return self._index[video_id]
        except KeyError:
            raise KeyError(f"teacher {self.name!r} has no targets for {video_id!r}") from None

    def views(self, video_id: str) -> list[View]:
        """The video's views, in row order."""
        row = self._video(video_id)
        return self.grid.views(row["positions"], row["height"], row["width"])

    def centre(self, video_id: str) -> View:
        """The grid view nearest to the evaluation clip (centre start, centre crop, unflipped)."""
        return self.eval_views(video_id, 1)[0]

    def eval_views(self, video_id: str, clips: int) -> list[View]:
        """The stored views that ``clips`` evaluation clips take (:meth:`ViewGrid.eval_views`)."""
        row = self._video(video_id)
        return self.grid.eval_views(row["positions"], row["height"], row["width"], clips)

    def stored_views(self, video_id: str) -> list[tuple]:
        """What the video's rows of its target shard hold: ``(video_id, start, top, left, flip)``
        each, in row order (equal to its :meth:`views` in a whole folder)."""
        video = self._video(video_id)
        columns = self._shard(video["shard"])
        rows = range(video["row"], video["row"] + video["views"])
        if rows.stop > len(columns["video_id"]):
            raise ValueError(f"{self.folder / video['shard']}: {video_id}'s rows {rows.start}-{rows.stop - 1} are past its end")
        return [(columns["video_id"][r], *(int(columns[k][r]) for k in ("start", "top", "left")), bool(columns["flip"][r]))
                for r in rows]

    def get(self, video_id: str, start: int, top: int, left: int, flip: bool) -> dict[str, np.ndarray]:
        """Every output of one view, name -> ``[dim]`` float32. ``KeyError`` for a view off the
        grid; ``ValueError`` when the stored row is not that view (the files do not match)."""
        video = self._video(video_id)
        view = View(start, top, left, bool(flip))
        row = video["row"] + self.grid.row(view, video["positions"], video["height"], video["width"])
        columns = self._shard(video["shard"])
        if row >= len(columns["video_id"]):
            raise ValueError(f"{self.folder / video['shard']}: row {row} of {video_id} is past its end: the targets do not "
                             "match their index; run `flowprep verify --repair` and flowprep teacher again")
        stored = (columns["video_id"][row], *(int(columns[k][row]) for k in ("start", "top", "left")), bool(columns["flip"][row]))
        if stored != (video_id, *view):
            raise ValueError(f"{self.folder / video['shard']}: row {row} holds view {stored}, not {(video_id, *view)}: "
                             "the targets do not match their index; run `flowprep verify --repair` and flowprep teacher again")
        return {name: columns[name][row].astype(np.float32) for name in self.outputs}

    def _shard(self, shard: str) -> dict[str, np.ndarray]:
        if self._pid != os.getpid():  # forked: open the files again in this process
            self._columns, self._pid = {}, os.getpid()
        if shard not in self._columns:
            try:
                batch = pa.ipc.open_file(self.store.open_input(shard)).get_batch(0)
                # Zero-copy [rows, dim] float16 views of the mapped file; the view columns as numpy.
                columns = {name: batch.column(name).values.to_numpy(zero_copy_only=True).reshape(-1, dim)
                           for name, dim in self.outputs.items()}
                columns["video_id"] = np.asarray(batch.column("video_id").to_pylist(), dtype=object)
                columns.update({k: batch.column(k).to_numpy(zero_copy_only=False) for k in ("start", "top", "left", "flip")})
            except (OSError, ValueError, KeyError) as e:  # pyarrow's ArrowInvalid is a ValueError
                raise ValueError(f"{self.folder / shard} cannot be read ({type(e).__name__}: {e}): run `flowprep verify "
                                 "--repair` on the output and flowprep teacher again") from None
            self._columns[shard] = columns
        return self._columns[shard]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_columns": {}}
