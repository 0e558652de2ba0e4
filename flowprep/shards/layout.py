"""The layout of an output folder: the one place that names its files and fields.

::

    <out>/dataset.json                   parameters, versions, label map, has_flow (SCHEMA_VERSION)
    <out>/index.parquet                  one row per written video (INDEX_SCHEMA)
    <out>/failures.jsonl                 one JSON object per failed video
    <out>/plan.parquet                   which videos go into which shard (flowprep/shards/plan.py)
    <out>/shards/shard-00000.arrow|.h5   complete shards
    <out>/shards/shard-00000.parquet     the index rows of that shard, and the shard's size
    <out>/teachers/<name>/...            ``flowprep teacher``'s targets (flowprep/teacher/targets.py)

``<out>`` is a local folder or a prefix on object storage (:mod:`flowprep.storage`); every
function here takes either (a path, URI or :class:`~flowprep.storage.Storage`).

A shard is committed by writing its index part once the shard is complete. In a local folder
each attempt at a shard writes a staged file of its own, ``<name>.<token>.partial``
(:func:`~flowprep.storage.staged_name`), renamed after its index part, so a shard file without
``.partial`` is always whole and indexed. On object storage (no rename) the shard object is
uploaded under its name and counts only once its index part exists. Anything else a killed run
or a superseded attempt left (staged ``.partial`` files, index parts without their shard, shard
objects without their index part) is deleted when the next run starts. These names are all
flowprep writes and all it ever deletes (:func:`output_files`).
"""

from __future__ import annotations

import hashlib
import json
import re
from contextlib import ExitStack
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from flowprep.lock import LOCK, output_lock
from flowprep.storage import Storage, staged_target, storage

SCHEMA_VERSION = 2  # 2: index columns source_stream and corrupt_frames
DATASET_JSON = "dataset.json"
INDEX = "index.parquet"
FAILURES = "failures.jsonl"
SHARDS = "shards"
PLAN = "plan.parquet"
SHARD_SUFFIX = {"arrow": ".arrow", "hdf5": ".h5"}
_SHARD_NAME = re.compile(r"shard-(\d{5,})\.(arrow|h5)$")
_SHARD_FILE = re.compile(r"shard-\d{5,}\.(arrow|h5|parquet)")  # a shard or its index part (or their staged names)
TEACHERS = "teachers"
TEACHER_JSON = "teacher.json"
# Index part schema metadata: the shard file's size in bytes, checked when a run resumes.
SHARD_BYTES = b"flowprep_shard_bytes"
# And its sha256 (teacher target shards, which have no per-video checksums), checked on resume.
SHARD_SHA256 = b"flowprep_shard_sha256"

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


def shard_number(shard: str) -> int:
    return int(_SHARD_NAME.search(shard).group(1))


def index_part(shard: str) -> str:
    """The name of ``shard``'s index part: ``shards/shard-00000.parquet``."""
    return shard.rsplit(".", 1)[0] + ".parquet"


def write_index_part(out: str | Path | Storage, shard: str, rows: list[dict], shard_bytes: int,
                     schema: pa.Schema = INDEX_SCHEMA, sha256: str | None = None) -> None:
    """Write the index rows of ``shard`` (complete, ``shard_bytes`` long, with digest ``sha256``
    if given) to its index part; ``schema``: the index's (teacher folders have their own)."""
    metadata = {SHARD_BYTES: str(shard_bytes), **({SHARD_SHA256: sha256} if sha256 else {})}
    write_table(out, index_part(shard), pa.Table.from_pylist(rows, schema=schema.with_metadata(metadata)))


def complete_shards(out: str | Path | Storage) -> list[str]:
    """Complete shards (relative names) in shard order: in a local folder every shard file (renamed
    only once indexed), on object storage every shard object that has its index part."""
    store = storage(out)
    files = store.files(SHARDS)
    names = [n for n in files if _SHARD_NAME.match(n)]
    if not store.local:
        names = [n for n in names if index_part(n) in files]
    return [f"{SHARDS}/{n}" for n in sorted(names, key=shard_number)]


