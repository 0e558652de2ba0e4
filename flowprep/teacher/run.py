"""``flowprep teacher``: run a flow network once over every view of the grid and store its outputs.

Stages, each a plain function or small class usable without Ray:

* :func:`plan_items` cuts each frame shard's views (in video and grid order) into
  :class:`WorkItem` s of ``views_per_item`` views, so batches span videos and a shard's items,
  hence its batches, are the same in any run (resume reproduces the bytes);
* :func:`read_windows` reads the stored flow an item needs, each frame once: ``[F, H, W, 2]``
  uint8 per video and, per view, the rows of its clip;
* :class:`TeacherModel` crops, flips and scales on its device and runs the model in batches;
* :func:`compute_targets` drives them, in this process or on Ray, and writes one target shard
  per frame shard, in order, resumable like ``flowprep extract``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from tqdm import tqdm

from flowprep.dataset import clip_indices, flow_lookup_tables
from flowprep.errors import OptionError
from flowprep.extract import versions
from flowprep.lock import LOCK, output_lock
from flowprep.shards import ShardReader
from flowprep.shards.layout import (
    FAILURES,
    INDEX,
    complete_shards,
    read_failures,
    rebuild_index,
    remove_leftovers,
    write_json,
    write_table,
)
from flowprep.storage import storage
from flowprep.teacher.models import OutputTaps, build_model, checkpoint_num_classes, load_state, load_weights
from flowprep.teacher.targets import (
    TARGET_INDEX_SCHEMA,
    TEACHER_JSON,
    TEACHER_SCHEMA_VERSION,
    source_checksums,
    target_schema,
    teacher_dir,
    write_target_shard,
)
from flowprep.teacher.views import VIEWS_RULE, View, ViewGrid

log = logging.getLogger(__name__)

# Views per work item, rounded to whole batches: about 11 starts of the default grid, 240 flow
# frames (40 MB at 256x340) read once for 64 model inputs.
ITEM_VIEWS = 64
STORED = ("float16; logits: the model's output averaged over time; embedding: the classifier's input, globally "
          "average-pooled; an end point: its output, globally average-pooled")
FLOW_INPUT = "flow as ClipDataset gives it: uint8 q -> q / 127.5 - 1 (float16 shards: pixels / bound, clipped to [-1, 1]), flipped clips mirrored with x negated; [B, 2, T, crop, crop]"


class TeacherMismatch(Exception):
    """The teacher folder holds targets made with other options or from other shards."""


@dataclass(frozen=True)
class TeacherConfig:
    """What the targets depend on. ``model``: ``i3d``, ``s3dg`` or ``package.module:factory``;
    ``checkpoint``: a state-dict file (``None`` only for a factory that loads its own weights);
    ``outputs``: ``logits``, ``embedding`` and/or end-point names."""

    model: str
    checkpoint: str | None
    grid: ViewGrid = ViewGrid()
    outputs: tuple[str, ...] = ("logits",)
    num_classes: int | None = None
    batch_size: int = 8
    device: str = "auto"


@dataclass(frozen=True)
class Segment:
    """Consecutive views of one video of ``positions`` flow positions, in grid order."""

    video_id: str
    positions: int
    views: tuple[View, ...]


@dataclass(frozen=True)
class WorkItem:
    """Views of one frame shard's videos. ``last``: the shard's final item, which also carries
    ``unviewable``, the shard's videos that have no view, as ``(video_id, reason)``."""

    shard: str
    segments: tuple[Segment, ...]
    last: bool = False
    unviewable: tuple[tuple[str, str], ...] = ()


@dataclass
class FlowWindows:
    """What the model needs for one segment: ``frames`` ``[F, H, W, 2]`` stored flow (uint8 or
    float16) and ``clips`` ``[V, T]`` the rows of ``frames`` of each view's clip; or ``error``."""

    segment: Segment
    frames: np.ndarray | None = None
    clips: np.ndarray | None = None
    error: str | None = None


@dataclass
class SegmentOutputs:
    segment: Segment
    outputs: dict[str, np.ndarray] | None  # name -> [V, dim] float16
    error: str | None = None


