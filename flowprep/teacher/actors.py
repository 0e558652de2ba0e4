"""The teacher's Ray actors: readers that gather the stored flow of work items, and model workers
that run the teacher on it; the plumbing shared with extract is :mod:`flowprep.cluster`."""

from __future__ import annotations

import logging

import cv2
import ray

from flowprep.cluster import cluster_cpus, cluster_gpus, in_order, kill_actors, start_ray, video_error, worker_count
from flowprep.shards.reader import ShardReader
from flowprep.teacher.items import WorkItem, read_windows
from flowprep.teacher.model import SegmentOutputs, TeacherConfig, TeacherModel
from flowprep.teacher.views import ViewGrid

log = logging.getLogger(__name__)


class FlowWindowReader:
    """Reads the stored flow of teacher work items (:func:`~flowprep.teacher.items.read_windows`)."""

    def __init__(self, out: str, grid: ViewGrid):
        cv2.setNumThreads(1)
        self.reader, self.grid = ShardReader(out), grid

    def read(self, item: WorkItem):
        return read_windows(self.reader, item, self.grid)


class TeacherWorker:
    """One teacher model on a GPU, or on one CPU core, run over the windows of work items."""

    def __init__(self, config: TeacherConfig, state, num_classes: int, flow_bound: float, device: str, threads: int | None):
        self.model = TeacherModel(config, state, num_classes, flow_bound, device, threads)

    def run(self, windows):
        return self.model.run(windows)


def ray_teacher_outputs(items, out, config: TeacherConfig, state, num_classes: int, flow_bound: float, device: str,
                        workers: int | None = None, address: str | None = None):
    """``(item, outputs)`` for each work item of ``items``, in order, computed by Ray actors.

    Model actors: ``workers`` of them (default one per GPU of the cluster when ``device`` is
    ``cuda``, else one per CPU, each with one torch thread); readers: one per 4 CPUs beside GPU
    actors, one per 8 CPU actors otherwise. Each item is read by a reader and its windows go
    straight to a model actor (the driver never holds the flow); ``2 x workers + readers`` items
    are in flight, consumed in order.
    """
    start_ray(address, workers if device == "cpu" else None)
    cpus, gpus = cluster_cpus(), cluster_gpus()
    on_gpu = device.startswith("cuda")
    if on_gpu and not gpus:
        raise ValueError("--device cuda: the Ray cluster has no GPU")
    workers = worker_count(workers, *((gpus, "GPUs") if on_gpu else (cpus, "CPUs")))
    readers = max(1, cpus // 4) if on_gpu else max(1, workers // 8)
    state_ref = ray.put(state)
    resources = {"num_cpus": 1, "num_gpus": 1} if on_gpu else {"num_cpus": 1}
    models = [ray.remote(TeacherWorker).options(max_restarts=-1, **resources)
              .remote(config, state_ref, num_classes, flow_bound, device, None if on_gpu else 1) for _ in range(workers)]
    window_readers = [ray.remote(FlowWindowReader).options(num_cpus=0, max_restarts=-1, scheduling_strategy="SPREAD")
                      .remote(str(out), config.grid) for _ in range(readers)]
    ray.get([a.__ray_ready__.remote() for a in models + window_readers])
    log.info("ray: %d teacher workers on %s, %d readers", workers, device, readers)
    return _teacher_in_order(items, window_readers, models, state_ref)


def _teacher_in_order(items, readers, models, state_ref):
    """Items in flight, results in order. Holds ``state_ref`` (the weights) so that a restarted
    model actor can be constructed again."""

    def submit(i: int, item: WorkItem):
        return models[i % len(models)].run.remote(readers[i % len(readers)].read.remote(item))

    try:
        for item, ref in in_order(items, submit, 2 * len(models) + len(readers)):
            yield _teacher_result(item, ref)
    finally:
        kill_actors(models + readers)


def _teacher_result(item: WorkItem, ref) -> tuple[WorkItem, list[SegmentOutputs]]:
    """The outputs of ``item``; a dead or failing worker fails the item's videos, not the run."""
    try:
        return item, ray.get(ref)
    except ray.exceptions.RayError as e:
        error = str(video_error(e))
        return item, [SegmentOutputs(segment, None, error) for segment in item.segments]
