"""The baseline every flow benchmark measures against: OpenCV's CPU TV-L1 with its defaults, one
single-threaded process per core (OpenCV's own threads would oversubscribe the cores)."""

import multiprocessing
from contextlib import contextmanager

import cv2
import numpy as np

from flowprep.flow.opencv import TVL1_DEFAULTS

_solver = None


def _init_solver() -> None:
    global _solver
    cv2.setNumThreads(1)
    _solver = cv2.optflow.DualTVL1OpticalFlow_create(*TVL1_DEFAULTS.values())


def opencv_flow(pair: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Flow ``[H, W, 2]`` float32 px of one pair, in a worker of :func:`opencv_pool`."""
    return _solver.calc(pair[0], pair[1], None)


@contextmanager
def opencv_pool(processes: int, warm_up: list):
    """A pool of ``processes`` solver processes (spawned: forking after OpenCV has run can hang),
    each started on a pair of ``warm_up`` so that start-up stays outside any timing."""
    with multiprocessing.get_context("spawn").Pool(processes, initializer=_init_solver) as pool:
        pool.map(opencv_flow, warm_up[:processes], chunksize=1)
        yield pool
