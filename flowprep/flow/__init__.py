"""Optical-flow backends.

Every backend maps ``[T, H, W] uint8`` gray frames to ``[T-1, H, W, 2] float32`` flow in pixels:
flow ``t`` carries frame ``t`` to frame ``t + 1``, channel 0 is x (right), channel 1 is y (down),
OpenCV's convention (``frame_t(p) ≈ frame_{t+1}(p + flow_t(p))``).
"""

from __future__ import annotations

import logging
from typing import Protocol

import numpy as np

from flowprep.errors import OptionError
from flowprep.flow.opencv import TVL1_CUDA_DEFAULTS, TVL1_DEFAULTS, OpenCVCudaTVL1, OpenCVTVL1, opencv_cuda_devices, tvl1_value
from flowprep.flow.torch_tvl1 import TorchTVL1, default_device, device_description

log = logging.getLogger(__name__)


class FlowBackend(Protocol):
    name: str
    device: str
    """Where it runs, e.g. ``cpu`` or ``cuda:0 (NVIDIA H200)``."""
    params: dict
    """Every solver parameter, defaults filled in, as recorded in dataset.json."""

    def compute(self, frames: np.ndarray) -> np.ndarray:
        """``[T, H, W] uint8`` gray frames to ``[T-1, H, W, 2] float32`` flow in pixels."""
        ...


BACKENDS = {"opencv": OpenCVTVL1, "opencv-cuda": OpenCVCudaTVL1, "torch": TorchTVL1}


def resolve_backend_name(name: str, gpus: int | None = None) -> str:
    """The backend ``auto`` stands for (``torch`` on a GPU, then ``opencv-cuda``, then ``opencv``),
    or ``name`` itself. ``gpus``: the GPUs of the cluster that will run the flow, if not this machine's."""
    if name == "auto":
        if _gpu_for_torch(gpus):
            name = "torch"
        elif gpus is None and opencv_cuda_devices():  # this machine's OpenCV, for a run on this machine
            name = "opencv-cuda"
        else:
            name = "opencv"
        log.info("flow backend auto: %s", name)
        return name
    if name not in BACKENDS:
        raise OptionError(f"unknown flow backend {name!r}; choose from auto, {', '.join(sorted(BACKENDS))}", "flow_backend")
    return name


def check_flow_options(name: str, params: dict) -> None:
    """Raise :class:`OptionError` unless ``name`` is a backend (or ``auto``) that takes ``params``.

    For ``auto`` the backend is only known once the machines that run the flow are, so each
    parameter is checked by name and value against what any backend takes; the chosen backend
    checks them all again when the run starts (``resolve_params``).
    """
    if name != "auto" or "variant" in params:  # only the torch backend takes a variant
        BACKENDS[resolve_backend_name("torch" if name == "auto" else name)].resolve_params(params)
        return
    defaults = {**TVL1_DEFAULTS, **TVL1_CUDA_DEFAULTS}
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise OptionError(f"unknown TV-L1 parameters {unknown}; known: {sorted(defaults)}", "flow_params")
    for key, value in params.items():
        tvl1_value(key, value, defaults[key])


def _gpu_for_torch(gpus: int | None) -> bool:
    """Whether the torch backend will run on a GPU: the cluster's ``gpus``, or this machine's."""
    return bool(gpus) if gpus is not None else default_device() == "cuda"


def flow_device(name: str, gpus: int | None = None) -> str:
    """Where backend ``name`` will run: ``cpu``, ``cuda``, or on this machine's GPU its index and
    name. ``gpus``: the GPUs of the cluster that will run the flow, if not this machine's."""
    if name == "opencv" or (name == "torch" and not _gpu_for_torch(gpus)):
        return "cpu"
    return device_description("cuda") if name == "torch" and gpus is None else "cuda"


def get_backend(name: str, params: dict | None = None, threads: int = 1, **options) -> FlowBackend:
    """A ready backend instance; ``params`` are its solver parameters (unknown names are an error),
    ``options`` where it runs (``torch``: ``device``, ``memory_fraction``)."""
    return BACKENDS[resolve_backend_name(name)](params or {}, threads=threads, **options)


def parse_flow_params(text: str | None) -> dict:
    """``"tau=0.25,warps=5"`` to ``{"tau": 0.25, "warps": 5}`` (numbers parsed, the rest kept as text)."""
    params: dict = {}
    for item in filter(None, (text or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise OptionError(f"flow parameter {item!r} is not key=value", "flow_params")
        for cast in (int, float):
            try:
                params[key.strip()] = cast(value)
                break
            except ValueError:
                continue
        else:
            params[key.strip()] = value.strip()
    return params
