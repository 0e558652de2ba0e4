"""Extract's Ray actors: decode actors write shards on the nodes, or stream their chunks to the driver.

* With ``--writers workers``, a ``DecodeWorker`` writes each planned shard it is given (a
  thread each): it decodes the shard's videos, has their flow solved by the flow actors, and
  writes the shard straight to the output; the driver only commits what completes.

* ``DecodeWorker`` (no CPU reserved: decoding and JPEG cost about 1 % of TV-L1) decodes several
  videos at once (threads), each as a streaming generator. It hands each chunk to the least
  loaded flow actor as soon as it exists, keeps ``FLOW_LOOKAHEAD`` of them in flight per video,
  and yields the finished chunks in order.
* ``FlowWorker`` holds one flow backend and turns chunks into stored bytes. On the CPU it takes
  one core and a chunk at a time. On a GPU it takes the GPU (or its share) and many chunks at once (a
  thread each): their pairs are solved in shared batches (:class:`PairBatcher`) while the
  threads encode finished chunks, and the driver keeps ``GPU_VIDEOS`` videos in flight for it.
* With ``--writers driver``, the driver keeps a bounded window of videos in flight and consumes
  them in input order; each generator stops after a few unconsumed chunks (Ray's generator
  backpressure), so memory stays bounded by ``window x (lookahead + backpressure) x chunk``
  however long the videos are.
* An RGB-only run (``--flow none``) starts no ``FlowWorker``: the decoders are all the work and
  yield their chunks as decoded, so none of the flow workers' fault handling is involved.

Plain actors were chosen over Ray Data: shards planned up front, each written whole by one
decoder (deterministic shards and exact resume), per-video failure records, and one long-lived
backend per actor, which the GPU solvers need, are direct here. What both jobs share (starting
Ray, sizing, waiting for workers, cluster faults) is :mod:`flowprep.cluster`.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import cv2
import ray

from flowprep.cluster import TRANSIENT, LiveWorkers, cluster_cpus, cluster_gpus, in_order, kill_actors, start_ray, \
    video_error, wait_for_workers, worker_count
from flowprep.errors import DecodeError, VideoError, WorkerError
from flowprep.flow import BACKENDS, get_backend
from flowprep.flow.batching import PairBatcher
from flowprep.pipeline import NO_FLOW, ExtractConfig, VideoChunk, decode_chunks, flow_chunk
from flowprep.shards.plan import ShardPlan
from flowprep.shards.writer import ShardResult, lost_shard, write_in_order, write_shard
from flowprep.sources import VideoSpec
from flowprep.storage import Storage

log = logging.getLogger(__name__)

# Finished chunks a video (not yet the one being written) may hold before its decoder pauses.
BACKPRESSURE_CHUNKS = 4
# Chunks of one video in the flow actors' hands at once.
FLOW_LOOKAHEAD = 3
# Videos in flight for each GPU flow actor: 32 x FLOW_LOOKAHEAD chunks of 8 frames, about 670
# pairs to batch, and enough queued that the GPU does not wait for the decoders.
GPU_VIDEOS = 32
# Threads of a GPU flow actor: every chunk that may be in its hands.
GPU_CHUNKS = 2 * GPU_VIDEOS * FLOW_LOOKAHEAD


# Attempts at a chunk's flow, and at a whole video, when the worker doing it is lost.
FLOW_ATTEMPTS = 4
VIDEO_ATTEMPTS = 3
SHARD_ATTEMPTS = 3


class FlowWorker:
    def __init__(self, config: ExtractConfig, threads: int = 1, **options):
        self.config = config
        backend = get_backend(config.flow_backend, config.flow_params, threads=threads, **options)
        self.backend = PairBatcher(backend) if getattr(backend, "batched", False) else backend
        log.info("flow worker: %s on %s", backend.name, backend.device)

    def flow(self, chunk: VideoChunk) -> VideoChunk:
        try:
            return flow_chunk(chunk, self.backend, self.config)
        finally:
            if isinstance(self.backend, PairBatcher) and not self.backend.alive:
                # Its solver thread died: a fresh process (Ray restarts the actor) instead of
                # failing every chunk still to come.
                os._exit(1)

    def device(self) -> str:
        return self.backend.device


class DecodeWorker:
    """Decodes videos and has their chunks' flow computed by the flow workers, in order (for an
    RGB-only ``config``, with no flow workers, yields the decoded chunks as they are).

    A flow worker lost while it held a chunk (its process killed, its node gone) is left aside
    until it answers again (:class:`~flowprep.cluster.LiveWorkers`), and the chunk goes to a
    live worker, up to ``FLOW_ATTEMPTS`` times. Flow is deterministic, so where
    a chunk was solved changes no byte.
    """

    def __init__(self, config: ExtractConfig, flow_worker_names: list[str]):
        cv2.setNumThreads(1)
        self.config = config
        # Names, not handles: a restarted decoder finds the flow actors again by itself.
        self.flow_workers = [ray.get_actor(name) for name in flow_worker_names]
        self._pending: dict = {}  # flow task -> (worker index, pixels still to solve)
        self._live = LiveWorkers(self.flow_workers, "flow worker")
        self._lock = threading.Lock()

    def _submit(self, chunk: VideoChunk):
        """Send ``chunk`` to the live flow worker with the fewest pixels still to solve (chunks
        differ in size, so round-robin would leave some workers idle while others queue);
        returns the task and the worker's index."""
        cost = (len(chunk.gray) - 1) * chunk.height * chunk.width
        with self._lock:
            if self._pending:
                done, _ = ray.wait(list(self._pending), num_returns=len(self._pending), timeout=0, fetch_local=False)
                for ref in done:
                    del self._pending[ref]
            load = {w: 0 for w in self._live.alive()}
            for worker, pixels in self._pending.values():
                if worker in load:
                    load[worker] += pixels
            worker = min(load, key=lambda w: (load[w], w))
            ref = self.flow_workers[worker].flow.remote(chunk)
            self._pending[ref] = (worker, cost)
        return ref, worker

    def decode(self, spec: VideoSpec):
        # One FFmpeg thread a video: decoders reserve no CPU, the flow workers own the cores (and
        # without flow, the decoders are as many as the cores).
        chunks = decode_chunks(spec, self.config, decoder_threads=1)
        if not self.config.has_flow:
            yield from chunks
            return
        in_flight = deque()  # (chunk, flow task, worker)
        try:
            for chunk in chunks:
                in_flight.append((chunk, *self._submit(chunk)))
                if len(in_flight) >= FLOW_LOOKAHEAD:
                    yield self._result(*in_flight.popleft())
        except DecodeError:
            # Chunks decoded before a decode failure are delivered first, as in-process
            # extraction does: the shard bytes must not depend on where the work ran.
            while in_flight:
                yield self._result(*in_flight.popleft())
            raise
        while in_flight:
            yield self._result(*in_flight.popleft())

    def device(self) -> str:
        return "cpu"

    def write(self, plan: ShardPlan, out: Storage, label_map: dict[str, int], metadata: dict[str, str]) -> ShardResult:
        """Decode the shard's videos (their flow solved by the flow workers) and write the shard
        straight to ``out`` (closed, not committed: the driver commits it)."""
        return write_shard(out, plan, self.config, label_map, metadata, ((spec, self.decode(spec)) for spec in plan.videos))

    def _result(self, chunk: VideoChunk, ref, worker: int) -> VideoChunk:
        """The chunk with its flow; a lost worker's chunk goes to another live one."""
        for attempt in range(1, FLOW_ATTEMPTS + 1):
            try:
                result = ray.get(ref)
            except ray.exceptions.RayTaskError as e:
                raise (e.cause if isinstance(e.cause, VideoError) else e) from None
            except TRANSIENT as e:
                with self._lock:
                    self._pending.pop(ref, None)
                    self._live.lost(worker)
                log.warning("%s frames %d+: flow worker %d lost (%s), attempt %d of %d",
                            chunk.video_id, chunk.start, worker, type(e).__name__, attempt, FLOW_ATTEMPTS)
                if attempt == FLOW_ATTEMPTS:
                    raise WorkerError(f"flow of frames {chunk.start}+ lost with its worker {FLOW_ATTEMPTS} times: "
                                      f"{type(e).__name__}") from None
                ref, worker = self._submit(chunk)
                continue
            with self._lock:
                self._pending.pop(ref, None)
            return result


