"""Batching flow pairs of many callers into one solver: how a GPU actor keeps its GPU full.

Each caller (a thread of the flow actor, one per chunk in flight) hands in its frames and waits.
One solver thread takes whatever has queued while the previous batch ran, up to the backend's
batch size, all of one frame size (pairs of different sizes cannot share a tensor), and hands
each caller its own flow back. The batch a pair is solved in does not change its flow, since the
solver keeps a stopping state per pair.
"""

from __future__ import annotations

import threading
from collections import defaultdict, deque
from dataclasses import dataclass, field

import numpy as np

from flowprep.errors import FlowError


@dataclass
class _Request:
    frames: np.ndarray
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
        self._thread = threading.Thread(target=self._serve, name="flow-batcher", daemon=True)
        self._thread.start()

    def compute(self, frames: np.ndarray) -> np.ndarray:
        """``[T, H, W] uint8`` gray to ``[T-1, H, W, 2] float32`` pixels; blocks until solved."""
        if frames.ndim != 3 or frames.dtype != np.uint8:
            raise FlowError(f"expected [T, H, W] uint8 gray frames, got {frames.shape} {frames.dtype}")
        request = _Request(frames)
        if request.pairs < 1:
            return np.empty((0, *frames.shape[1:], 2), np.float32)
        with self._ready:
            if self._closed:
                raise FlowError("the flow batcher is closed")
            self._queues[frames.shape[1:]].append(request)
            self._ready.notify()
        request.done.wait()
        if request.error is not None:
            raise request.error
        return request.flow

    def close(self) -> None:
        """Stop the solver thread once the queued requests are solved."""
        with self._ready:
            self._closed = True
            self._ready.notify()
        self._thread.join()

    def _next_batch(self) -> list[_Request] | None:
        with self._ready:
            while not any(self._queues.values()):
                if self._closed:
                    return None
                self._ready.wait()
            # The size with the most pairs waiting: the fullest batch.
            size, queue = max(self._queues.items(), key=lambda item: sum(r.pairs for r in item[1]))
            limit = self.backend.max_batch(*size)
            batch, pairs = [], 0
            while queue and (not batch or pairs + queue[0].pairs <= limit):
                request = queue.popleft()
                batch.append(request)
                pairs += request.pairs
            return batch

    def _serve(self) -> None:
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