def damaged_shards(out: str | Path | Storage) -> dict[str, str]:
    """Complete shards that are not as written, each with what is wrong: its index part missing or
    unreadable, its size not the one the part recorded (cut short, or written over), or, where
    the part records one (teacher target shards, small), its sha256 not the shard's. Cheap for
    frame shards: it reads each part and lists the shards, reading no shard; a flipped byte there
    needs ``flowprep verify``'s checksums."""
    store = storage(out)
    sizes = {f"{SHARDS}/{name}": size for name, size in store.files(SHARDS).items()}
    damaged = {}
    for shard in complete_shards(store):
        part = index_part(shard)
        try:
            metadata = pq.read_schema(pa.BufferReader(store.read_bytes(part))).metadata or {}
            recorded, digest = metadata.get(SHARD_BYTES), metadata.get(SHARD_SHA256)
        except FileNotFoundError:
            damaged[shard] = f"its index part {Path(part).name} is missing"
            continue
        except (OSError, ValueError) as e:
            damaged[shard] = f"its index part {Path(part).name} is unreadable ({e})"
            continue
        if recorded is None:
            damaged[shard] = f"its index part {Path(part).name} records no shard size"
        elif int(recorded) != sizes[shard]:
            damaged[shard] = f"{sizes[shard]} bytes, but {int(recorded)} when it was written"
        elif digest is not None and hashlib.sha256(store.read_bytes(shard)).hexdigest() != digest.decode():
            damaged[shard] = "its bytes are not the ones written (sha256 differs)"
    return damaged


def drop_shards(out: str | Path | Storage, shards: list[str]) -> None:
    """Delete complete shards and their index parts: a rerun of extract redoes their videos."""
    store = storage(out)
    for shard in shards:
        store.delete(shard)  # first: a part left without its shard is a leftover
        store.delete(index_part(shard))


def read_dataset_json(out: str | Path | Storage) -> dict:
    """``<out>/dataset.json``; a ValueError naming the file when it is not one that flowprep wrote."""
    store = storage(out)
    path = store / DATASET_JSON
    try:
        description = json.loads(store.read_bytes(DATASET_JSON))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not flowprep's: not valid JSON ({e})") from None
    if not isinstance(description, dict) or not {"schema_version", "params"} <= description.keys():
        raise ValueError(f"{path} is not flowprep's: it has no schema_version and params")
    return description


def output_files(out: str | Path | Storage) -> tuple[list[str], list[str]]:
    """``(flowprep's, others)`` in ``out``, as names relative to it: the files flowprep writes,
    known by their names (the layout above, ``teachers/<name>/`` alike), and every other entry,
    file, folder or link, not looked into. Only the first may ever be deleted."""
    store = storage(out)
    own: list[str] = []
    others: list[str] = []

    def sort(folder: str, names: set[str], teachers: bool) -> None:
        for name, kind in store.entries(folder):
            path = f"{folder}{name}"
            if _unstaged(name) == LOCK:  # the running writer's: neither deleted nor foreign
                continue
            if kind == "file" and _unstaged(name) in names:
                own.append(path)
            elif kind == "dir" and name == SHARDS:
                for n, k in store.entries(path):
                    (own if k == "file" and _SHARD_FILE.fullmatch(_unstaged(n)) else others).append(f"{path}/{n}")
            elif kind == "dir" and name == TEACHERS and teachers:
                for n, k in store.entries(path):
                    if k == "dir":
                        sort(f"{path}/{n}/", {TEACHER_JSON, INDEX, FAILURES}, teachers=False)
                    else:
                        others.append(f"{path}/{n}")
            else:
                others.append(path)

    sort("", {DATASET_JSON, INDEX, FAILURES, PLAN}, teachers=True)
    return own, others


def remove_output(out: str | Path | Storage) -> None:
    """Delete flowprep's files from ``out`` (:func:`output_files`), then its folders left empty.

    The caller holds ``out``'s lock; each teacher folder's lock is taken too while its files go,
    so that a teacher run writing one refuses this with :class:`~flowprep.lock.OutputLocked`
    (naming it) before anything is deleted."""
    store = storage(out)
    teachers = [f"{TEACHERS}/{name}" for name, kind in store.entries(TEACHERS) if kind == "dir"]
    with ExitStack() as locks:
        for folder in teachers:
            locks.enter_context(output_lock(store / folder))
        for name in output_files(store)[0]:
            store.delete(name)
    for folder in [*(f"{t}/{SHARDS}" for t in teachers), *teachers, TEACHERS, SHARDS]:
        store.remove_empty_folder(folder)


