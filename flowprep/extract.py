"""``extract``: a Kinetics-style folder to RGB + flow (or RGB-only) shards, resumable, with failures recorded.

The driver here owns the output folder: it checks the parameters against an existing run, skips
videos already in complete shards, writes results in input order and records every failure. The
work itself comes from an iterator of ``(spec, chunks)``: Ray's (:mod:`flowprep.extract_actors`) or,
for debugging, this process's own.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm

from flowprep.errors import OptionError
from flowprep.lock import output_lock
from flowprep.flow import BACKENDS, flow_device, get_backend, resolve_backend_name
from flowprep.flow.opencv import NO_OPENCV_CUDA, opencv_cuda_devices
from flowprep.pipeline import ExtractConfig, VideoChunk, video_chunks
from flowprep.provenance import versions
from flowprep.shards.plan import PLAN_SCHEMA, ShardPlan, VideoSize, estimate_bytes, plan_table, probe_sizes, replan
from flowprep.shards.writer import commit_shard, write_in_order
from flowprep.shards.layout import (
    DATASET_JSON,
    INDEX,
    SCHEMA_VERSION,
    INDEX_SCHEMA,
    PLAN,
    SHARDS,
    complete_shards,
    damaged_shards,
    description_difference,
    output_files,
    parse_table,
    read_dataset_json,
    read_failures,
    read_index,
    remove_leftovers,
    remove_output,
    shard_name,
    shard_number,
    write_failures,
    write_json,
    write_table,
)
from flowprep.sources import SourceProblem, VideoSpec, build_label_map, find_videos
from flowprep.storage import Storage, storage

log = logging.getLogger(__name__)

WRITERS = ("auto", "workers", "driver")


class OutputMismatch(Exception):
    """The output folder holds a run made with other parameters."""


class OutputRefused(Exception):
    """The output folder cannot take a run as it is: it holds files flowprep did not write, or
    damaged shards. The message says the way out."""


# HDF5 shards are local files: libhdf5 reads through many small seeks (each one a request on
# object storage) and has no writer for a stream.
HDF5_NEEDS_LOCAL = ("--format hdf5 needs a local --out: libhdf5 reads and writes seekable local files, and object storage "
                    "has none; use --format arrow (read by ranged requests)")


@dataclass
class ExtractReport:
    """What one run did. ``seconds`` is wall time from the first video submitted to the last
    written; ``flow_pairs`` is 0 for an RGB-only run."""

    videos: int = 0
    skipped: int = 0
    written: int = 0
    failed: int = 0
    frames: int = 0
    flow_pairs: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    failures: list[dict] = field(default_factory=list)

    @property
    def frames_per_second(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0

    @property
    def pairs_per_second(self) -> float:
        return self.flow_pairs / self.seconds if self.seconds > 0 else 0.0


def resolve_config(config: ExtractConfig, gpus: int | None = None) -> ExtractConfig:
    """``config`` with the flow backend resolved (``auto`` -> a name) and all its parameters filled
    in; ``gpus`` are those of the Ray cluster that will run it, if not this machine's. An RGB-only
    ``config`` has nothing to resolve."""
    if not config.has_flow:
        return config
    name = resolve_backend_name(config.flow_backend, gpus)
    try:
        params = BACKENDS[name].resolve_params(config.flow_params)
    except OptionError as e:  # only with auto (ExtractConfig checked the others): another backend's parameters
        raise OptionError(f"flow backend {config.flow_backend} runs {name} here: {e}", e.option) from None
    return ExtractConfig(**{**config.to_dict(), "flow_backend": name, "flow_params": params})


def describe_run(config: ExtractConfig, label_map: dict[str, int], src, annotations, labels_file, gpus: int | None = None) -> dict:
    """The content of dataset.json: what a run makes and how, to reproduce it. ``has_flow`` is
    what readers go by (:func:`~flowprep.shards.layout.has_flow`)."""
    def absolute(path):
        return path and str(Path(path).resolve())

    return {
        "schema_version": SCHEMA_VERSION,
        "params": config.to_dict(),
        "has_flow": config.has_flow,
        "flow": {"backend": config.flow_backend, "device": flow_device(config.flow_backend, gpus) if config.has_flow else None},
        "label_map": label_map,
        "source": {"src": absolute(src), "annotations": absolute(annotations), "labels_file": absolute(labels_file)},
        "versions": versions(),
    }


def check_output(out: Storage, description: dict, overwrite: bool) -> None:
    """Check, reading only, that a run of ``description`` may write into ``out``.

    flowprep writes only into a new or empty folder or its own output: a folder holding anything
    flowprep did not write (:func:`~flowprep.shards.layout.output_files`), or flowprep's file names
    without flowprep's dataset.json, is refused with or without ``overwrite``
    (:class:`OutputRefused`). Without ``overwrite``, a run with other parameters is an
    :class:`OutputMismatch`.
    """
    own, others = output_files(out)
    if others:
        names = ", ".join(str(out / name) for name in others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
        raise OutputRefused(f"{out} holds files that flowprep did not write: {names}. flowprep writes only into a new or "
                            "empty folder or into its own output: choose another --out")
    try:
        previous = read_dataset_json(out) if out.exists(DATASET_JSON) else None
    except ValueError as e:
        raise OutputRefused(f"{e}; flowprep neither writes into nor deletes such a folder: choose another --out") from None
    if own and previous is None:
        raise OutputRefused(f"{out} holds {own[0]} but no {DATASET_JSON}, so flowprep cannot tell "
                            "that its files are its own: choose another --out")
    if overwrite or previous is None:
        return
    changed = description_difference(previous, description, ("schema_version", "params", "label_map"))
    if changed:
        raise OutputMismatch(f"{out} holds a run with other {changed[0]}: {changed[1]}. "
                             "Use another --out, the same options, or --overwrite to delete that run and start over.")
    for key in ("versions", "flow"):
        changed = description_difference(previous, description, (key,))
        if changed:
            log.warning("%s was started with other %s: %s", out, key, changed[1])


def prepare_output(out: Storage, description: dict, overwrite: bool) -> None:
    """Create ``out`` or check that its run was made with the same parameters and labels
    (:func:`check_output`); ``overwrite`` then deletes flowprep's files, and only those."""
    check_output(out, description, overwrite)
    if overwrite:
        remove_output(out)
    out.makedirs()
    write_json(out, DATASET_JSON, description)