def plan_items(reader: ShardReader, shards: Iterable[str], grid: ViewGrid, views_per_item: int) -> Iterator[WorkItem]:
    """The work items of ``shards``, in order; every shard ends with a ``last`` item (empty when
    none of its videos has a view)."""
    by_shard: dict[str, list[str]] = {}
    for video_id in reader.video_ids:
        by_shard.setdefault(reader.meta(video_id)["shard"], []).append(video_id)
    for shard in shards:
        segments: list[Segment] = []
        unviewable: list[tuple[str, str]] = []
        for video_id in by_shard.get(shard, []):
            meta = reader.meta(video_id)
            positions = meta["num_frames"] - 1
            try:
                views = grid.views(positions, meta["height"], meta["width"])
            except ValueError as e:
                unviewable.append((video_id, str(e)))
                continue
            first = 0
            while first < len(views):
                room = views_per_item - sum(len(s.views) for s in segments)
                segments.append(Segment(video_id, positions, tuple(views[first : first + room])))
                first += room
                if sum(len(s.views) for s in segments) == views_per_item:
                    yield WorkItem(shard, tuple(segments))
                    segments = []
        yield WorkItem(shard, tuple(segments), last=True, unviewable=tuple(unviewable))


def read_windows(reader: ShardReader, item: WorkItem, grid: ViewGrid) -> list[FlowWindows]:
    """Read the stored flow of ``item``'s views, each frame once per segment."""
    windows = []
    for segment in item.segments:
        clips = np.stack([clip_indices(segment.positions, grid.clip_len, grid.frame_stride, v.start) for v in segment.views])
        needed = np.unique(clips)
        try:
            frames = reader.flow_at(segment.video_id, needed.tolist(), raw=True)
        except (OSError, ValueError, IndexError, KeyError) as e:
            windows.append(FlowWindows(segment, error=f"{type(e).__name__}: {e}"))
            continue
        windows.append(FlowWindows(segment, frames, np.searchsorted(needed, clips)))
    return windows


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: torch sees no CUDA device here")
    return device


