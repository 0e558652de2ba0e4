"""Optical-flow backends.

Every backend maps ``[T, H, W] uint8`` gray frames to ``[T-1, H, W, 2] float32`` flow in pixels:
flow ``t`` carries frame ``t`` to frame ``t + 1``, channel 0 is x (right), channel 1 is y (down),
OpenCV's convention (``frame_t(p) ≈ frame_{t+1}(p + flow_t(p))``).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from flowprep.flow.opencv import OpenCVTVL1


class FlowBackend(Protocol):
    name: str
    device: str
    params: dict
    """Every solver parameter, defaults filled in, as recorded in dataset.json."""

    def compute(self, frames: np.ndarray) -> np.ndarray:
        """``[T, H, W] uint8`` gray frames to ``[T-1, H, W, 2] float32`` flow in pixels."""
        ...


BACKENDS = {"opencv": OpenCVTVL1}


def resolve_backend_name(name: str) -> str:
    """The backend ``auto`` stands for on this machine (the best available), or ``name`` itself."""
    if name == "auto":
        return "opencv"
    if name not in BACKENDS:
        raise ValueError(f"unknown flow backend {name!r}; choose from auto, {', '.join(sorted(BACKENDS))}")
    return name


def get_backend(name: str, params: dict | None = None, threads: int = 1) -> FlowBackend:
    """A ready backend instance; ``params`` are its solver parameters (unknown names are an error)."""
    return BACKENDS[resolve_backend_name(name)](params or {}, threads=threads)


def parse_flow_params(text: str | None) -> dict:
    """``"tau=0.25,warps=5"`` to ``{"tau": 0.25, "warps": 5}`` (numbers parsed, the rest kept as text)."""
    params: dict = {}
    for item in filter(None, (text or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"flow parameter {item!r} is not key=value")
        for cast in (int, float):
            try:
                params[key.strip()] = cast(value)
                break
            except ValueError:
                continue
        else:
            params[key.strip()] = value.strip()
    return params
