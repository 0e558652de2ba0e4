"""Ray wiring: decode actors write shards on the nodes, or stream their chunks to the driver.

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
backend per actor, which the GPU solvers need, are direct here.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import cv2
import ray

from flowprep.errors import DecodeError, VideoError
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
# How long a run waits for a flow worker when it has none (starting, or restarting after a lost
# node): a cluster that autoscales or restarts a node has this long to bring one back.
WORKER_WAIT_S = float(os.environ.get("FLOWPREP_WORKER_WAIT_S", 600))
# Faults of the cluster, not of the video: the work is done again elsewhere.
TRANSIENT = (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError, ray.exceptions.ObjectLostError,
             ray.exceptions.NodeDiedError)


class WorkerError(VideoError):
    """A video lost to cluster faults on every attempt; a later run tries it again."""

    stage = "worker"


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

    A flow worker counts as alive once it answered a ping; one lost while it held a chunk (its
    process killed, its node gone) is pinged again and left aside until it answers, and the
    chunk goes to a live worker, up to ``FLOW_ATTEMPTS`` times. Flow is deterministic, so where
    a chunk was solved changes no byte.
    """

    def __init__(self, config: ExtractConfig, flow_worker_names: list[str]):
        cv2.setNumThreads(1)
        self.config = config
        # Names, not handles: a restarted decoder finds the flow actors again by itself.
        self.flow_workers = [ray.get_actor(name) for name in flow_worker_names]
        self._pending: dict = {}  # flow task -> (worker index, pixels still to solve)
        self._down = {w: worker.device.remote() for w, worker in enumerate(self.flow_workers)}  # worker -> ping
        self._lock = threading.Lock()

    def _alive(self) -> list[int]:
        """The workers that answered their last ping, waiting up to ``WORKER_WAIT_S`` for one."""
        deadline = time.monotonic() + WORKER_WAIT_S
        while True:
            pings = list(self._down.values())
            answered, _ = ray.wait(pings, num_returns=len(pings), timeout=0) if pings else ([], [])
            for w, ping in list(self._down.items()):
                if ping in answered:
                    try:
                        ray.get(ping)
                        del self._down[w]
                    except TRANSIENT:
                        self._down[w] = self.flow_workers[w].device.remote()
            alive = [w for w in range(len(self.flow_workers)) if w not in self._down]
            if alive:
                return alive
            if time.monotonic() > deadline:
                raise WorkerError(f"no flow worker alive for {WORKER_WAIT_S:.0f} s (FLOWPREP_WORKER_WAIT_S)")
            ray.wait(list(self._down.values()), num_returns=1, timeout=5)

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
            load = {w: 0 for w in self._alive()}
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
                    self._down[worker] = self.flow_workers[worker].device.remote()
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


def start_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to ``address`` (or ``$RAY_ADDRESS``), or start a local Ray with ``num_cpus``.

    A cluster that cannot be reached is a ``ValueError`` saying what to check: since Ray 2.60 a
    machine holding ``~/.ray/auth_token`` starts clusters with token authentication, which a
    client without the token cannot pass.
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        try:
            ray.init(address=address, logging_level=logging.WARNING)
        except ConnectionError as e:
            raise ValueError(f"cannot connect to the Ray cluster at {address}: {str(e).splitlines()[0]}. Check the "
                             "address; a cluster started with token authentication (Ray >= 2.60, ~/.ray/auth_token) "
                             "needs RAY_AUTH_MODE=token and the same token here") from None
    else:
        # "local": a Ray of its own, never one that `ray start` left on this machine (alive or dead).
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, logging_level=logging.WARNING)


def cluster_gpus() -> int:
    """GPUs in the Ray cluster this process is connected to."""
    return int(ray.cluster_resources().get("GPU", 0))


def _video_error(e: Exception) -> VideoError:
    if isinstance(e, ray.exceptions.RayTaskError) and isinstance(e.cause, VideoError):
        return e.cause
    if isinstance(e, TRANSIENT):
        return WorkerError(f"worker process died: {e.__class__.__name__}")
    return WorkerError(str(e).splitlines()[0])


def _chunks(spec: VideoSpec, decode) -> Iterator[VideoChunk]:
    """The chunks of ``spec`` from ``decode(attempt)`` (a decode task's generator). A decoder lost
    on the way (its node gone) or a chunk lost with a node is a cluster fault: the video is
    decoded again by another decoder, up to ``VIDEO_ATTEMPTS`` times, and the chunks already
    delivered are skipped, so the writer sees each chunk once, in order."""
    delivered = 0  # frames handed out
    for attempt in range(VIDEO_ATTEMPTS):
        generator = decode(attempt)
        try:
            for ref in generator:
                chunk = ray.get(ref)
                if chunk.start < delivered:
                    continue
                delivered = chunk.start + len(chunk.rgb)
                yield chunk
            return
        except TRANSIENT as e:
            log.warning("%s: decoder lost at frame %d (%s), attempt %d of %d", spec.video_id, delivered, type(e).__name__,
                        attempt + 1, VIDEO_ATTEMPTS)
            error = e
        except ray.exceptions.RayError as e:  # the video's own error
            for _ in generator:  # let the decoder finish this video rather than block on backpressure
                pass
            raise _video_error(e) from None
    raise WorkerError(f"lost with its decoder {VIDEO_ATTEMPTS} times: {type(error).__name__}")


