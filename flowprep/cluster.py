"""Ray plumbing that extract and the teacher share: connecting or starting Ray, sizing a job's
workers to the cluster, waiting for them, stopping them, telling a cluster fault from a job's own
error, and keeping a bounded window of work in flight with results in input order.

Each job's actors live with the job: extract's in :mod:`flowprep.extract_actors`, the teacher's
in :mod:`flowprep.teacher.actors`.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

import ray

from flowprep.errors import VideoError, WorkerError

log = logging.getLogger(__name__)

# How long a run waits for a worker when it has none (starting, or restarting after a lost
# node): a cluster that autoscales or restarts a node has this long to bring one back.
WORKER_WAIT_S = float(os.environ.get("FLOWPREP_WORKER_WAIT_S", 600))
# Faults of the cluster, not of the video: the work is done again elsewhere.
TRANSIENT = (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError, ray.exceptions.ObjectLostError,
             ray.exceptions.NodeDiedError)

Item = TypeVar("Item")
Submitted = TypeVar("Submitted")


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


def cluster_cpus() -> int:
    """CPUs in the Ray cluster this process is connected to."""
    return int(ray.cluster_resources().get("CPU", 0))


def cluster_gpus() -> int:
    """GPUs in the Ray cluster this process is connected to."""
    return int(ray.cluster_resources().get("GPU", 0))


def worker_count(workers: int | None, have: int, unit: str) -> int:
    """``workers`` (``None``: one per unit the cluster ``have`` s, at least one); asking for more
    than the cluster has is a ValueError at once, not a wait."""
    if workers and workers > have:
        raise ValueError(f"--workers {workers} needs {workers} {unit}; the Ray cluster has {have}")
    return workers or max(1, have)


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


class LiveWorkers:
    """Which of ``actors`` (each with a ``device`` method) are up. An actor counts as up once it
    answered a ping; one lost while it held work (its process killed, its node gone) is pinged
    again and left aside until it answers, then it rejoins (Ray restarts actors made with
    ``max_restarts=-1``). Not thread-safe: a caller with threads holds its own lock."""

    def __init__(self, actors: list, what: str):
        self.actors, self.what = actors, what
        self._down = {w: actor.device.remote() for w, actor in enumerate(actors)}  # index -> ping

    def lost(self, w: int) -> None:
        """Leave worker ``w`` aside until it answers a ping again."""
        self._down[w] = self.actors[w].device.remote()

    def alive(self) -> list[int]:
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
                        self.lost(w)
            alive = [w for w in range(len(self.actors)) if w not in self._down]
            if alive:
                return alive
            if time.monotonic() > deadline:
                raise WorkerError(f"no {self.what} alive for {WORKER_WAIT_S:.0f} s (FLOWPREP_WORKER_WAIT_S)")
            ray.wait(list(self._down.values()), num_returns=1, timeout=5)


def kill_actors(actors) -> None:
    """Stop ``actors``, unless Ray is already down: ``ray.kill`` would then start a new local Ray."""
    if ray.is_initialized():
        for actor in actors:
            ray.kill(actor)


def is_cluster_fault(e: BaseException) -> bool:
    """Whether ``e`` is a fault of the cluster (a worker or node lost, an object lost with it),
    also when it reached us through a task that had the lost work as an argument."""
    return isinstance(e, TRANSIENT) or (isinstance(e, ray.exceptions.RayTaskError) and isinstance(e.cause, TRANSIENT))


def video_error(e: Exception) -> VideoError:
    """What a Ray error means for the video whose work raised it: the video's own error (raised
    in the task), or a :class:`~flowprep.errors.WorkerError` for a cluster fault or any other."""
    if isinstance(e, ray.exceptions.RayTaskError) and isinstance(e.cause, VideoError):
        return e.cause
    if isinstance(e, TRANSIENT):
        return WorkerError(f"worker process died: {e.__class__.__name__}")
    return WorkerError(str(e).splitlines()[0])


def in_order(items: Iterable[Item], submit: Callable[[int, Item], Submitted], window: int) -> Iterator[tuple[Item, Submitted]]:
    """``(item, submit(i, item))`` for each of ``items``, in order, with the ``window`` items after
    the one yielded already submitted: work runs ahead in a bounded window, results are consumed
    in input order."""
    pending: deque = deque()
    for i, item in enumerate(items):
        pending.append((item, submit(i, item)))
        if len(pending) > window:
            yield pending.popleft()
    while pending:
        yield pending.popleft()
