"""``flowprep teacher``: run a flow network once over every view of the grid and store its outputs.

The stages, each usable without Ray: work items and their stored flow
(:mod:`flowprep.teacher.items`), the model on a device (:mod:`flowprep.teacher.model`), and here
:func:`compute_targets`, which drives them, in this process or on Ray
(:mod:`flowprep.teacher.actors`), and writes one target shard per frame shard, in order,
resumable like ``flowprep extract``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Iterator
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from flowprep.devices import resolve_device
from flowprep.errors import OptionError
from flowprep.lock import HeldLock, output_lock
from flowprep.networks import checkpoint_num_classes, load_state
from flowprep.provenance import file_sha256, versions
from flowprep.shards.layout import (
    INDEX,
    TEACHERS,
    complete_shards,
    damaged_shards,
    description_difference,
    drop_shards,
    output_files,
    read_failures,
    rebuild_index,
    remove_leftovers,
    write_failures,
    write_json,
    write_table,
)
from flowprep.shards.reader import ShardReader
from flowprep.storage import Storage, storage
from flowprep.teacher.items import WorkItem, plan_items, read_windows, views_per_item, views_to_compute
from flowprep.teacher.model import FLOW_INPUT, STORED, SegmentOutputs, TeacherConfig, TeacherModel
from flowprep.teacher.targets import (
    TARGET_INDEX_SCHEMA,
    TEACHER_JSON,
    TEACHER_SCHEMA_VERSION,
    source_checksums,
    target_schema,
    target_shard,
    teacher_dir,
    write_target_shard,
)
from flowprep.teacher.views import VIEWS_RULE

log = logging.getLogger(__name__)

__all__ = ["TeacherConfig", "TeacherMismatch", "TeacherReport", "compute_targets"]


class TeacherMismatch(Exception):
    """The teacher folder holds targets made with other options or from other shards."""


class TargetShardBuffer:
    """The outputs of one frame shard's videos as they arrive, segment by segment; a video with
    a failed segment is left out whole, with the first failure's stage and error."""

    def __init__(self):
        self.videos: dict[str, dict] = {}

    def add(self, result: SegmentOutputs) -> None:
        video = self.videos.setdefault(result.segment.video_id, {"positions": result.segment.positions, "views": [],
                                                                 "outputs": [], "error": None})
        if result.error is not None:
            video["error"] = video["error"] or (result.stage, result.error)
        else:
            video["views"] += result.segment.views
            video["outputs"].append(result.outputs)

    def failed(self) -> list[tuple[str, str, str]]:
        """``(video_id, stage, error)`` of each video left out."""
        return [(video_id, *v["error"]) for video_id, v in self.videos.items() if v["error"] is not None]

    def write(self, folder: Storage, shard: str, schema, dims: dict[str, int], reader: ShardReader) -> list[dict]:
        """Publish the target shard; returns its index rows."""
        rows, views, outputs = [], [], []
        for video_id, video in self.videos.items():
            if video["error"] is not None:
                continue
            meta = reader.meta(video_id)
            rows.append({"video_id": video_id, "shard": shard, "row": len(views), "views": len(video["views"]),
                         "positions": video["positions"], "height": meta["height"], "width": meta["width"]})
            views += [(video_id, v) for v in video["views"]]
            outputs += video["outputs"]
        stacked = {k: np.concatenate([o[k] for o in outputs]) if outputs else np.zeros((0, d), np.float16) for k, d in dims.items()}
        write_target_shard(folder, shard, views, stacked, schema, rows)
        return rows


@dataclass
class TeacherReport:
    """What one run did; ``seconds`` from the first item submitted to the last written;
    ``stored``: videos with targets after the run (this run's and earlier runs')."""

    videos: int = 0
    stored: int = 0
    skipped: int = 0
    written: int = 0
    failed: int = 0
    views: int = 0
    seconds: float = 0.0
    failures: list[dict] = field(default_factory=list)

    @property
    def views_per_second(self) -> float:
        return self.views / self.seconds if self.seconds > 0 else 0.0


