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
import shutil
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
from flowprep.lock import LOCK, HeldLock, output_lock
from flowprep.networks import checkpoint_num_classes, load_state
from flowprep.provenance import file_sha256, versions
from flowprep.shards.layout import (
    INDEX,
    complete_shards,
    description_difference,
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


def prepare_teacher(folder: Storage, description: dict, overwrite: bool) -> None:
    """Create ``folder``, or check that its targets were made with the same params from the same shards."""
    if overwrite:  # everything but the lock this run holds
        for child in folder.location.iterdir():
            if child.name != LOCK:
                shutil.rmtree(child) if child.is_dir() else child.unlink()
    elif folder.exists(TEACHER_JSON):
        changed = description_difference(json.loads(folder.read_bytes(TEACHER_JSON)), description, ("schema_version", "params", "sources"))
        if changed:
            raise TeacherMismatch(f"{folder} holds targets with other {changed[0]} ({changed[1]}). "
                                  "Use another --name, the same options, or --overwrite to start over.")
    folder.makedirs()
    write_json(folder, TEACHER_JSON, description)


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


def compute_targets(
    out: str | Path,
    name: str,
    config: TeacherConfig,
    *,
    overwrite: bool = False,
    workers: int | None = None,
    ray_address: str | None = None,
    progress: bool | None = None,
) -> TeacherReport:
    """Store ``config``'s outputs for every view of every video of ``out`` in ``out/teachers/name``.

    ``workers=0`` runs in this process; else Ray (:func:`flowprep.teacher.actors.ray_teacher_outputs`).
    Resumable: complete target shards are kept, the others are done again, so a killed run
    reruns to the same files. One run at a time writes a teacher folder (its lock,
    :mod:`flowprep.lock`). Raises :class:`~flowprep.networks.CheckpointMismatch`,
    :class:`TeacherMismatch`, :class:`~flowprep.lock.OutputLocked`, and ``ValueError`` for
    unusable options (:class:`~flowprep.errors.OptionError` naming ``out`` when it holds no flow).
    """
    reader = ShardReader(out)  # before anything is made: OUT must be an extract output, with flow
    if not reader.has_flow:
        raise OptionError(f"{out} was extracted with --flow none: it holds no flow, and the teacher runs on flow", "out")
    folder = storage(teacher_dir(out, name))
    folder.makedirs()
    with output_lock(folder) as lock:
        return _compute_targets(reader, folder, lock, name, config, overwrite, workers, ray_address, progress)


def _compute_targets(reader: ShardReader, folder: Storage, lock: HeldLock, name: str, config: TeacherConfig,
                     overwrite: bool, workers: int | None, ray_address: str | None, progress: bool | None) -> TeacherReport:
    out = reader.storage
    state = load_state(config.checkpoint) if config.checkpoint else None
    num_classes = config.num_classes or (checkpoint_num_classes(state) if state else None)
    if num_classes is None:
        raise ValueError("--num-classes is needed: the checkpoint does not tell it")
    device = resolve_device(config.device)
    # Built here first: a checkpoint that does not fit fails before anything starts.
    probe = TeacherModel(config, state, num_classes, reader.flow_bound, "cpu")
    dims = probe.output_dims()
    description = describe_teacher(reader, name, config, num_classes, dims, device)
    prepare_teacher(folder, description, overwrite)
    for path in remove_leftovers(folder):
        log.info("removed %s, left by an interrupted run", path)
    index = rebuild_index(folder, TARGET_INDEX_SCHEMA).to_pylist()
    done = set(complete_shards(folder))
    settled = [f for f in read_failures(folder) if f.get("shard") in done]
    # The shards as the reader's index has them: one view of the output, however an extract
    # beside this run changes it.
    todo = [s for s in dict.fromkeys(reader.meta(v)["shard"] for v in reader.video_ids) if s not in done]
    report = TeacherReport(videos=len(reader), skipped=len(index) + len(settled), failed=len(settled), failures=settled)
    total_views = views_to_compute(reader, todo, config.grid)
    log.info("teacher %s: %d videos, %d done before, %d views to compute", name, len(reader), report.skipped, total_views)

    items = plan_items(reader, todo, config.grid, views_per_item(config.batch_size))
    if workers == 0 or not todo:
        model = probe if device == "cpu" else TeacherModel(config, state, num_classes, reader.flow_bound, device)
        results = local_outputs(items, reader, model)
    else:
        from flowprep.teacher.actors import ray_teacher_outputs

        results = ray_teacher_outputs(items, out, config, state, num_classes, reader.flow_bound, device, workers, ray_address)
    metadata = {"flowprep": json.dumps({k: description[k] for k in ("schema_version", "params", "sources")}, sort_keys=True)}
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
    lost = [(v, "views", e) for v, e in item.unviewable] + buffer.failed()
    for video_id, stage, error in lost:
        report.failures.append({"video_id": video_id, "stage": stage, "error": error, "shard": item.shard})
        log.warning("no targets for %s (%s): %s", video_id, stage, error)
    report.failed += len(lost)
    write_failures(folder, report.failures)  # before the shard: a complete shard's failures are never lost
    if any(stage == "worker" for _, stage, _ in lost):
        log.warning("target shard %s not written: videos lost with their workers; the next run computes it", item.shard)
        return
    rows = buffer.write(folder, item.shard, schema, dims, reader)
    index += rows
    write_table(folder, INDEX, pa.Table.from_pylist(index, schema=TARGET_INDEX_SCHEMA))
    report.written += len(rows)
    log.info("target shard complete: %s", item.shard)