class TeacherModel:
    """A teacher network in eval mode on one device, run over :class:`FlowWindows` in batches.

    Inputs are built on the device from the stored flow: crop, mirror, and the lookup tables of
    :class:`ClipDataset`, so a stored target is the model's output on ClipDataset's clip of that view.
    """

    def __init__(self, config: TeacherConfig, state: dict | None, num_classes: int, flow_bound: float,
                 device: str = "cpu", threads: int | None = None):
        if threads:
            torch.set_num_threads(threads)
        self.config, self.device, self.flow_bound = config, torch.device(device), flow_bound
        self.model = build_model(config.model, 2, num_classes)
        if state is not None:
            load_weights(self.model, state)
        self.model.eval().to(self.device)
        self.luts = {flip: torch.from_numpy(t).to(self.device) for flip, t in flow_lookup_tables().items()}

    def output_dims(self) -> dict[str, int]:
        """Each output's size, from one forward on a zero clip."""
        grid = self.config.grid
        zeros = torch.zeros(1, 2, grid.clip_len, grid.crop, grid.crop, device=self.device)
        return {name: value.shape[1] for name, value in self.forward(zeros).items()}

    def forward(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """``[B, 2, T, crop, crop]`` float32 -> name -> ``[B, dim]`` float32."""
        with torch.inference_mode(), torch.autocast("cuda", torch.float16, enabled=self.device.type == "cuda"):
            with OutputTaps(self.model, self.config.outputs) as taps:
                return {k: v.float() for k, v in taps.collect(self.model(batch)).items()}

    def clip(self, frames: torch.Tensor, rows: np.ndarray, view: View) -> torch.Tensor:
        """One view's input ``[2, T, crop, crop]`` float32 from a segment's ``[F, H, W, 2]`` frames."""
        crop = self.config.grid.crop
        x = frames[torch.tensor(rows, device=self.device), view.top : view.top + crop, view.left : view.left + crop]
        if view.flip:
            x = x.flip(2)
        x = x.permute(3, 0, 1, 2)
        if x.dtype == torch.uint8:
            lut = self.luts[view.flip]
            return torch.stack([lut[0][x[0].long()], lut[1][x[1].long()]])
        sign = torch.tensor([-1.0 if view.flip else 1.0, 1.0], device=self.device).view(2, 1, 1, 1)
        return (x.float() / self.flow_bound).clamp(-1, 1) * sign

    def run(self, windows: list[FlowWindows]) -> list[SegmentOutputs]:
        """Outputs of every view of ``windows``, batches of ``batch_size`` across segments."""
        good = [w for w in windows if w.error is None]
        # Copied: windows from Ray's object store are read-only.
        frames = [torch.from_numpy(w.frames.copy()).to(self.device) for w in good]
        todo = [(i, v) for i, w in enumerate(good) for v in range(len(w.segment.views))]
        results: list[dict[str, torch.Tensor]] = []
        for b in range(0, len(todo), self.config.batch_size):
            batch = torch.stack([self.clip(frames[i], good[i].clips[v], good[i].segment.views[v]) for i, v in todo[b : b + self.config.batch_size]])
            results.append(self.forward(batch))
        merged = {k: torch.cat([r[k] for r in results]).half().cpu().numpy() for k in results[0]} if results else {}
        out, row = [], 0
        for w in windows:
            if w.error is not None:
                out.append(SegmentOutputs(w.segment, None, w.error))
                continue
            n = len(w.segment.views)
            out.append(SegmentOutputs(w.segment, {k: v[row : row + n] for k, v in merged.items()}))
            row += n
        return out


class TargetShardBuffer:
    """The outputs of one frame shard's videos as they arrive, segment by segment; a video with
    a failed segment is left out whole."""

    def __init__(self):
        self.videos: dict[str, dict] = {}

    def add(self, result: SegmentOutputs) -> None:
        video = self.videos.setdefault(result.segment.video_id, {"positions": result.segment.positions, "views": [],
                                                                 "outputs": [], "error": None})
        if result.error is not None:
            video["error"] = video["error"] or result.error
        else:
            video["views"] += result.segment.views
            video["outputs"].append(result.outputs)

    def failed(self) -> list[tuple[str, str]]:
        return [(video_id, v["error"]) for video_id, v in self.videos.items() if v["error"] is not None]

    def write(self, folder: Path, shard: str, schema, dims: dict[str, int], reader: ShardReader) -> list[dict]:
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
    """What one run did; ``seconds`` from the first item submitted to the last written."""

    videos: int = 0
    skipped: int = 0
    written: int = 0
    failed: int = 0
    views: int = 0
    seconds: float = 0.0
    failures: list[dict] = field(default_factory=list)

    @property
    def views_per_second(self) -> float:
        return self.views / self.seconds if self.seconds > 0 else 0.0


def file_sha256(path: str | Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def describe_teacher(out: Path, name: str, config: TeacherConfig, num_classes: int, dims: dict[str, int], device: str) -> dict:
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
        "sources": source_checksums(out),
        "run": {"checkpoint": config.checkpoint and str(Path(config.checkpoint).resolve()), "batch_size": config.batch_size,
                "device": device},
        "versions": versions(),
    }


def prepare_teacher(folder: Path, description: dict, overwrite: bool) -> None:
    """Create ``folder``, or check that its targets were made with the same params from the same shards."""
    path = folder / TEACHER_JSON
    if overwrite:  # everything but the lock this run holds
        for child in folder.iterdir():
            if child.name != LOCK:
                shutil.rmtree(child) if child.is_dir() else child.unlink()
    elif path.exists():
        previous = json.loads(path.read_text())
        for key in ("schema_version", "params", "sources"):
            old, new = previous.get(key), description[key]
            if old != new:
                changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k)) if isinstance(old, dict) else [key]
                raise TeacherMismatch(f"{folder} holds targets with other {key} ({', '.join(changed)}). "
                                      "Use another --name, the same options, or --overwrite to start over.")
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder, TEACHER_JSON, description)


def _views_of(reader: ShardReader, video_id: str, grid: ViewGrid) -> int:
    meta = reader.meta(video_id)
    try:
        return grid.count(meta["num_frames"] - 1, meta["height"], meta["width"])
    except ValueError:  # too small for the crop: no view
        return 0