def describe_teacher(reader: ShardReader, name: str, config: TeacherConfig, num_classes: int, dims: dict[str, int], device: str) -> dict:
    """The content of teacher.json; ``params`` and ``sources`` must match for a run to resume."""
    return {
        "schema_version": TEACHER_SCHEMA_VERSION,
        "name": name,
        "params": {
            "model": config.model,
            "checkpoint_sha256": config.checkpoint and file_sha256(config.checkpoint),
            "num_classes": num_classes,
            "in_channels": 2,
            "grid": config.grid.to_dict(),
            "outputs": dims,
            "input": FLOW_INPUT,
            "stored": STORED,
        },
        "views_rule": VIEWS_RULE,
        "sources": source_checksums(reader),
        "run": {"checkpoint": config.checkpoint and str(Path(config.checkpoint).resolve()), "batch_size": config.batch_size,
                "device": device},
        "versions": versions(),
    }


def prepare_teacher(out: Storage, folder: Storage, description: dict, overwrite: bool) -> None:
    """Create ``folder`` (teacher ``description["name"]`` of ``out``), or check that its targets
    were made with the same params from the same shards.

    Like extract's output folder, a teacher folder holding files flowprep did not write (a
    checkpoint kept there too) is refused with or without ``overwrite``, which deletes
    flowprep's files only. Targets without their teacher.json are never adopted: refused, or
    deleted by ``overwrite``.
    """
    own, others = output_files(out)
    prefix = f"{TEACHERS}/{description['name']}/"
    others = [name for name in others if name.startswith(prefix)]
    if others:
        raise TeacherMismatch(f"{folder} holds files that flowprep did not write: {', '.join(str(out / n) for n in others[:5])}. "
                              "Move them out of the teacher folder, or use another --name")
    own = [name for name in own if name.startswith(prefix)]
    if overwrite:
        for name in own:
            out.delete(name)
    elif folder.exists(TEACHER_JSON):
        try:
            previous = json.loads(folder.read_bytes(TEACHER_JSON))
        except ValueError as e:
            raise TeacherMismatch(f"{folder / TEACHER_JSON} is not valid JSON ({e}): --overwrite starts over") from None
        changed = description_difference(previous, description, ("schema_version", "params", "sources"))
        if changed:
            raise TeacherMismatch(f"{folder} holds targets with other {changed[0]} ({changed[1]}). "
                                  "Use another --name, the same options, or --overwrite to start over.")
    elif own:
        raise TeacherMismatch(f"{folder} holds targets but no {TEACHER_JSON}, so nothing tells what made them: "
                              "--overwrite deletes them and starts over, or use another --name")
    folder.makedirs()
    write_json(folder, TEACHER_JSON, description)


def check_targets(folder: Storage, metadata: dict[str, str]) -> None:
    """Refuse complete target shards that are not as written (size or sha256 not the recorded
    ones) or were made under other teacher.json entries (``metadata``, their schema's)."""
    damaged = damaged_shards(folder)
    for shard in complete_shards(folder):
        if shard not in damaged:
            schema = pa.ipc.open_file(folder.open_input(shard)).schema
            if (schema.metadata or {}).get(b"flowprep", b"").decode() != metadata["flowprep"]:
                damaged[shard] = "made under other teacher options than its teacher.json says"
    if damaged:
        shard, reason = next(iter(damaged.items()))
        more = f" (and {len(damaged) - 1} more target shards)" if len(damaged) > 1 else ""
        raise TeacherMismatch(f"{folder / shard} is damaged: {reason}{more}. Run `flowprep verify` with --repair on the "
                              "output to drop it, then rerun this command to compute its targets again")


