"""``flowprep bench``: a flow backend's speed and fidelity on this machine, on real frame pairs.

Pairs of consecutive frames of the sample clips (:data:`CLIPS`, taken in turn), gray, scaled to
cover the asked size and centre-cropped to it. Speed is the median of timed runs over all pairs;
fidelity the end-point error (EPE) against OpenCV's CPU TV-L1 with the same parameters on the
same pairs, beside OpenCV's own sensitivity to rounding (its noise floor, docs/flow.md).

How each backend runs, as an extraction runs it:

* ``opencv``: one single-threaded solver per core in processes of their own (a flow worker
  each, as on Ray); the same pool computes the reference.
* ``opencv-cuda``: one pair at a time on one GPU, after a warm-up pair.
* ``torch``: batches of ``batch`` pairs; on CUDA eagerly and through ``torch.compile`` (each after
  an untimed run that compiles and allocates), with the peak GPU memory per pair; on the CPU
  eagerly with every core.

The pool's worker functions live here, at the top of a module that imports only OpenCV and
NumPy at load (PyTorch comes with :mod:`flowprep.flow`, imported where used), so that each
process of the pool starts quickly.
"""

from __future__ import annotations

import multiprocessing
import os
import statistics
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import av
import cv2
import numpy as np

from flowprep.errors import OptionError
from flowprep.samples import sample_clip

CLIPS = ("bikes.mp4", "bigbuckbunny.mp4")
# Pairs the fidelity is measured on (the first of those timed): enough pixels for a stable p99,
# and a bounded cost for the CPU reference when a GPU run times hundreds of pairs.
FIDELITY_PAIRS = 32
NOISE_GRAY_LEVELS = 0.001  # the noise of the noise floor, gray levels on the first frames
MIN_SIDE = 16  # the smallest pyramid level OpenCV builds


# ---------------------------------------------------------------------------------------------
# frames


def parse_frame_size(text: str) -> tuple[int, int]:
    """``"340x256"`` to ``(340, 256)``: width, height in pixels, each at least :data:`MIN_SIDE`;
    :class:`OptionError` otherwise."""
    width, sep, height = text.lower().partition("x")
    if not (sep and width.strip().isdigit() and height.strip().isdigit()):
        raise OptionError(f"size {text!r} is not WIDTHxHEIGHT in pixels, like 340x256", "size")
    size = int(width), int(height)
    if min(size) < MIN_SIDE:
        raise OptionError(f"size {text}: each side must be at least {MIN_SIDE} pixels", "size")
    return size


def decode_gray(name: str, count: int) -> list[np.ndarray]:
    """The first ``count`` frames (or all, if fewer) of a sample clip, ``[H, W]`` uint8 gray at its own size."""
    frames = []
    with av.open(str(sample_clip(name))) as container:
        for frame in container.decode(video=0):
            frames.append(frame.to_ndarray(format="gray"))
            if len(frames) == count:
                break
    return frames


def cover_crop(gray: np.ndarray, width: int, height: int) -> np.ndarray:
    """Scale (INTER_AREA) so the frame covers ``width x height``, then cut out its centre: motion
    is scaled alike in x and y."""
    scale = max(width / gray.shape[1], height / gray.shape[0])
    w, h = max(width, round(gray.shape[1] * scale)), max(height, round(gray.shape[0] * scale))
    scaled = cv2.resize(gray, (w, h), interpolation=cv2.INTER_AREA)
    x, y = (w - width) // 2, (h - height) // 2
    return np.ascontiguousarray(scaled[y:y + height, x:x + width])