@dataclass
class _Cluster:
    """The flow actors of a run (none for RGB only), and how many videos (or shards) to keep in
    flight and decoders to start for them."""

    flow_workers: list
    names: list[str]
    decoders: int
    window: int


def _start_flow_workers(config: ExtractConfig, workers: int | None, decoders: int | None, address: str | None,
                        gpu_share: int) -> _Cluster:
    # --workers counts CPUs for the CPU solver and for RGB only; GPU solvers leave every CPU to the decoders.
    start_ray(address, workers if config.flow_backend in ("opencv", NO_FLOW) else None)
    cpus, gpus = int(ray.cluster_resources().get("CPU", 0)), cluster_gpus()
    on_gpu = config.flow_backend == "opencv-cuda" or (config.flow_backend == "torch" and gpus > 0)
    if on_gpu and not gpus:
        raise ValueError(f"--flow {config.flow_backend} needs a GPU; the Ray cluster has none")
    have, unit = (gpus * gpu_share, f"GPU shares ({gpu_share} a GPU)") if on_gpu else (cpus, "CPUs")
    if workers and workers > have:
        raise ValueError(f"--workers {workers} needs {workers} {unit}; the Ray cluster has {have}")
    workers = workers or max(1, have)
    if not config.has_flow:
        # Decoding is all the work: a decoder per worker, each with two videos in flight (one
        # decoding while the other waits to be written).
        decoders = decoders or workers
        log.info("ray: %d decoders, no flow (RGB only)", decoders)
        return _Cluster([], [], decoders, 2 * decoders)
    names = [f"flowprep-flow-{uuid.uuid4().hex}" for _ in range(workers)]
    # A batched backend takes many chunks at once (its PairBatcher solves them together); any
    # other holds one solver that must not be called from two threads.
    batched = getattr(BACKENDS[config.flow_backend], "batched", False)
    options = {}
    if on_gpu:
        decoders = decoders or max(1, cpus // 4)
        resources = {"num_cpus": 1, "num_gpus": 1 / gpu_share, "max_concurrency": GPU_CHUNKS if batched else 1}
        window = workers * GPU_VIDEOS // gpu_share + 2 * decoders
        if batched and gpu_share > 1:
            options["memory_fraction"] = 1 / gpu_share
    else:
        decoders = decoders or max(1, workers // 16)
        resources = {"num_cpus": 1, "max_concurrency": 2 * FLOW_LOOKAHEAD if batched else 1}
        window = workers + 2 * decoders  # videos queued: with the lookahead, enough chunks for every worker
    flow_workers = [ray.remote(FlowWorker).options(name=name, max_restarts=-1, **resources).remote(config, **options) for name in names]
    devices = wait_for_workers(flow_workers, "flow workers")  # a backend that cannot start fails here
    log.info("ray: %d flow workers (%s on %s)", workers, config.flow_backend, ", ".join(sorted(set(devices))))
    return _Cluster(flow_workers, names, decoders, window)


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
    try:
        if writers == "driver":
            log.info("ray: %d decoders, every shard written by this process", cluster.decoders)
            videos = _in_order([spec for plan in plans for spec in plan.videos], decode_workers, cluster.window)
            yield from write_in_order(out, plans, config, label_map, metadata, videos, on_video)
        else:
            log.info("ray: %d decoders, up to %d shards at a time, each written by its decoder to %s", cluster.decoders,
                     cluster.window, out)
            for plan, result in _write_on_workers(plans, config, out, label_map, metadata, decode_workers, cluster.window):
                if on_video:
                    for row in [*result.rows, *[None] * len(result.failures)]:
                        on_video(row)
                yield plan, result
    finally:
        kill_actors(cluster.flow_workers + decode_workers)


def _write_on_workers(plans, config, out, label_map, metadata, decode_workers, window: int):
    """``(plan, result)`` as the ``decode_workers`` complete them, ``window`` shards in flight."""
    todo = iter(plans)
    running: dict = {}  # shard write -> (plan, attempt)

    def submit(plan: ShardPlan, attempt: int = 1) -> None:
        decoder = decode_workers[(plan.number + attempt - 1) % len(decode_workers)]  # another one on each attempt
        running[decoder.write.remote(plan, out, label_map, metadata)] = (plan, attempt)

    for plan in itertools.islice(todo, window):
        submit(plan)
    while running:
        [ref], _ = ray.wait(list(running), num_returns=1)
        plan, attempt = running.pop(ref)
        try:
            result = ray.get(ref)
        except TRANSIENT as e:
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


def wait_for_workers(actors, what: str) -> list[str]:
    """Wait until one of ``actors`` (with a ``device`` method) is placed and started; returns the
    devices of those started. The others join as the cluster frees resources for them: a run
    starts with what it can get. Says every 10 s what it waits for; ``WorkerError`` after
    ``WORKER_WAIT_S``. An actor whose constructor fails raises its error here."""
    pending = {actor.device.remote(): actor for actor in actors}
    devices: list[str] = []
    deadline = time.monotonic() + WORKER_WAIT_S
    while not devices:
        ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=10)
        devices += ray.get(ready)
        for ref in ready:
            del pending[ref]
        if devices:
            break
        if time.monotonic() > deadline:
            raise WorkerError(f"none of {len(actors)} {what} could start in {WORKER_WAIT_S:.0f} s: the cluster has "
                              f"{ray.available_resources()} free of {ray.cluster_resources()}")
        log.warning("waiting for %s: none of %d started yet; free in the cluster: %s (another job may hold them)",
                    what, len(actors), {k: v for k, v in ray.available_resources().items() if k in ("CPU", "GPU")})
    if pending:
        log.warning("%d of %d %s started; the other %d join when the cluster has room", len(devices), len(actors), what, len(pending))
    return devices


def decode_task(decoder, spec: VideoSpec):
    return decoder.decode.options(_generator_backpressure_num_objects=BACKPRESSURE_CHUNKS).remote(spec)


def _in_order(specs, decode_workers, window):
    """``(spec, chunks)`` for each of ``specs`` in order, ``window`` videos in flight over the
    ``decode_workers``."""
    pending = deque()
    todo = iter(enumerate(specs))

    def submit() -> None:
        item = next(todo, None)
        if item is not None:
            i, spec = item
            pending.append((spec, decode_task(decode_workers[i % len(decode_workers)], spec), i))

    for _ in range(window):
        submit()
    while pending:
        spec, first, i = pending.popleft()
        submit()

        def decode(attempt, spec=spec, first=first, i=i):
            return first if attempt == 0 else decode_task(decode_workers[(i + attempt) % len(decode_workers)], spec)

        yield spec, _chunks(spec, decode)


class FlowWindowReader:
    """Reads the stored flow of teacher work items (:func:`flowprep.teacher.run.read_windows`)."""

    def __init__(self, out: str, grid):
        cv2.setNumThreads(1)
        from flowprep.shards import ShardReader

        self.reader, self.grid = ShardReader(out), grid

    def read(self, item):
        from flowprep.teacher.run import read_windows

        return read_windows(self.reader, item, self.grid)


class TeacherWorker:
    """One teacher model on a GPU, or on one CPU core, run over the windows of work items."""

    def __init__(self, config, state, num_classes: int, flow_bound: float, device: str, threads: int | None):
        from flowprep.teacher.run import TeacherModel

        self.model = TeacherModel(config, state, num_classes, flow_bound, device, threads)

    def run(self, windows):
        return self.model.run(windows)


def ray_teacher_outputs(items, out, config, state, num_classes: int, flow_bound: float, device: str,
                        workers: int | None = None, address: str | None = None):
    """``(item, outputs)`` for each work item of ``items``, in order, computed by Ray actors.

    Model actors: ``workers`` of them (default one per GPU of the cluster when ``device`` is
    ``cuda``, else one per CPU, each with one torch thread); readers: one per 4 CPUs beside GPU
    actors, one per 8 CPU actors otherwise. Each item is read by a reader and its windows go
    straight to a model actor (the driver never holds the flow); ``2 x workers + readers`` items
    are in flight, consumed in order.
    """
    start_ray(address, workers if device == "cpu" else None)
    cpus, gpus = int(ray.cluster_resources().get("CPU", 0)), cluster_gpus()
    on_gpu = device.startswith("cuda")
    if on_gpu and not gpus:
        raise ValueError("--device cuda: the Ray cluster has no GPU")
    have = gpus if on_gpu else cpus
    if workers and workers > have:
        raise ValueError(f"--workers {workers} needs {workers} {'GPUs' if on_gpu else 'CPUs'}; the Ray cluster has {have}")
    workers = workers or max(1, have)
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
    pending = deque()
    try:
        for i, item in enumerate(items):
            windows = readers[i % len(readers)].read.remote(item)
            pending.append((item, models[i % len(models)].run.remote(windows)))
            if len(pending) > 2 * len(models) + len(readers):
                yield _teacher_result(*pending.popleft())
        while pending:
            yield _teacher_result(*pending.popleft())
    finally:
        kill_actors(models + readers)


def kill_actors(actors) -> None:
    """Stop ``actors``, unless Ray is already down: ``ray.kill`` would then start a new local Ray."""
    if ray.is_initialized():
        for actor in actors:
            ray.kill(actor)


def _teacher_result(item, ref):
    """The outputs of ``item``; a dead or failing worker fails the item's videos, not the run."""
    from flowprep.teacher.run import SegmentOutputs

    try:
        return item, ray.get(ref)
    except ray.exceptions.RayError as e:
        error = str(_video_error(e))
        return item, [SegmentOutputs(segment, None, error) for segment in item.segments]
