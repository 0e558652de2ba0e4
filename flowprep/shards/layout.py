"""The on-disk layout of an output folder: the one place that names its files and fields.

::

    <out>/dataset.json                   parameters, versions, label map (SCHEMA_VERSION)
    <out>/index.parquet                  one row per written video (INDEX_SCHEMA)
    <out>/failures.jsonl                 one JSON object per failed video
    <out>/shards/shard-00000.arrow|.h5   complete shards
    <out>/shards/shard-00000.parquet     the index rows of that shard

A shard is written as ``<name>.partial`` and renamed when complete, after its index rows; so a
shard file without ``.partial`` is always whole and indexed, and anything ``.partial`` is the
leftover of a killed run, deleted when the next run starts.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA_VERSION = 1
DATASET_JSON = "dataset.json"
INDEX = "index.parquet"
FAILURES = "failures.jsonl"
SHARDS = "shards"
PARTIAL = ".partial"
SHARD_SUFFIX = {"arrow": ".arrow", "hdf5": ".h5"}
_SHARD_NAME = re.compile(r"shard-(\d{5,})\.(arrow|h5)$")

INDEX_SCHEMA = pa.schema(
    [
        ("video_id", pa.string()),
        ("label", pa.string()),
        ("label_index", pa.int32()),  # -1 when unlabeled
        ("split", pa.string()),
        ("shard", pa.string()),  # path relative to the output folder
        ("shard_offset", pa.int64()),  # Arrow: first record batch; HDF5: order of the video's group
        ("num_frames", pa.int32()),  # RGB frames; flows are num_frames - 1
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("fps", pa.int32()),
        ("source", pa.string()),
        ("source_fps", pa.float64()),
        ("source_duration", pa.float64()),
        ("source_codec", pa.string()),
        ("segment_start", pa.float64()),  # seconds into the source, when trimmed
        ("segment_end", pa.float64()),
        ("bytes", pa.int64()),  # stored frame bytes
        ("checksum", pa.string()),  # sha256 over each frame's RGB then flow bytes, in frame order
    ]
)

# Arrow shards: one record batch per chunk of one video, row i = frame (start + i).
ARROW_SHARD_SCHEMA = pa.schema(
    [("video_id", pa.string()), ("frame", pa.int32()), ("rgb", pa.binary()), ("flow", pa.binary())]
)


def update_checksum(sha, rgb: list, flow: list) -> None:
    """Feed a video's frames (in order, from any chunk) to ``sha``: each frame's RGB bytes, then
    its flow bytes when it has a flow. The index's ``checksum`` is the hex digest of sha256 fed so."""
    for i, frame in enumerate(rgb):
        sha.update(frame)
        if i < len(flow):
            sha.update(flow[i])


def shard_name(number: int, fmt: str) -> str:
    return f"{SHARDS}/shard-{number:05d}{SHARD_SUFFIX[fmt]}"


def index_part_path(out: Path, shard: str) -> Path:
    return out / (str(Path(shard).with_suffix("")) + ".parquet")


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` so that ``path`` holds either its old content or all of the new."""
    tmp = path.with_name(path.name + PARTIAL)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: Path, obj: dict) -> None:
    write_atomic(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def write_table(path: Path, table: pa.Table) -> None:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    write_atomic(path, sink.getvalue().to_pybytes())


def complete_shards(out: Path) -> list[str]:
    """Complete shards (relative paths) in shard order."""
    shard_dir = out / SHARDS
    if not shard_dir.is_dir():
        return []
    names = [p.name for p in shard_dir.iterdir() if _SHARD_NAME.match(p.name)]
    return [f"{SHARDS}/{n}" for n in sorted(names, key=lambda n: int(_SHARD_NAME.match(n).group(1)))]


def shard_number(shard: str) -> int:
    return int(_SHARD_NAME.search(shard).group(1))


def remove_partial_files(out: Path) -> list[Path]:
    """Delete what a killed run left: ``*.partial`` files and index parts without their shard."""
    shard_dir = out / SHARDS
    removed = [p for p in [*out.glob(f"*{PARTIAL}"), *shard_dir.glob(f"*{PARTIAL}")] if p.is_file()]
    if shard_dir.is_dir():
        stems = {Path(s).stem for s in complete_shards(out)}
        removed += [p for p in shard_dir.glob("*.parquet") if p.stem not in stems]
    for p in removed:
        p.unlink()
    return removed


def read_failures(out: Path) -> list[dict]:
    """The records of ``<out>/failures.jsonl`` (none when it does not exist)."""
    path = out / FAILURES
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def read_index(out: Path, schema: pa.Schema = INDEX_SCHEMA) -> pa.Table:
    """The index rows of every complete shard, in shard order (the truth ``index.parquet`` is built from).
    ``schema``: the index's (teacher folders have their own)."""
    parts = [pq.read_table(index_part_path(out, s), schema=schema) for s in complete_shards(out)]
    return pa.concat_tables(parts) if parts else schema.empty_table()


def rebuild_index(out: Path, schema: pa.Schema = INDEX_SCHEMA) -> pa.Table:
    """Rewrite ``<out>/index.parquet`` from the complete shards' parts, atomically."""
    table = read_index(out, schema)
    write_table(out / INDEX, table)
    return table