def refuse_damaged(out: Storage) -> None:
    """:class:`OutputRefused` when a complete shard of ``out`` is damaged (a run would skip it)."""
    damaged = damaged_shards(out)
    if damaged:
        shard, reason = next(iter(damaged.items()))
        more = f" (and {len(damaged) - 1} more shards)" if len(damaged) > 1 else ""
        raise OutputRefused(f"{out / shard} is damaged: {reason}{more}. Run `flowprep verify {out} --repair` to drop "
                            "the damaged shards, then rerun this command to extract their videos again")


def local_video_chunks(specs: Iterable[VideoSpec], config: ExtractConfig) -> Iterator[tuple[VideoSpec, Iterator[VideoChunk]]]:
    """``(spec, chunks)`` computed in this process, one video at a time (debugging, profiling)."""
    backend = get_backend(config.flow_backend, config.flow_params, threads=cv2.getNumberOfCPUs()) if config.has_flow else None
    for spec in specs:
        yield spec, video_chunks(spec, config, backend)


def read_plan(out: Storage) -> pa.Table:
    """The stored shard plan of ``out`` (``PLAN_SCHEMA``; empty before the first run)."""
    return parse_table(out.read_bytes(PLAN), PLAN_SCHEMA) if out.exists(PLAN) else PLAN_SCHEMA.empty_table()