def local_outputs(items: Iterable[WorkItem], reader: ShardReader, model: TeacherModel) -> Iterator[tuple[WorkItem, list[SegmentOutputs]]]:
    """``(item, outputs)`` for each item, computed in this process; a model that raises fails
    the item's videos (stage ``model``), as on Ray."""
    for item in items:
        windows = read_windows(reader, item, model.config.grid)
        try:
            outputs = model.run(windows)
        except Exception as e:  # the model's own error, whatever its type: the videos fail, not the run
            outputs = [SegmentOutputs(w.segment, None, f"{type(e).__name__}: {e}", "model") for w in windows]
        yield item, outputs


@dataclass
class PreparedModel:
    """What a run computes with, checked before anything is written: the weights (``None`` for
    a factory that loads its own), class count, device, a model on the CPU and its output sizes."""

    state: dict | None
    num_classes: int
    device: str
    cpu_model: TeacherModel
    dims: dict[str, int]


def prepare_model(config: TeacherConfig, reader: ShardReader) -> PreparedModel:
    """Load and check ``config``'s model for ``reader``'s shards: an unreadable checkpoint, one
    that does not fit, an unknown output or device, or a class count other than the shards'
    label map fails here, before the teacher folder exists."""
    if not config.outputs:
        raise OptionError("--outputs names no output: logits, embedding or end-point names", "outputs")
    device = resolve_device(config.device)
    state = load_state(config.checkpoint) if config.checkpoint else None
    num_classes = config.num_classes or (checkpoint_num_classes(state) if state else None)
    if num_classes is None:
        raise OptionError("--num-classes is needed: the checkpoint does not tell it", "num_classes")
    if reader.label_map and num_classes != len(reader.label_map):
        raise TeacherMismatch(f"the teacher has {num_classes} classes, {reader.out}'s label map {len(reader.label_map)}: "
                              "a teacher of these shards' classes is needed")
    model = TeacherModel(config, state, num_classes, reader.flow_bound, "cpu")
    try:
        dims = model.output_dims()
    except ValueError as e:  # an output the model does not have
        raise OptionError(str(e), "outputs") from None
    return PreparedModel(state, num_classes, device, model, dims)


def compute_targets(
    out: str | Path,
    name: str,
    config: TeacherConfig,
    *,
    overwrite: bool = False,
    retry_failed: bool = False,
    workers: int | None = None,
    ray_address: str | None = None,
    progress: bool | None = None,
) -> TeacherReport:
    """Store ``config``'s outputs for every view of every video of ``out`` in ``out/teachers/name``.

    ``workers=0`` runs in this process; else Ray (:func:`flowprep.teacher.actors.ray_teacher_outputs`).
    Resumable: complete target shards are kept (checked against their recorded size and sha256),
    the others are done again, so a killed run reruns to the same files; with ``retry_failed``
    the target shards holding failures are computed again too. One run at a time writes a
    teacher folder (its lock, :mod:`flowprep.lock`). Raises :class:`~flowprep.networks.CheckpointMismatch`,
    :class:`TeacherMismatch`, :class:`~flowprep.lock.OutputLocked`, and ``ValueError`` for
    unusable options (:class:`~flowprep.errors.OptionError` naming the option). Nothing is
    written when the options or the model fail their checks.
    """
    reader = ShardReader(out)  # before anything is made: OUT must be an extract output, with flow
    if not reader.has_flow:
        raise OptionError(f"{out} was extracted with --flow none: it holds no flow, and the teacher runs on flow", "out")
    folder = storage(teacher_dir(out, name))
    prepared = prepare_model(config, reader)
    folder.makedirs()
    with output_lock(folder) as lock:
        return _compute_targets(reader, folder, lock, name, config, prepared, overwrite, retry_failed, workers,
                                ray_address, progress)


