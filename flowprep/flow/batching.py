"""Batching flow pairs of many callers into one solver: how a GPU actor keeps its GPU full.

Each caller (a thread of the flow actor, one per chunk in flight) hands in its frames and waits.
One solver thread takes whatever has queued while the previous batch ran, up to the backend's
batch size, all of one frame size (pairs of different sizes cannot share a tensor): the size
with the most pairs waiting, unless a request has waited ``MAX_WAIT_BATCHES`` batches, and hands
each caller its own flow back. The batch a pair is solved in does not change its flow, since the
solver keeps a stopping state per pair.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import defaultdict, deque
from dataclasses import dataclass, field

import numpy as np

from flowprep.errors import FlowError
from flowprep.flow.opencv import check_gray_frames

log = logging.getLogger(__name__)


# Batches a request may see go by before its frame size is served, however few pairs it has:
# the driver writes videos in order and would wait for it.
MAX_WAIT_BATCHES = 4


_order = itertools.count()


@dataclass
class _Request:
    frames: np.ndarray
    arrival: int  # the number of batches started before it came
    order: int = field(default_factory=lambda: next(_order))
    done: threading.Event = field(default_factory=threading.Event)
    flow: np.ndarray | None = None
    error: BaseException | None = None

    @property
    def pairs(self) -> int:
        return len(self.frames) - 1


class PairBatcher:
    """A flow backend over a batched one (``solve`` and ``max_batch``, like :class:`TorchTVL1`)
    whose ``compute`` may be called from many threads at once; their pairs are solved together."""

    def __init__(self, backend):
        self.backend = backend
        self.name, self.device, self.params = backend.name, backend.device, backend.params
        self._queues: dict[tuple[int, int], deque[_Request]] = defaultdict(deque)
        self._ready = threading.Condition()
        self._closed = False
        self._batches = 0
        self._thread = threading.Thread(target=self._serve, name="flow-batcher", daemon=True)
        self._thread.start()

    def compute(self, frames: np.ndarray) -> np.ndarray:
        """``[T, H, W] uint8`` gray to ``[T-1, H, W, 2] float32`` pixels; blocks until solved."""
        check_gray_frames(frames)
        if len(frames) < 2:
            return np.empty((0, *frames.shape[1:], 2), np.float32)
        with self._ready:
            if self._closed:
                raise FlowError("the flow batcher is closed")
            request = _Request(frames, self._batches)
            self._queues[frames.shape[1:]].append(request)
            self._ready.notify_all()
        request.done.wait()
        if request.error is not None:
            raise FlowError(f"{self.name}: {type(request.error).__name__}: {request.error}") from request.error
        return request.flow

    @property
    def alive(self) -> bool:
        """Whether the solver thread still runs (it stops on close, or on an error it cannot survive)."""
        return self._thread.is_alive()

    def close(self) -> None:
        """Stop the solver thread once the queued requests are solved."""
        with self._ready:
            self._closed = True
            self._ready.notify_all()
        self._thread.join()

    def _next_batch(self) -> list[_Request] | None:
        with self._ready:
            while not any(self._queues.values()):
                if self._closed:
                    return None
                self._ready.wait()
            waiting = {size: queue for size, queue in self._queues.items() if queue}
            oldest = min(waiting, key=lambda size: waiting[size][0].order)
            if self._batches - waiting[oldest][0].arrival >= MAX_WAIT_BATCHES:
                size = oldest
            else:  # the fullest batch
                size = max(waiting, key=lambda size: sum(r.pairs for r in waiting[size]))
            queue = waiting[size]
            self._batches += 1
            limit = self.backend.max_batch(*size)
            batch, pairs = [], 0
            while queue and (not batch or pairs + queue[0].pairs <= limit):
                request = queue.popleft()
                batch.append(request)
                pairs += request.pairs
            return batch

    def _serve(self) -> None:
        try:
            while (batch := self._next_batch()) is not None:
                try:
                    first = np.concatenate([r.frames[:-1] for r in batch])
                    second = np.concatenate([r.frames[1:] for r in batch])
                    flow = self.backend.solve(first, second)
                    offsets = np.cumsum([0] + [r.pairs for r in batch])
                    for r, start, end in zip(batch, offsets[:-1], offsets[1:]):
                        r.flow = flow[start:end]
                except Exception as e:  # every caller of the batch learns why; the thread goes on
                    for r in batch:
                        r.error = e
                for r in batch:
                    r.done.set()
        except BaseException as e:  # the thread cannot go on: nobody may wait for it
            with self._ready:
                self._closed = True
                stranded = [r for queue in self._queues.values() for r in queue]
                self._queues.clear()
            for r in stranded:
                r.error = e
                r.done.set()
            log.exception("flow batcher stopped")