def plan_output(stored: pa.Table, complete: set[str], has_plan: bool, specs: list[VideoSpec], config: ExtractConfig,
                redo: set[str]) -> tuple[list[ShardPlan], pa.Table | None, dict[str, VideoSize]]:
    """The shards of an output: as its ``stored`` plan (:func:`read_plan`) has them, for the videos
    of ``specs``, then the videos the plan does not hold and those of ``redo`` (in complete
    shards, but neither written nor settled), planned from their headers
    (:mod:`flowprep.shards.plan`) into new shards numbered after every shard that the stored plan
    or the output's ``complete`` shards hold: a video taken out of a complete shard must not be
    planned back into one. Also the plan to store before any shard is written (``None`` when the
    stored one, ``has_plan``, holds), so that a resumed run writes the same shards, and the
    headers read (:class:`~flowprep.shards.plan.VideoSize` by video id)."""
    taken = max([*stored["shard"].to_pylist(), *map(shard_number, complete)], default=-1)
    if redo:
        stored = stored.filter(pc.invert(pc.is_in(stored["video_id"], pa.array(sorted(redo)))))
    held = set(stored["video_id"].to_pylist())
    sizes = probe_sizes([spec for spec in specs if spec.video_id not in held], config)
    estimates = {video_id: estimate_bytes(size, config) for video_id, size in sizes.items()}
    plans = replan(stored, specs, estimates, config.shard_size, after=taken)
    if not (sizes or redo or not has_plan):
        return plans, None, sizes
    added = [plan for plan in plans if plan.number > taken]
    log.info("planned %d videos into %d new shards", len(sizes), len(added))
    return plans, pa.concat_tables([stored, plan_table(added, estimates)]), sizes


@dataclass
class Pending:
    """What a run has left to do in an output, as read from it (nothing written).

    ``index``: the rows of its complete shards; ``settled``: the failures recorded with complete
    shards that the run does not try again; ``todo``: the shards still to write (not complete,
    with videos); ``new_plan``: the plan to store before writing
    (``None``: the stored one holds); ``sizes``: the headers read to plan the videos new to the plan.
    """

    index: pa.Table
    settled: list[dict]
    todo: list[ShardPlan]
    new_plan: pa.Table | None
    sizes: dict[str, VideoSize]

    @property
    def todo_videos(self) -> list[VideoSpec]:
        return [spec for plan in self.todo for spec in plan.videos]


def pending_work(out: Storage, specs: list[VideoSpec], config: ExtractConfig, retry_failed: bool, fresh: bool = False) -> Pending:
    """What a run of ``specs`` under ``config`` has left to do in ``out``, reading only: videos in
    complete shards are done; so are the failures recorded with them (stage ``worker`` aside),
    unless ``retry_failed``. ``fresh``: as for an empty ``out`` (what ``overwrite`` leaves), reading nothing."""
    complete = set() if fresh else set(complete_shards(out))
    index = INDEX_SCHEMA.empty_table() if fresh else read_index(out)
    # A video lost to cluster faults (stage "worker") is never settled: every run tries it again.
    failures = [] if fresh or retry_failed else read_failures(out)
    settled = [f for f in failures if f.get("shard") in complete and f.get("stage") != "worker"]
    done = set(index["video_id"].to_pylist()) | {f["video_id"] for f in settled}
    stored = PLAN_SCHEMA.empty_table() if fresh else read_plan(out)
    in_complete = {row["video_id"] for row in stored.to_pylist() if shard_name(row["shard"], config.format) in complete}
    has_plan = not fresh and out.exists(PLAN)
    plans, new_plan, sizes = plan_output(stored, complete, has_plan, specs, config, redo=in_complete - done)
    todo = [plan for plan in plans if shard_name(plan.number, config.format) not in complete and plan.videos]
    return Pending(index, settled, todo, new_plan, sizes)


@dataclass
class RunInputs:
    """What a run is to make, found before anything is written: ``config`` with its flow backend
    resolved, the videos found (``specs``) and those that cannot be used (``problems``), the label
    map, the description for dataset.json, and the GPUs of the Ray cluster that runs the flow
    (``None``: this machine's)."""

    config: ExtractConfig
    specs: list[VideoSpec]
    problems: list[SourceProblem]
    label_map: dict[str, int]
    description: dict
    gpus: int | None