def local_outputs(items: Iterable[WorkItem], reader: ShardReader, model: TeacherModel) -> Iterator[tuple[WorkItem, list[SegmentOutputs]]]:
    """``(item, outputs)`` for each item, computed in this process."""
    for item in items:
        yield item, model.run(read_windows(reader, item, model.config.grid))


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

    ``workers=0`` runs in this process; else Ray (:func:`flowprep.ray_runner.ray_teacher_outputs`).
    Resumable: complete target shards are kept, the others are done again, so a killed run
    reruns to the same files. One run at a time writes a teacher folder (its lock,
    :mod:`flowprep.lock`). Raises :class:`~flowprep.teacher.models.CheckpointMismatch`,
    :class:`TeacherMismatch`, :class:`~flowprep.lock.OutputLocked`, and ``ValueError`` for
    unusable options (:class:`~flowprep.errors.OptionError` naming ``out`` when it holds no flow).
    """
    reader = ShardReader(out)  # before anything is made: OUT must be an extract output, with flow
    if not reader.has_flow:
        raise OptionError(f"{out} was extracted with --flow none: it holds no flow, and the teacher runs on flow", "out")
    folder = teacher_dir(out, name)
    folder.mkdir(parents=True, exist_ok=True)
    with output_lock(folder):
        return _compute_targets(reader, name, config, overwrite, workers, ray_address, progress)


def _compute_targets(reader: ShardReader, name: str, config: TeacherConfig, overwrite: bool, workers: int | None,
                     ray_address: str | None, progress: bool | None) -> TeacherReport:
    out = reader.out
    state = load_state(config.checkpoint) if config.checkpoint else None
    num_classes = config.num_classes or (checkpoint_num_classes(state) if state else None)
    if num_classes is None:
        raise ValueError("--num-classes is needed: the checkpoint does not tell it")
    device = resolve_device(config.device)
    # Built here first: a checkpoint that does not fit fails before anything starts.
    probe = TeacherModel(config, state, num_classes, reader.flow_bound, "cpu")
    dims = probe.output_dims()
    folder = teacher_dir(out, name)
    description = describe_teacher(out, name, config, num_classes, dims, device)
    prepare_teacher(folder, description, overwrite)
    for path in remove_leftovers(folder):
        log.info("removed %s, left by an interrupted run", path)
    index = rebuild_index(folder, TARGET_INDEX_SCHEMA).to_pylist()
    done = set(complete_shards(folder))
    settled = [f for f in read_failures(folder) if f.get("shard") in done]
    todo = [s for s in complete_shards(out) if s not in done]
    report = TeacherReport(videos=len(reader), skipped=len(index) + len(settled), failed=len(settled), failures=settled)
    views_per_item = config.batch_size * max(1, round(ITEM_VIEWS / config.batch_size))
    total_views = sum(_views_of(reader, video_id, config.grid) for video_id in reader.video_ids
                      if reader.meta(video_id)["shard"] in todo)
    log.info("teacher %s: %d videos, %d done before, %d views to compute", name, len(reader), report.skipped, total_views)

    items = plan_items(reader, todo, config.grid, views_per_item)
    if workers == 0 or not todo:
        model = probe if device == "cpu" else TeacherModel(config, state, num_classes, reader.flow_bound, device)
        results = local_outputs(items, reader, model)
    else:
        from flowprep.ray_runner import ray_teacher_outputs

        results = ray_teacher_outputs(items, out, config, state, num_classes, reader.flow_bound, device, workers, ray_address)
    metadata = {"flowprep": json.dumps({k: description[k] for k in ("schema_version", "params", "sources")}, sort_keys=True)}
    schema = target_schema(dims, metadata)
    bar = tqdm(total=total_views, unit="view", disable=None if progress is None else not progress, dynamic_ncols=True)
    # The kept failures replace the file at once: a kill never loses them.
    storage(folder).write(FAILURES, "".join(json.dumps(f) + "\n" for f in settled).encode())
    start = time.perf_counter()
    buffer = TargetShardBuffer()
    with open(folder / FAILURES, "a") as failures:
        for item, outputs in results:
            for result in outputs:
                buffer.add(result)
                report.views += len(result.segment.views) if result.error is None else 0
                bar.update(len(result.segment.views))
            if item.last:
                lost = [(v, "views", e) for v, e in item.unviewable] + [(v, "read", e) for v, e in buffer.failed()]
                for video_id, stage, error in lost:
                    entry = {"video_id": video_id, "stage": stage, "error": error, "shard": item.shard}
                    failures.write(json.dumps(entry) + "\n")
                    report.failures.append(entry)
                    log.warning("no targets for %s (%s): %s", video_id, stage, error)
                failures.flush()
                report.failed += len(lost)
                rows = buffer.write(folder, item.shard, schema, dims, reader)
                index += rows
                write_table(folder, INDEX, pa.Table.from_pylist(index, schema=TARGET_INDEX_SCHEMA))
                report.written += len(rows)
                buffer = TargetShardBuffer()
                log.info("target shard complete: %s", item.shard)
            report.seconds = time.perf_counter() - start
            bar.set_postfix(views_s=f"{report.views_per_second:.1f}", failed=report.failed)
    bar.close()
    return report