def frame_pairs(clips: list[list[np.ndarray]], size: tuple[int, int], count: int) -> tuple[np.ndarray, np.ndarray, int]:
    """``count`` pairs of consecutive frames, taken from the clips in turn (a clip that runs out
    starts again), as first and second ``[N, H, W]`` uint8; also how many pairs are distinct."""
    scaled = [[cover_crop(f, *size) for f in frames] for frames in clips]
    picks = []  # (clip, index of the pair's first frame)
    for k in range(count):
        clip = k % len(scaled)
        picks.append((clip, (k // len(scaled)) % (len(scaled[clip]) - 1)))
    first = np.stack([scaled[c][i] for c, i in picks])
    second = np.stack([scaled[c][i + 1] for c, i in picks])
    return first, second, len(set(picks))


def sample_pairs(size: tuple[int, int], count: int) -> tuple[np.ndarray, np.ndarray, int]:
    """:func:`frame_pairs` of the sample :data:`CLIPS`, decoding only the frames needed."""
    clips = [decode_gray(name, -(-count // len(CLIPS)) + 1) for name in CLIPS]
    return frame_pairs(clips, size, count)


def epe_stats(flow: np.ndarray, reference: np.ndarray) -> dict:
    """End-point error in px between ``[N, H, W, 2]`` flows, mean and 99th percentile over every
    pixel of every pair."""
    epe = np.linalg.norm(flow - reference, axis=-1)
    return {"mean_epe_px": float(epe.mean()), "p99_epe_px": float(np.percentile(epe, 99))}


# ---------------------------------------------------------------------------------------------
# OpenCV's CPU solver, one single-threaded process per core


_solver = None


def _init_solver(params: dict) -> None:
    global _solver
    cv2.setNumThreads(1)
    _solver = cv2.optflow.DualTVL1OpticalFlow_create(*params.values())


def opencv_flow(pair: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Flow ``[H, W, 2]`` float32 px of one pair, in a worker of :func:`opencv_pool`."""
    return _solver.calc(pair[0], pair[1], None)


@contextmanager
def opencv_pool(processes: int, warm_up: list, params: dict | None = None):
    """A pool of ``processes`` OpenCV CPU TV-L1 solvers (``params``: every parameter of
    :data:`~flowprep.flow.opencv.TVL1_DEFAULTS`, in its order; default those), one thread each,
    in spawned processes (forking after OpenCV has run can hang), each started on a pair of
    ``warm_up`` so that start-up stays outside any timing."""
    from flowprep.flow.opencv import TVL1_DEFAULTS

    with multiprocessing.get_context("spawn").Pool(processes, initializer=_init_solver, initargs=(params or TVL1_DEFAULTS,)) as pool:
        pool.map(opencv_flow, warm_up[:processes], chunksize=1)
        yield pool


def pool_flow(pool, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """``[N, H, W, 2]`` float32 flow of the pairs, solved by ``pool`` (:func:`opencv_pool`)."""
    return np.stack(pool.map(opencv_flow, list(zip(first, second, strict=True)), chunksize=1))


def noise_floor(pool, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """OpenCV CPU's flow with :data:`NOISE_GRAY_LEVELS` of Gaussian noise on each first frame: how
    far a change far below any rounding moves its flow on these pairs. A reimplementation that
    differs from OpenCV by about this much differs by float rounding, not by algorithm."""
    rng = np.random.default_rng(0)
    # Float input is taken to be in [0, 1] (OpenCV multiplies it by 255), the same scale as uint8.
    noisy = [((a + rng.normal(0, NOISE_GRAY_LEVELS, a.shape)) / 255).astype(np.float32) for a in first]
    return pool_flow(pool, noisy, (second / np.float32(255)).astype(np.float32))


# ---------------------------------------------------------------------------------------------
# the bench


@dataclass
class Mode:
    """One way a backend ran: ``seconds`` of each timed run over all pairs, the flow of the last,
    the pairs it solved at once (``batch``) and on a GPU the peak memory per pair (bytes, ``None``
    on the CPU)."""

    seconds: list[float]
    flow: np.ndarray
    batch: int = 1
    peak_bytes_per_pair: float | None = None


@dataclass
class BenchResult:
    """What :func:`bench_flow` measured. ``modes``: by name (``processes`` for opencv, ``cuda`` for
    opencv-cuda, ``eager`` and on CUDA ``compiled`` for torch), ``default`` the one an extraction
    runs; ``reference``: what the EPE is taken against; ``noise_floor``: OpenCV against itself
    with noise, on the same pairs (:func:`noise_floor`)."""

    flow: str
    device: str
    size: tuple[int, int]
    pairs: int
    distinct_pairs: int
    repeat: int
    params: dict
    default: str
    reference: str
    modes: dict[str, dict] = field(default_factory=dict)
    noise_floor: dict = field(default_factory=dict)
    processes: int | None = None

    def to_dict(self) -> dict:
        mode = self.modes[self.default]
        return {"flow": self.flow, "device": self.device, "size": f"{self.size[0]}x{self.size[1]}", "pairs": self.pairs,
                "distinct_pairs": self.distinct_pairs, "batch": mode["batch"], "repeat": self.repeat, "processes": self.processes,
                "params": self.params, "mode": self.default, "pairs_per_s": mode["pairs_per_s"],
                "peak_bytes_per_pair": mode["peak_bytes_per_pair"], "epe_vs_opencv": mode["epe_vs_opencv"],
                "epe_p99_vs_opencv": mode["epe_p99_vs_opencv"], "epe_pairs": min(self.pairs, FIDELITY_PAIRS),
                "epe_reference": self.reference, "noise_floor": self.noise_floor, "modes": self.modes}


def _resolve(flow: str, device: str | None, batch: int | None) -> tuple[str, str | None]:
    """The backend ``flow`` stands for here and the device it runs on; :class:`OptionError` naming
    the option for a combination that cannot run."""
    from flowprep.flow import resolve_backend_name
    from flowprep.flow.opencv import NO_OPENCV_CUDA, opencv_cuda_devices
    from flowprep.flow.torch_tvl1 import default_device

    name = resolve_backend_name("torch" if flow == "auto" and device and device.startswith("cuda") else flow)
    if name != "torch" and batch is not None:
        raise OptionError(f"applies to --flow torch only; {name} solves one pair at a time", "batch")
    if name == "opencv":
        if device not in (None, "cpu"):
            raise OptionError(f"opencv runs on the CPU, not {device}; use --flow torch or opencv-cuda for a GPU", "device")
        return name, "cpu"
    if name == "opencv-cuda":
        if not opencv_cuda_devices():
            raise OptionError(NO_OPENCV_CUDA, "flow")
        if device not in (None, "cuda") and not (device or "").startswith("cuda:"):
            raise OptionError(f"opencv-cuda runs on a GPU: --device cuda or cuda:N, not {device}", "device")
        return name, device or "cuda:0"
    import torch

    device = device or default_device()
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise OptionError(f"--device {device!r} is not a torch device (cpu, cuda, cuda:N)", "device") from None
    if kind not in ("cpu", "cuda"):
        raise OptionError(f"--device {device}: the torch TV-L1 runs on cpu or cuda", "device")
    if kind == "cuda" and not torch.cuda.is_available():
        raise OptionError(f"torch sees no CUDA device here for {device}", "device")
    return name, device


def _rates(seconds: list[float], pairs: int) -> dict:
    per_s = [pairs / s for s in seconds]
    return {"pairs_per_s": statistics.median(per_s), "pairs_per_s_min": min(per_s), "pairs_per_s_max": max(per_s),
            "seconds": seconds}


def time_pool(pool, first: np.ndarray, second: np.ndarray, repeat: int) -> tuple[list[float], np.ndarray]:
    """Seconds of each of ``repeat`` runs of ``pool`` (:func:`opencv_pool`) over all pairs, and the
    flow ``[N, H, W, 2]`` px of the last. The flow comes back inside the timing (under 1 ms a pair,
    against about a second of solving)."""
    seconds, flow = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        flow = pool_flow(pool, first, second)
        seconds.append(time.perf_counter() - start)
    return seconds, flow


def _time_opencv_cuda(params: dict, device: str, first, second, repeat: int) -> tuple[str, Mode]:
    from flowprep.flow.opencv import OpenCVCudaTVL1

    backend = OpenCVCudaTVL1(params, gpu=int(device.partition(":")[2] or 0))
    backend.compute(np.stack([first[0], second[0]]))  # CUDA context and allocations: untimed
    seconds, flow = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        flow = np.stack([backend.compute(np.stack([a, b]))[0] for a, b in zip(first, second, strict=True)])
        seconds.append(time.perf_counter() - start)
    return backend.device, Mode(seconds, flow)


def _time_torch(params: dict, device: str, compile: bool, first, second, batch: int, repeat: int) -> tuple[str, Mode]:
    """Timed runs of the torch backend in batches of ``batch`` pairs, frames from and flow back to
    the host (``solve`` returns host arrays, so each run ends when the GPU has finished). On CUDA
    an untimed run first: compilation and allocations are not the speed."""
    import torch

    from flowprep.flow.torch_tvl1 import TorchTVL1

    backend = TorchTVL1(params, threads=os.cpu_count(), device=device, compile=compile)
    on_gpu = torch.device(device).type == "cuda"

    def run() -> np.ndarray:
        return np.concatenate([backend.solve(first[i:i + batch], second[i:i + batch]) for i in range(0, len(first), batch)])

    if on_gpu:
        run()
        torch.cuda.reset_peak_memory_stats(device)
    seconds, flow = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        flow = run()
        seconds.append(time.perf_counter() - start)
    solved = min(batch, backend.max_batch(*first.shape[1:]))  # solve() splits a batch larger than memory allows
    peak = torch.cuda.max_memory_allocated(device) / solved if on_gpu else None
    return backend.device, Mode(seconds, flow, solved, peak)


def bench_flow(flow: str = "auto", size: tuple[int, int] = (340, 256), pairs: int = 8, batch: int | None = None,
               device: str | None = None, repeat: int = 3, say: Callable[[str], None] = lambda line: None) -> BenchResult:
    """Measure backend ``flow`` (``auto``: the one an extraction picks here, see
    :func:`~flowprep.flow.resolve_backend_name`) with its default parameters on ``pairs`` real
    frame pairs of ``size`` (width, height): pairs/s as the median of ``repeat`` timed runs, peak
    GPU memory per pair, and EPE against OpenCV's CPU solver on the first :data:`FIDELITY_PAIRS`.

    ``batch``: pairs per torch batch (default: all, within what the GPU's free memory allows);
    ``device``: ``cpu``, ``cuda`` or ``cuda:N`` (default: a GPU when torch sees one). ``say`` gets
    a line as each stage ends (a first compilation on a GPU can take minutes: the stages before it
    are not lost from view). :class:`OptionError` names the option that cannot work.
    """
    from flowprep.flow import BACKENDS
    from flowprep.flow.opencv import TVL1_DEFAULTS

    for option, value in (("pairs", pairs), ("repeat", repeat), ("batch", batch)):
        if value is not None and value < 1:
            raise OptionError(f"{option} must be at least 1, not {value}", option)
    name, device = _resolve(flow, device, batch)
    params = BACKENDS[name].resolve_params({})
    first, second, distinct = sample_pairs(size, pairs)
    checked = min(pairs, FIDELITY_PAIRS)
    # The reference takes every parameter the solver shares with OpenCV CPU's; OpenCV CUDA's
    # algorithm (opencv-cuda, torch variant=cuda) differs from it by design.
    reference_params = {**TVL1_DEFAULTS, **{k: v for k, v in params.items() if k in TVL1_DEFAULTS}}
    same = name == "opencv" or params.get("variant") == "cpu"
    reference = "opencv cpu, same parameters" if same else "opencv cpu, another algorithm (OpenCV CUDA's), shared parameters"
    processes = os.cpu_count()
    warm_up = list(zip(first, second, strict=True))
    modes: dict[str, Mode] = {}
    start = time.perf_counter()

    def measured(mode: str) -> None:
        say(f"[{time.perf_counter() - start:.0f} s] {mode}: {_rates(modes[mode].seconds, pairs)['pairs_per_s']:.3f} pairs/s")

    with opencv_pool(processes, warm_up, reference_params) as pool:
        expected = pool_flow(pool, first[:checked], second[:checked])
        floor = epe_stats(noise_floor(pool, first[:checked], second[:checked]), expected)
        say(f"[{time.perf_counter() - start:.0f} s] reference: OpenCV CPU on {checked} pairs, {processes} processes")
        if name == "opencv":
            modes["processes"] = Mode(*time_pool(pool, first, second, repeat))
            measured("processes")
    if name == "opencv-cuda":
        device, modes["cuda"] = _time_opencv_cuda(params, device, first, second, repeat)
        measured("cuda")
    elif name == "torch":
        import torch

        on_gpu = torch.device(device).type == "cuda"
        batch = min(batch or pairs, pairs)
        for mode in ("eager", "compiled") if on_gpu else ("eager",):
            if mode == "compiled":
                say(f"[{time.perf_counter() - start:.0f} s] compiled: compiling on the first run")
            described, modes[mode] = _time_torch(params, device, mode == "compiled", first, second, batch, repeat)
            measured(mode)
        device = described
    default = "compiled" if "compiled" in modes else next(iter(modes))
    result = BenchResult(name, device, size, pairs, distinct, repeat, params, default,
                         reference, noise_floor={"mean_epe_px": floor["mean_epe_px"], "p99_epe_px": floor["p99_epe_px"]},
                         processes=processes if name == "opencv" else None)
    for mode, measured in modes.items():
        epe = epe_stats(measured.flow[:checked], expected)
        result.modes[mode] = {**_rates(measured.seconds, pairs), "batch": measured.batch, "peak_bytes_per_pair": measured.peak_bytes_per_pair,
                              "epe_vs_opencv": epe["mean_epe_px"], "epe_p99_vs_opencv": epe["p99_epe_px"]}
    return result