def find_run(src, out: Storage, config: ExtractConfig, annotations, labels_file, limit: int | None, workers: int | None,
             writers: str, ray_address: str | None) -> RunInputs:
    """Check the options and find the videos of a run; connects to the Ray cluster of
    ``ray_address`` (or ``$RAY_ADDRESS``) to count its GPUs, which decide the flow backend ``auto``."""
    if writers not in WRITERS:
        raise OptionError(f"writers must be one of {', '.join(WRITERS)}, not {writers!r}", "writers")
    if not out.local and config.format == "hdf5":
        raise OptionError(HDF5_NEEDS_LOCAL, "format")
    gpus = None  # this machine's, unless a Ray cluster runs the flow
    if workers != 0 and (ray_address or os.environ.get("RAY_ADDRESS")):
        from flowprep.cluster import cluster_gpus, start_ray

        start_ray(ray_address)
        gpus = cluster_gpus()
    config = resolve_config(config, gpus)
    if config.flow_backend == "opencv-cuda" and gpus is None and not opencv_cuda_devices():
        raise OptionError(NO_OPENCV_CUDA, "flow_backend")  # before the output folder takes these options
    specs, problems = find_videos(src, annotations, config.trim)
    label_map = build_label_map([s.label for s in specs] + [p.label for p in problems], labels_file)
    if limit is not None:
        specs = specs[:limit]
    description = describe_run(config, label_map, src, annotations, labels_file, gpus)
    return RunInputs(config, specs, problems, label_map, description, gpus)


def extend_index(out: Storage, index: pa.Table, rows: list[dict]) -> pa.Table:
    """``index`` with a committed shard's ``rows``, in shard order, written whole as ``index.parquet``
    (readers see exactly the complete shards; shards complete in any order)."""
    table = pa.concat_tables([index, pa.Table.from_pylist(rows, schema=INDEX_SCHEMA)])
    table = table.sort_by([("shard", "ascending"), ("shard_offset", "ascending")]).combine_chunks()
    write_table(out, INDEX, table)
    return table