def _chunks(spec: VideoSpec, decode, decoders: LiveWorkers) -> Iterator[VideoChunk]:
    """The chunks of ``spec`` from ``decode(attempt)`` (a decode task's generator and the decoder
    running it). A decoder lost on the way (its node gone) or a chunk lost with a node is a
    cluster fault: the video is decoded again by a live decoder (one restarted by Ray counts
    once it answers), up to ``VIDEO_ATTEMPTS`` times, and the chunks already delivered are
    skipped, so the writer sees each chunk once, in order."""
    delivered = 0  # frames handed out
    for attempt in range(VIDEO_ATTEMPTS):
        generator, decoder = decode(attempt)
        try:
            for ref in generator:
                chunk = ray.get(ref)
                if chunk.start < delivered:
                    continue
                delivered = chunk.start + len(chunk.rgb)
                yield chunk
            return
        except TRANSIENT as e:
            decoders.lost(decoder)
            log.warning("%s: decoder lost at frame %d (%s), attempt %d of %d", spec.video_id, delivered, type(e).__name__,
                        attempt + 1, VIDEO_ATTEMPTS)
            error = e
        except ray.exceptions.RayError as e:  # the video's own error
            for _ in generator:  # let the decoder finish this video rather than block on backpressure
                pass
            raise video_error(e) from None
    raise WorkerError(f"lost with its decoder {VIDEO_ATTEMPTS} times: {type(error).__name__}")