def _compute_targets(reader: ShardReader, folder: Storage, lock: HeldLock, name: str, config: TeacherConfig,
                     prepared: PreparedModel, overwrite: bool, retry_failed: bool, workers: int | None,
                     ray_address: str | None, progress: bool | None) -> TeacherReport:
    out, device, dims = reader.storage, prepared.device, prepared.dims
    description = describe_teacher(reader, name, config, prepared.num_classes, dims, device)
    metadata = {"flowprep": json.dumps({k: description[k] for k in ("schema_version", "params", "sources")}, sort_keys=True)}
    prepare_teacher(out, folder, description, overwrite)
    for path in remove_leftovers(folder):
        log.info("removed %s, left by an interrupted run", path)
    check_targets(folder, metadata)
    failures = read_failures(folder)
    if retry_failed:
        again = sorted({f["shard"] for f in failures} & set(complete_shards(folder)))
        drop_shards(folder, again)
        log.info("--retry-failed: %d target shards with failures to compute again", len(again))
    index = rebuild_index(folder, TARGET_INDEX_SCHEMA).to_pylist()
    done = set(complete_shards(folder))
    settled = [f for f in failures if f.get("shard") in done]
    # The shards as the reader's index has them: one view of the output, however an extract
    # beside this run changes it.
    todo = [s for s in dict.fromkeys(reader.meta(v)["shard"] for v in reader.video_ids) if target_shard(s) not in done]
    report = TeacherReport(videos=len(reader), skipped=len(index) + len(settled), failed=len(settled), failures=settled)
    total_views = views_to_compute(reader, todo, config.grid)
    log.info("teacher %s: %d videos, %d done before, %d views to compute", name, len(reader), report.skipped, total_views)

    items = plan_items(reader, todo, config.grid, views_per_item(config.batch_size))
    if workers == 0 or not todo:
        model = prepared.cpu_model if device == "cpu" else \
            TeacherModel(config, prepared.state, prepared.num_classes, reader.flow_bound, device)
        results = local_outputs(items, reader, model)
    else:
        from flowprep.teacher.actors import ray_teacher_outputs

        results = ray_teacher_outputs(items, out, config, prepared.state, prepared.num_classes, reader.flow_bound, device,
                                      workers, ray_address)
    schema = target_schema(dims, metadata)
    bar = tqdm(total=total_views, unit="view", disable=None if progress is None else not progress, dynamic_ncols=True)
    # The kept failures replace the file at once: a kill never loses them.
    write_failures(folder, report.failures)
    start = time.perf_counter()
    buffer = TargetShardBuffer()
    with closing(results):  # a Ray run's actors are killed however this loop ends
        for item, outputs in results:
            for result in outputs:
                buffer.add(result)
                report.views += len(result.segment.views) if result.error is None else 0
                bar.update(len(result.segment.views))
            if item.last:
                lock.check()  # a run that lost its lock publishes nothing more
                _finish_shard(folder, item, buffer, schema, dims, reader, index, report)
                buffer = TargetShardBuffer()
            report.seconds = time.perf_counter() - start
            bar.set_postfix(views_s=f"{report.views_per_second:.1f}", failed=report.failed)
    bar.close()
    report.stored = len(index)
    return report


def _finish_shard(folder: Storage, item: WorkItem, buffer: TargetShardBuffer, schema: pa.Schema, dims: dict[str, int],
                  reader: ShardReader, index: list[dict], report: TeacherReport) -> None:
    """Record the failures of ``item``'s shard and publish its target shard, extending ``index``.
    A shard with videos lost to worker faults is not published: the next run computes it whole."""
    shard = target_shard(item.shard)
    lost = [(v, "views", e) for v, e in item.unviewable] + buffer.failed()
    for video_id, stage, error in lost:
        report.failures.append({"video_id": video_id, "stage": stage, "error": error, "shard": shard})
        log.warning("no targets for %s (%s): %s", video_id, stage, error)
    report.failed += len(lost)
    write_failures(folder, report.failures)  # before the shard: a complete shard's failures are never lost
    if any(stage == "worker" for _, stage, _ in lost):
        log.warning("target shard %s not written: videos lost with their workers; the next run computes it", shard)
        return
    rows = buffer.write(folder, shard, schema, dims, reader)
    index += rows
    write_table(folder, INDEX, pa.Table.from_pylist(index, schema=TARGET_INDEX_SCHEMA))
    report.written += len(rows)
    log.info("target shard complete: %s", shard)
