"""The teacher's Ray actors: readers that gather the stored flow of work items, and model workers
that run the teacher on it; the plumbing shared with extract is :mod:`flowprep.cluster`.

Faults, as extract handles them: a reader or model worker lost with its process or node is a
fault of the cluster, not of the videos. Its item goes to a live worker (``ITEM_ATTEMPTS`` in
all); the lost worker is restarted by Ray and rejoins once it answers. An item lost on every
attempt fails its videos with stage ``worker``, which the run never settles. An item is computed
whole by one worker in the batches it defines, so where it ran changes no batch.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Iterator

import cv2
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from flowprep.cluster import (
    LiveWorkers,
    cluster_cpus,
    cluster_gpus,
    in_order,
    is_cluster_fault,
    kill_actors,
    start_ray,
    wait_for_workers,
    worker_count,
)
from flowprep.shards.reader import ShardReader
from flowprep.teacher.items import WorkItem, read_windows
from flowprep.teacher.model import SegmentOutputs, TeacherConfig, TeacherModel
from flowprep.teacher.views import ViewGrid

log = logging.getLogger(__name__)

# Attempts at an item whose reader or model worker was lost.
ITEM_ATTEMPTS = 4


class FlowWindowReader:
    """Reads the stored flow of teacher work items (:func:`~flowprep.teacher.items.read_windows`)."""

    def __init__(self, out: str, grid: ViewGrid):
        cv2.setNumThreads(1)
        self.reader, self.grid = ShardReader(out), grid

    def read(self, item: WorkItem):
        return read_windows(self.reader, item, self.grid)

    def device(self) -> str:
        return "cpu"


class TeacherWorker:
    """One teacher model on a GPU, or on one CPU core, run over the windows of work items."""

    def __init__(self, config: TeacherConfig, state, num_classes: int, flow_bound: float, device: str, threads: int | None):
        self.model = TeacherModel(config, state, num_classes, flow_bound, device, threads)

    def run(self, windows):
        return self.model.run(windows)

    def device(self) -> str:
        return str(self.model.device)


def ray_teacher_outputs(items: Iterable[WorkItem], out, config: TeacherConfig, state, num_classes: int, flow_bound: float,
                        device: str, workers: int | None = None, address: str | None = None
                        ) -> Iterator[tuple[WorkItem, list[SegmentOutputs]]]:
    """``(item, outputs)`` for each work item of ``items``, in order, computed by Ray actors; a
    generator that starts them on its first step and kills them when it ends or is closed.

    Model actors: ``workers`` of them (default one per GPU of the cluster when ``device`` is
    ``cuda``, else one per CPU, each with one torch thread); the run starts once one is placed,
    the others join when the cluster has room. Readers: one per 4 CPUs beside GPU actors, one per
    8 CPU actors otherwise; on a cluster of more than one node they run on this node, since the
    shards are a local folder that other nodes may not see. Each item is read by a reader and its
    windows go straight to a model actor (the driver never holds the flow); ``2 x workers +
    readers`` items are in flight, consumed in order.
    """
    start_ray(address, workers if device == "cpu" else None)
    cpus, gpus = cluster_cpus(), cluster_gpus()
    on_gpu = device.startswith("cuda")
    if on_gpu and not gpus:
        raise ValueError("--device cuda: the Ray cluster has no GPU")
    workers = worker_count(workers, *((gpus, "GPUs") if on_gpu else (cpus, "CPUs")))
    readers = max(1, cpus // 4) if on_gpu else max(1, workers // 8)
    # Held until the end: a restarted model actor is constructed again from these weights.
    state_ref = ray.put(state)
    resources = {"num_cpus": 1, "num_gpus": 1} if on_gpu else {"num_cpus": 1}
    here = sum(node["Alive"] for node in ray.nodes()) > 1
    placement = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False) if here else "SPREAD"
    models = [ray.remote(TeacherWorker).options(max_restarts=-1, **resources)
              .remote(config, state_ref, num_classes, flow_bound, device, None if on_gpu else 1) for _ in range(workers)]
    window_readers = [ray.remote(FlowWindowReader).options(num_cpus=0, max_restarts=-1, scheduling_strategy=placement)
                      .remote(str(out), config.grid) for _ in range(readers)]
    try:
        wait_for_workers(window_readers, "flow readers")
        wait_for_workers(models, "teacher workers")  # a model that cannot be built fails here
        log.info("ray: %d teacher workers on %s, %d readers%s", workers, device, readers, " on this node" if here else "")
        cluster = _TeacherCluster(models, window_readers)
        for item, task in in_order(items, lambda _, item: cluster.submit(item), 2 * len(models) + len(window_readers)):
            yield item, cluster.result(item, *task)
    finally:
        kill_actors(models + window_readers)


class _TeacherCluster:
    """Hands items to live readers and model workers and collects their outputs, sending an
    item whose worker was lost to a live one."""

    def __init__(self, models: list, readers: list):
        self.models = LiveWorkers(models, "teacher worker")
        self.readers = LiveWorkers(readers, "flow reader")
        self.load: Counter = Counter()  # model worker -> items in its hands
        self.turn = 0  # readers take items in turn

    def submit(self, item: WorkItem):
        """Send ``item`` to the least loaded live model worker, its flow read by the next live
        reader; returns ``(task, model worker, reader)``."""
        model = min(self.models.alive(), key=lambda w: (self.load[w], w))
        readers = self.readers.alive()
        reader = readers[self.turn % len(readers)]
        self.turn += 1
        windows = self.readers.actors[reader].read.remote(item)
        self.load[model] += 1
        return self.models.actors[model].run.remote(windows), model, reader

    def result(self, item: WorkItem, task, model: int, reader: int) -> list[SegmentOutputs]:
        """The outputs of ``item``. A model that raises fails the item's videos (stage ``model``);
        a lost worker's item is computed again elsewhere, and fails them (stage ``worker``, never
        settled) only when it is lost ``ITEM_ATTEMPTS`` times."""
        for attempt in range(1, ITEM_ATTEMPTS + 1):
            try:
                return ray.get(task)
            except ray.exceptions.RayError as e:
                if not is_cluster_fault(e):
                    cause = getattr(e, "cause", e)
                    return [SegmentOutputs(s, None, f"{type(cause).__name__}: {cause}", "model") for s in item.segments]
                # Either may be the one lost: one that still answers rejoins at once.
                self.models.lost(model)
                self.readers.lost(reader)
                log.warning("%s: work item lost with its teacher worker or reader (%s), attempt %d of %d",
                            item.shard, type(e).__name__, attempt, ITEM_ATTEMPTS)
                error = f"lost with its worker {ITEM_ATTEMPTS} times: {type(e).__name__}"
            finally:
                self.load[model] -= 1
            if attempt < ITEM_ATTEMPTS:
                task, model, reader = self.submit(item)
        return [SegmentOutputs(s, None, error, "worker") for s in item.segments]