@dataclass
class _Cluster:
    """The flow actors of a run (none for RGB only), and how many videos (or shards) to keep in
    flight and decoders to start for them."""

    flow_workers: list
    names: list[str]
    decoders: int
    window: int


@dataclass(frozen=True)
class WorkerSizes:
    """How a run spreads over a Ray cluster: ``flow_workers`` flow actors (on GPUs when
    ``on_gpu``; none for RGB only), ``decoders`` decode actors, ``window`` videos (or shards) in flight."""

    on_gpu: bool
    flow_workers: int
    decoders: int
    window: int


def local_ray_cpus(config: ExtractConfig, workers: int | None) -> int | None:
    """The CPUs a local Ray is started with for a run (``None``: every CPU of this machine):
    ``--workers`` counts CPUs for the CPU solver and for RGB only; GPU solvers leave every CPU to
    the decoders."""
    return workers if config.flow_backend in ("opencv", NO_FLOW) else None


def size_workers(config: ExtractConfig, workers: int | None, decoders: int | None, cpus: int, gpus: int,
                 gpu_share: int) -> WorkerSizes:
    """The actors a run of ``config`` starts on a cluster of ``cpus`` CPUs and ``gpus`` GPUs with
    the options ``workers``, ``decoders`` and ``gpu_share`` (see :func:`ray_write_shards`)."""
    on_gpu = config.flow_backend == "opencv-cuda" or (config.flow_backend == "torch" and gpus > 0)
    if on_gpu and not gpus:
        raise ValueError(f"--flow {config.flow_backend} needs a GPU; the Ray cluster has none")
    workers = worker_count(workers, *((gpus * gpu_share, f"GPU shares ({gpu_share} a GPU)") if on_gpu else (cpus, "CPUs")))
    if not config.has_flow:
        # Decoding is all the work: a decoder per worker, each with two videos in flight (one
        # decoding while the other waits to be written).
        decoders = decoders or workers
        return WorkerSizes(False, 0, decoders, 2 * decoders)
    if on_gpu:
        decoders = decoders or max(1, cpus // 4)
        return WorkerSizes(True, workers, decoders, workers * GPU_VIDEOS // gpu_share + 2 * decoders)
    decoders = decoders or max(1, workers // 16)
    # Videos queued: with the lookahead, enough chunks for every worker.
    return WorkerSizes(False, workers, decoders, workers + 2 * decoders)


def _start_flow_workers(config: ExtractConfig, workers: int | None, decoders: int | None, address: str | None,
                        gpu_share: int) -> _Cluster:
    start_ray(address, local_ray_cpus(config, workers))
    sizes = size_workers(config, workers, decoders, cluster_cpus(), cluster_gpus(), gpu_share)
    if not config.has_flow:
        log.info("ray: %d decoders, no flow (RGB only)", sizes.decoders)
        return _Cluster([], [], sizes.decoders, sizes.window)
    names = [f"flowprep-flow-{uuid.uuid4().hex}" for _ in range(sizes.flow_workers)]
    # A batched backend takes many chunks at once (its PairBatcher solves them together); any
    # other holds one solver that must not be called from two threads.
    batched = getattr(BACKENDS[config.flow_backend], "batched", False)
    options = {}
    if sizes.on_gpu:
        resources = {"num_cpus": 1, "num_gpus": 1 / gpu_share, "max_concurrency": GPU_CHUNKS if batched else 1}
        if batched and gpu_share > 1:
            options["memory_fraction"] = 1 / gpu_share
    else:
        resources = {"num_cpus": 1, "max_concurrency": 2 * FLOW_LOOKAHEAD if batched else 1}
    flow_workers = [ray.remote(FlowWorker).options(name=name, max_restarts=-1, **resources).remote(config, **options) for name in names]
    devices = wait_for_workers(flow_workers, "flow workers")  # a backend that cannot start fails here
    log.info("ray: %d flow workers (%s on %s)", sizes.flow_workers, config.flow_backend, ", ".join(sorted(set(devices))))
    return _Cluster(flow_workers, names, sizes.decoders, sizes.window)


def ray_write_shards(
    plans: list[ShardPlan],
    config: ExtractConfig,
    out: Storage,
    label_map: dict[str, int],
    metadata: dict[str, str],
    workers: int | None = None,
    decoders: int | None = None,
    address: str | None = None,
    gpu_share: int = 1,
    writers: str = "auto",
    on_video: Callable[[dict | None], None] | None = None,
) -> Iterator[tuple[ShardPlan, ShardResult]]:
    """Write the shards of ``plans`` with Ray; yield each plan with its :class:`ShardResult` (its
    file closed, not committed) as it completes.

    ``workers`` flow actors (default: ``gpu_share`` per GPU of the cluster for ``torch`` and
    ``opencv-cuda`` when it has GPUs, each with that share of the GPU and of its memory, else one
    per CPU); an RGB-only ``config`` has none, ``workers`` (default one per CPU) then counts
    decoders. ``writers``:

    * ``workers``: each shard is written by a decode actor (``decoders`` of them, spread over
      the nodes: default one per 16 CPU flow actors, or per 4 CPUs beside GPU flow actors) that
      decodes its videos (flow on the flow actors) and writes the shard straight to ``out``: no
      byte passes through this process. As many shards in flight as videos would be (threads of
      the decoders); shards complete in any order. A shard whose decoder was lost is written
      again from the start by another, up to ``SHARD_ATTEMPTS`` times; after that its videos
      fail (stage ``worker``) and the next run writes it again.
    * ``driver``: the decode actors stream every chunk here and this process writes the shards,
      in order.
    * ``auto``: ``workers`` when every node can reach ``out`` for sure (object storage, or a
      one-node cluster), else ``driver`` (a local ``--out`` on a cluster may not be shared).

    ``on_video`` gets each video's index row (``None`` when it failed): as it is written with
    ``driver``, when its shard completes with ``workers``.
    """
    cluster = _start_flow_workers(config, workers, decoders, address, gpu_share)
    if writers == "auto":
        nodes = sum(node["Alive"] for node in ray.nodes())
        writers = "workers" if not out.local or nodes == 1 else "driver"
    decode_workers = start_decoders(config, cluster.names, cluster.decoders, cluster.window)
    decoders = LiveWorkers(decode_workers, "decoder")
    try:
        if writers == "driver":
            log.info("ray: %d decoders, every shard written by this process", cluster.decoders)
            videos = _in_order([spec for plan in plans for spec in plan.videos], decoders, cluster.window)
            yield from write_in_order(out, plans, config, label_map, metadata, videos, on_video)
        else:
            log.info("ray: %d decoders, up to %d shards at a time, each written by its decoder to %s", cluster.decoders,
                     cluster.window, out)
            for plan, result in _write_on_workers(plans, config, out, label_map, metadata, decoders, cluster.window):
                if on_video:
                    for row in [*result.rows, *[None] * len(result.failures)]:
                        on_video(row)
                yield plan, result
    finally:
        kill_actors(cluster.flow_workers + decode_workers)


def _write_on_workers(plans, config, out, label_map, metadata, decoders: LiveWorkers, window: int):
    """``(plan, result)`` as the ``decoders`` complete them, ``window`` shards in flight."""
    todo = iter(plans)
    running: dict = {}  # shard write -> (plan, attempt, decoder)

    def submit(plan: ShardPlan, attempt: int = 1) -> None:
        alive = decoders.alive()
        decoder = alive[(plan.number + attempt - 1) % len(alive)]  # another live one on each attempt
        running[decoders.actors[decoder].write.remote(plan, out, label_map, metadata)] = (plan, attempt, decoder)

    for plan in itertools.islice(todo, window):
        submit(plan)
    while running:
        [ref], _ = ray.wait(list(running), num_returns=1)
        plan, attempt, decoder = running.pop(ref)
        try:
            result = ray.get(ref)
        except TRANSIENT as e:
            decoders.lost(decoder)
            if attempt < SHARD_ATTEMPTS:
                log.warning("shard %d lost with its decoder (%s), attempt %d of %d", plan.number, type(e).__name__, attempt, SHARD_ATTEMPTS)
                submit(plan, attempt + 1)
                continue
            result = lost_shard(plan, config, f"lost with its decoder {SHARD_ATTEMPTS} times: {type(e).__name__}")
        yield plan, result
        following = next(todo, None)
        if following is not None:
            submit(following)


def start_decoders(config: ExtractConfig, flow_worker_names: list[str], decoders: int, window: int) -> list:
    """``decoders`` :class:`DecodeWorker` actors, started, for ``window`` videos in flight."""
    actors = [
        ray.remote(DecodeWorker)  # a thread for each queued video and the one being written
        .options(num_cpus=0, max_restarts=-1, max_concurrency=-(-(window + 1) // decoders), scheduling_strategy="SPREAD")
        .remote(config, flow_worker_names)
        for _ in range(decoders)
    ]
    ray.get([actor.__ray_ready__.remote() for actor in actors])
    return actors


def decode_task(decoder, spec: VideoSpec):
    return decoder.decode.options(_generator_backpressure_num_objects=BACKPRESSURE_CHUNKS).remote(spec)


def _in_order(specs, decoders: LiveWorkers, window):
    """``(spec, chunks)`` for each of ``specs`` in order, ``window`` videos in flight over the
    live ``decoders``."""

    def start(k: int, spec: VideoSpec):
        alive = decoders.alive()
        decoder = alive[k % len(alive)]
        return decode_task(decoders.actors[decoder], spec), decoder

    for spec, (i, generator, decoder) in in_order(specs, lambda i, spec: (i, *start(i, spec)), window):

        def decode(attempt: int, spec=spec, first=(generator, decoder), i=i):
            return first if attempt == 0 else start(i + attempt, spec)  # another live one on each attempt

        yield spec, _chunks(spec, decode, decoders)
