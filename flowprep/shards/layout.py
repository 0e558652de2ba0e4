"""The on-disk layout of an output folder: the one place that names its files and fields.

::

    <out>/dataset.json                   parameters, versions, label map, has_flow (SCHEMA_VERSION)
    <out>/index.parquet                  one row per written video (INDEX_SCHEMA)
    <out>/failures.jsonl                 one JSON object per failed video
    <out>/shards/shard-00000.arrow|.h5   complete shards
    <out>/shards/shard-00000.parquet     the index rows of that shard, and the shard's size
    <out>/teachers/<name>/...            ``flowprep teacher``'s targets (flowprep/teacher/targets.py)

A shard is written as ``<name>.partial`` and renamed when complete, after its index rows; so a
shard file without ``.partial`` is always whole and indexed, and anything ``.partial`` is the
leftover of a killed run, deleted when the next run starts. These names are all flowprep writes
and all it ever deletes (:func:`output_files`).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from flowprep.lock import LOCK

SCHEMA_VERSION = 2  # 2: index columns source_stream and corrupt_frames
DATASET_JSON = "dataset.json"
INDEX = "index.parquet"
FAILURES = "failures.jsonl"
SHARDS = "shards"
PARTIAL = ".partial"
SHARD_SUFFIX = {"arrow": ".arrow", "hdf5": ".h5"}
_SHARD_NAME = re.compile(r"shard-(\d{5,})\.(arrow|h5)$")
_SHARD_FILE = re.compile(r"shard-\d{5,}\.(arrow|h5|parquet)(\.partial)?")  # a shard, its index part, leftovers
TEACHERS = "teachers"
TEACHER_JSON = "teacher.json"
# Index part schema metadata: the shard file's size in bytes, checked when a run resumes.
SHARD_BYTES = b"flowprep_shard_bytes"

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
        ("source_stream", pa.int32()),  # index of the video stream used among the file's streams
        ("corrupt_frames", pa.int32()),  # source frames FFmpeg flagged corrupt (frame.is_corrupt)
        ("segment_start", pa.float64()),  # seconds into the source, when trimmed
        ("segment_end", pa.float64()),
        ("bytes", pa.int64()),  # stored frame bytes
        ("checksum", pa.string()),  # sha256 over each frame's RGB then flow bytes (if any), in frame order
    ]
)

# Arrow shards: one record batch per chunk of one video, row i = frame (start + i). An RGB-only
# run (extract --flow none) writes no flow column.
ARROW_SHARD_SCHEMA = pa.schema(
    [("video_id", pa.string()), ("frame", pa.int32()), ("rgb", pa.binary()), ("flow", pa.binary())]
)
ARROW_RGB_SHARD_SCHEMA = ARROW_SHARD_SCHEMA.remove(ARROW_SHARD_SCHEMA.get_field_index("flow"))


def has_flow(description: dict) -> bool:
    """Whether the output that ``description`` (its dataset.json) describes holds flow: its
    ``has_flow``, absent from outputs written before RGB-only runs existed, which all hold flow."""
    return description.get("has_flow", True)


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


def write_index_part(out: Path, shard: str, rows: list[dict], shard_bytes: int) -> None:
    """Write the index rows of ``shard`` (complete, ``shard_bytes`` long) to its index part."""
    schema = INDEX_SCHEMA.with_metadata({SHARD_BYTES: str(shard_bytes)})
    write_table(index_part_path(out, shard), pa.Table.from_pylist(rows, schema=schema))


def damaged_shards(out: Path) -> dict[str, str]:
    """Complete shards that are not as written, each with what is wrong: its index part missing or
    unreadable, or its size not the one the part recorded (cut short, or written over). Cheap: it
    reads each part's footer and no shard; a flipped byte needs ``flowprep verify``'s checksums."""
    damaged = {}
    for shard in complete_shards(out):
        part = index_part_path(out, shard)
        try:
            recorded = (pq.read_schema(part).metadata or {}).get(SHARD_BYTES)
        except FileNotFoundError:
            damaged[shard] = f"its index part {part.name} is missing"
            continue
        except (OSError, ValueError) as e:
            damaged[shard] = f"its index part {part.name} is unreadable ({e})"
            continue
        size = (out / shard).stat().st_size
        if recorded is None:
            damaged[shard] = f"its index part {part.name} records no shard size"
        elif int(recorded) != size:
            damaged[shard] = f"{size} bytes, but {int(recorded)} when it was written"
    return damaged


def drop_shards(out: Path, shards: list[str]) -> None:
    """Delete complete shards and their index parts: a rerun of extract redoes their videos."""
    for shard in shards:
        (out / shard).unlink(missing_ok=True)  # first: a part left without its shard is a leftover
        index_part_path(out, shard).unlink(missing_ok=True)


def read_dataset_json(out: Path) -> dict:
    """``<out>/dataset.json``; a ValueError naming the file when it is not one that flowprep wrote."""
    path = out / DATASET_JSON
    try:
        description = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not flowprep's: not valid JSON ({e})") from None
    if not isinstance(description, dict) or not {"schema_version", "params"} <= description.keys():
        raise ValueError(f"{path} is not flowprep's: it has no schema_version and params")
    return description


def output_files(out: Path) -> tuple[list[Path], list[Path]]:
    """``(flowprep's, others)`` in ``out``: the files flowprep writes, known by their names (the
    layout above, ``teachers/<name>/`` alike), and every other entry, file, folder or link, not
    looked into. Only the first may ever be deleted."""
    own: list[Path] = []
    others: list[Path] = []

    def sort(folder: Path, names: set[str], teachers: bool) -> None:
        for path in sorted(folder.iterdir()):
            if path.name == LOCK:  # the running writer's: neither deleted nor foreign
                continue
            if path.is_symlink():
                others.append(path)
            elif path.is_file() and path.name.removesuffix(PARTIAL) in names:
                own.append(path)
            elif path.is_dir() and path.name == SHARDS:
                for p in sorted(path.iterdir()):
                    (own if p.is_file() and not p.is_symlink() and _SHARD_FILE.fullmatch(p.name) else others).append(p)
            elif path.is_dir() and path.name == TEACHERS and teachers:
                for p in sorted(path.iterdir()):
                    if p.is_dir() and not p.is_symlink():
                        sort(p, {TEACHER_JSON, INDEX, FAILURES}, teachers=False)
                    else:
                        others.append(p)
            else:
                others.append(path)

    if out.is_dir():
        sort(out, {DATASET_JSON, INDEX, FAILURES}, teachers=True)
    return own, others


def remove_output(out: Path) -> None:
    """Delete flowprep's files from ``out`` (:func:`output_files`), then its folders left empty."""
    for path in output_files(out)[0]:
        path.unlink()
    folders = [*out.glob(f"{TEACHERS}/*/{SHARDS}"), *out.glob(f"{TEACHERS}/*"), out / TEACHERS, out / SHARDS]
    for folder in folders:
        if folder.is_dir() and not folder.is_symlink() and not any(folder.iterdir()):
            folder.rmdir()


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` so that ``path`` holds either its old content or all of the new."""
    tmp = path.with_name(path.name + PARTIAL)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: Path, obj: dict) -> None:
    """``obj`` as standard JSON: a NaN or infinity is an error, never written."""
    write_atomic(path, (json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n").encode())


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
    """Delete what a killed run left: flowprep's ``.partial`` files and index parts without their
    shard (known by their names: nothing else is touched). ``out``: an output or teacher folder."""
    stems = {Path(s).stem for s in complete_shards(out)}
    removed = [p for p in out.glob(f"*{PARTIAL}")
               if p.is_file() and p.name.removesuffix(PARTIAL) in {DATASET_JSON, INDEX, FAILURES, TEACHER_JSON}]
    if (out / SHARDS).is_dir():
        removed += [p for p in (out / SHARDS).iterdir() if p.is_file() and _SHARD_FILE.fullmatch(p.name)
                    and (p.name.endswith(PARTIAL) or (p.suffix == ".parquet" and p.stem not in stems))]
    for p in removed:
        p.unlink()
    return removed


def read_failures(out: Path) -> list[dict]:
    """The records of ``<out>/failures.jsonl`` (none when it does not exist). A last line without
    its newline was cut by a kill or a full disk: it is left out, and its video is redone."""
    path = out / FAILURES
    lines = path.read_text().split("\n")[:-1] if path.exists() else []
    return [json.loads(line) for line in lines if line.strip()]


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