def extract(
    src: str | Path,
    out: str | Path,
    config: ExtractConfig = ExtractConfig(),
    *,
    annotations: str | Path | None = None,
    labels_file: str | Path | None = None,
    limit: int | None = None,
    overwrite: bool = False,
    retry_failed: bool = False,
    workers: int | None = None,
    decoders: int | None = None,
    writers: str = "auto",
    ray_address: str | None = None,
    gpu_share: int = 1,
    progress: bool | None = None,
) -> ExtractReport:
    """Extract every video under ``src`` into shards under ``out``; see the CLI's ``extract --help``.

    ``workers=0`` computes in this process without Ray; ``writers`` says where Ray runs write
    shards (:func:`~flowprep.extract_actors.ray_write_shards`). Videos already in complete shards of
    ``out`` are skipped; each failed video is a line of ``out/failures.jsonl`` and in the report.
    A video that failed while a now complete shard was written is not tried again unless
    ``retry_failed``: so a resumed run writes the same bytes as an uninterrupted one. One run
    at a time writes ``out`` (:mod:`flowprep.lock`; :class:`~flowprep.lock.OutputLocked`); a run
    that loses its lock stops before its next commit (:class:`~flowprep.lock.LockLost`).
    ``out``: a local folder, or ``s3://``/``gs://`` prefix (Arrow shards only; :mod:`flowprep.storage`).
    """
    out = storage(out)
    run = find_run(src, out, config, annotations, labels_file, limit, workers, writers, ray_address)
    config, specs, problems, label_map, description = run.config, run.specs, run.problems, run.label_map, run.description
    if config.has_flow:
        log.info("flow: %s on %s", config.flow_backend, description["flow"]["device"])
    else:
        log.info("flow: none, RGB only")
    out.makedirs()
    with output_lock(out) as lock:  # one writer: a second run is refused before it touches a file
        prepare_output(out, description, overwrite)
        for path in remove_leftovers(out):
            log.info("removed %s, left by an interrupted run", path)
        refuse_damaged(out)
        out.makedirs(SHARDS)
        pending = pending_work(out, specs, config, retry_failed)
        index, settled, todo, todo_videos = pending.index, pending.settled, pending.todo, pending.todo_videos
        write_table(out, INDEX, index)  # rebuilt from the complete shards' parts
        if pending.new_plan is not None:
            write_table(out, PLAN, pending.new_plan)
        report = ExtractReport(videos=len(specs) + len(problems), skipped=len(specs) - len(todo_videos), failed=len(settled),
                               failures=settled)
        log.info("%d videos found, %d already done (%d of them failed), %d to do in %d shards, %d missing",
                 len(specs), report.skipped, len(settled), len(todo_videos), len(todo), len(problems))
        position = {spec.video_id: i for i, spec in enumerate(specs)}

        # failures.jsonl is written whole (object storage cannot append), in input order whatever
        # order shards complete in: the kept failures at once, then all of them before each shard
        # is committed, so that a complete shard's failures are never lost (a kill loses only those
        # of incomplete shards, which a rerun redoes), and at the end.
        def save_failures() -> None:
            ordered = sorted(report.failures, key=lambda f: position.get(f["video_id"], -1))
            write_failures(out, ordered)

        def fail(entry: dict) -> None:
            report.failures.append(entry)
            report.failed += 1
            log.warning("failed %s (%s): %s", entry["video_id"], entry["stage"], entry["error"])

        for problem in problems:
            fail({"video_id": problem.video_id, "source": problem.source, "stage": "source", "error": problem.error, "shard": None})
        save_failures()
        bar = tqdm(total=len(todo_videos), unit="video", disable=None if progress is None else not progress, dynamic_ncols=True)
        start = time.perf_counter()

        def video_done(row: dict | None) -> None:
            bar.update(1)
            if row is not None and row["corrupt_frames"]:
                log.warning("%s: %d source frame(s) flagged corrupt by FFmpeg, written as decoded (--fail-corrupt fails such videos)",
                            row["video_id"], row["corrupt_frames"])

        metadata = {"flowprep": json.dumps({k: description[k] for k in ("schema_version", "params", "versions")}, sort_keys=True)}
        if workers == 0 or not todo:
            videos = local_video_chunks(todo_videos, config)  # one flow backend for the run
            results = write_in_order(out, todo, config, label_map, metadata, videos, video_done)
        else:
            from flowprep.extract_actors import ray_write_shards

            results = ray_write_shards(todo, config, out, label_map, metadata, workers, decoders, ray_address, gpu_share,
                                       writers, video_done)
        for plan, result in results:
            for entry in result.failures:
                fail(entry)
            if result.written:
                lock.check()  # a run that lost its lock commits nothing more
                save_failures()
                commit_shard(out, result)
                index = extend_index(out, index, result.rows)
                log.info("shard complete: %s", result.shard)
            for row in result.rows:
                report.written += 1
                report.frames += row["num_frames"]
                report.flow_pairs += row["num_frames"] - 1 if config.has_flow else 0
                report.bytes_written += row["bytes"]
            report.seconds = time.perf_counter() - start
            bar.set_postfix(frames=report.frames, failed=report.failed)
        lock.check()
        save_failures()
        bar.close()
        return report


def allowed_failures(rule: str, videos: int) -> int:
    """How many failures ``--allow-failures`` permits: a count (``"3"``) or a fraction of ``videos`` (``"0.02"``)."""
    try:
        value = float(rule)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"--allow-failures {rule!r}: want a count (5) or a fraction (0.02)")
    if "." in rule or (value < 1 and value != 0):
        if value > 1:
            raise ValueError(f"--allow-failures {rule}: a fraction must be at most 1")
        return int(value * videos)
    return int(value)