def description_difference(previous: dict, description: dict, keys) -> tuple[str, str] | None:
    """The first of ``keys`` whose value differs between two descriptions (dataset.json,
    teacher.json), with what changed (``"name: old -> new, ..."`` for dicts); ``None`` when they agree."""
    for key in keys:
        old, new = previous.get(key), description[key]
        if old == new:
            continue
        if isinstance(old, dict) and isinstance(new, dict):
            names = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
            return key, ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in names[:8])
        return key, f"{old!r} -> {new!r}"
    return None


def write_json(out: str | Path | Storage, name: str, obj: dict) -> None:
    """``obj`` as ``<out>/<name>``, standard JSON: a NaN or infinity is an error, never written."""
    storage(out).write(name, (json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n").encode())


def parse_table(data: bytes, schema: pa.Schema | None = None) -> pa.Table:
    """A Parquet file's bytes as a table, read in this thread: once Arrow's thread pools have
    started, a worker still alive when the interpreter exits can abort it (``terminate called
    without an active exception``, apache/arrow#34314), so flowprep never starts them. Its
    Parquet files (indexes, plans) are small enough that threads would gain little."""
    return pq.read_table(pa.BufferReader(data), schema=schema, use_threads=False, pre_buffer=False)


def write_table(out: str | Path | Storage, name: str, table: pa.Table) -> None:
    """``table`` as the Parquet file ``<out>/<name>``, written whole."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    storage(out).write(name, sink.getvalue().to_pybytes())


def _unstaged(name: str) -> str:
    """The name that ``name`` stages when it is a staged name (:func:`~flowprep.storage.staged_target`), else ``name``."""
    return staged_target(name) or name


def leftovers(out: str | Path | Storage) -> list[str]:
    """What a killed run or a superseded attempt at a shard left in ``out`` (an output or teacher
    folder), as names: flowprep's staged ``.partial`` files, index parts without their complete
    shard and, on object storage, shard objects without their index part (uploaded, never
    committed). Known by their names: nothing else is ever listed. Only the holder of ``out``'s
    lock may delete them (:mod:`flowprep.lock`): a running writer's staged files look the same."""
    store = storage(out)
    complete = set(complete_shards(store))
    found = [n for n in store.files() if staged_target(n) in {DATASET_JSON, INDEX, FAILURES, PLAN, TEACHER_JSON}]
    kept = complete | {index_part(s) for s in complete}
    found += [f"{SHARDS}/{n}" for n in store.files(SHARDS) if _SHARD_FILE.fullmatch(_unstaged(n)) and f"{SHARDS}/{n}" not in kept]
    return sorted(found)


def remove_leftovers(out: str | Path | Storage) -> list[Path | str]:
    """Delete :func:`leftovers`; returns where they were."""
    store = storage(out)
    removed = leftovers(store)
    for name in removed:
        store.delete(name)
    return [store / name for name in removed]


def write_failures(out: str | Path | Storage, entries: list[dict]) -> None:
    """``<out>/failures.jsonl``, one JSON object a line, written whole (object storage cannot
    append): a kill leaves the old file or the new one."""
    storage(out).write(FAILURES, "".join(json.dumps(entry) + "\n" for entry in entries).encode())


def read_failures(out: str | Path | Storage) -> list[dict]:
    """The records of ``<out>/failures.jsonl`` (none when it does not exist). A last line without
    its newline (from a file written by appending, as earlier versions did) is left out, and its
    video is redone."""
    store = storage(out)
    lines = store.read_bytes(FAILURES).decode().split("\n")[:-1] if store.exists(FAILURES) else []
    return [json.loads(line) for line in lines if line.strip()]


def read_index(out: str | Path | Storage, schema: pa.Schema = INDEX_SCHEMA) -> pa.Table:
    """The index rows of every complete shard, in shard order (the truth ``index.parquet`` is built from).
    ``schema``: the index's (teacher folders have their own)."""
    store = storage(out)
    parts = [parse_table(store.read_bytes(index_part(s)), schema) for s in complete_shards(store)]
    return pa.concat_tables(parts) if parts else schema.empty_table()


def rebuild_index(out: str | Path | Storage, schema: pa.Schema = INDEX_SCHEMA) -> pa.Table:
    """Rewrite ``<out>/index.parquet`` from the complete shards' parts, written whole."""
    table = read_index(out, schema)
    write_table(out, INDEX, table)
    return table
