"""TV-L1 optical flow on the CPU with OpenCV contrib's ``DualTVL1OpticalFlow``."""

from __future__ import annotations

import math

import cv2
import numpy as np

from flowprep.errors import FlowError, OptionError

# flowprep's parameter names and OpenCV's defaults (opencv_contrib optflow/tvl1flow.cpp and
# cudaoptflow/tvl1flow.cpp), each in the order of its solver's create() arguments.
_SHARED = {"tau": 0.25, "lambda": 0.15, "theta": 0.3, "nscales": 5, "warps": 5, "epsilon": 0.01}
TVL1_DEFAULTS = {**_SHARED, "inner_iterations": 30, "outer_iterations": 10, "scale_step": 0.8, "gamma": 0.0, "median_filtering": 5}
TVL1_CUDA_DEFAULTS = {**_SHARED, "iterations": 300, "scale_step": 0.8, "gamma": 0.0}


# The values each parameter may take, for every solver (OpenCV CPU and CUDA, and the torch solver
# that follows them). OpenCV itself takes warps=0, tau=-1 or theta=0 and returns zero, diverged or
# NaN flow for every video, and fails each video inside calc() on nscales=0, a scale step outside
# (0, 1] or a median size other than 0, 1 (off), 3 or 5 (what medianBlur takes for float images).
TVL1_LIMITS = {
    "tau": ("> 0", lambda v: v > 0),
    "lambda": ("> 0", lambda v: v > 0),
    "theta": ("> 0", lambda v: v > 0),
    "nscales": (">= 1", lambda v: v >= 1),
    "warps": (">= 1", lambda v: v >= 1),
    "epsilon": (">= 0 (0: every iteration runs)", lambda v: v >= 0),
    "inner_iterations": (">= 1", lambda v: v >= 1),
    "outer_iterations": (">= 1", lambda v: v >= 1),
    "iterations": (">= 1", lambda v: v >= 1),
    "scale_step": ("in (0, 1) (nscales=1 for no pyramid)", lambda v: 0 < v < 1),
    "gamma": (">= 0", lambda v: v >= 0),
    "median_filtering": ("0 or 1 (off), 3 or 5", lambda v: v in (0, 1, 3, 5)),
}


def tvl1_value(name: str, value, default, solver: str = "TV-L1"):
    """``value`` of parameter ``name`` as ``default``'s type (a whole number for a count), finite
    and within :data:`TVL1_LIMITS`; :class:`OptionError` naming the parameter otherwise."""
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise OptionError(f"{solver} parameter {name}={value!r} is not a number", "flow_params") from None
    if not math.isfinite(number):
        raise OptionError(f"{solver} parameter {name}={value!r} must be a finite number", "flow_params")
    if isinstance(default, int):
        if number != int(number) or abs(number) >= 2**31:  # OpenCV takes a C int
            raise OptionError(f"{solver} parameter {name}={value!r} must be a whole number (below 2^31)", "flow_params")
        number = int(number)
    rule, allowed = TVL1_LIMITS[name]
    if not allowed(number):
        raise OptionError(f"{solver} parameter {name}={value!r} must be {rule}", "flow_params")
    return number


def merge_params(params: dict, defaults: dict, solver: str = "TV-L1") -> dict:
    """``params`` over ``defaults``, each value checked by :func:`tvl1_value`; an unknown name is
    an :class:`OptionError` too."""
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise OptionError(f"unknown {solver} parameters {unknown}; known: {sorted(defaults)}", "flow_params")
    return {k: tvl1_value(k, params[k], v, solver) if k in params else v for k, v in defaults.items()}


def tvl1_params(params: dict) -> dict:
    """``params`` over OpenCV CPU's TV-L1 defaults."""
    return merge_params(params, TVL1_DEFAULTS)


def tvl1_cuda_params(params: dict) -> dict:
    """``params`` over OpenCV CUDA's TV-L1 defaults."""
    return merge_params(params, TVL1_CUDA_DEFAULTS, "OpenCV CUDA TV-L1")


NO_OPENCV_CUDA = (f"opencv-cuda needs OpenCV built with CUDA and a GPU it can see (cv2 {cv2.__version__} sees none); "
                  "use --flow torch for GPU flow without a custom OpenCV")


def opencv_cuda_devices() -> int:
    """CUDA devices OpenCV can use: 0 unless this OpenCV was built with CUDA and sees a GPU."""
    try:
        return cv2.cuda.getCudaEnabledDeviceCount()
    except (AttributeError, cv2.error):
        return 0


def check_gray_frames(frames: np.ndarray) -> None:
    """Raise :class:`FlowError` unless ``frames`` is ``[T, H, W]`` uint8."""
    if frames.ndim != 3 or frames.dtype != np.uint8:
        raise FlowError(f"expected [T, H, W] uint8 gray frames, got {frames.shape} {frames.dtype}")


def _each_pair(frames: np.ndarray, calc) -> np.ndarray:
    """``calc(first, second) -> [H, W, 2]`` over consecutive ``[T, H, W]`` uint8 frames:
    ``[T-1, H, W, 2] float32``."""
    check_gray_frames(frames)
    t, h, w = frames.shape
    out = np.empty((max(t - 1, 0), h, w, 2), np.float32)
    for i in range(t - 1):
        out[i] = calc(frames[i], frames[i + 1])
    return out


class OpenCVTVL1:
    """OpenCV's CPU TV-L1 (Zach, Pock and Bischof 2007; Sánchez, Meinhardt-Llopis and Facciolo 2013).

    One solver per instance; ``threads`` sets OpenCV's thread pool for the whole process, so that
    several workers on one machine do not oversubscribe its cores.
    """

    name = "opencv"
    device = "cpu"
    resolve_params = staticmethod(tvl1_params)

    def __init__(self, params: dict | None = None, threads: int = 1):
        self.params = tvl1_params(params or {})
        cv2.setNumThreads(threads)
        self._solver = cv2.optflow.DualTVL1OpticalFlow_create(*self.params.values())

    def compute(self, frames: np.ndarray) -> np.ndarray:
        """``[T, H, W] uint8`` gray to ``[T-1, H, W, 2] float32`` pixels (x right, y down)."""
        return _each_pair(frames, lambda first, second: self._solver.calc(first, second, None))


class OpenCVCudaTVL1:
    """``cv2.cuda.OpticalFlowDual_TVL1``: needs an OpenCV built with CUDA (docker/Dockerfile.opencv-cuda);
    the pip wheels have none. One GPU per instance, chosen by ``gpu``."""

    name = "opencv-cuda"
    resolve_params = staticmethod(tvl1_cuda_params)

    def __init__(self, params: dict | None = None, threads: int = 1, gpu: int = 0):
        if opencv_cuda_devices() == 0:
            raise FlowError(NO_OPENCV_CUDA)
        self.params = tvl1_cuda_params(params or {})
        cv2.setNumThreads(threads)
        cv2.cuda.setDevice(gpu)
        self.device = f"cuda:{gpu}"  # OpenCV's Python bindings do not expose the device name
        self._solver = cv2.cuda.OpticalFlowDual_TVL1.create(*self.params.values())
        self._first, self._second = cv2.cuda.GpuMat(), cv2.cuda.GpuMat()

    def compute(self, frames: np.ndarray) -> np.ndarray:
        """``[T, H, W] uint8`` gray to ``[T-1, H, W, 2] float32`` pixels (x right, y down)."""
        return _each_pair(frames, self._calc)

    def _calc(self, first: np.ndarray, second: np.ndarray) -> np.ndarray:
        self._first.upload(first)
        self._second.upload(second)
        return self._solver.calc(self._first, self._second, None).download()
