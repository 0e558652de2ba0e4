"""TV-L1 flow throughput and fidelity of every flow backend against OpenCV's CPU solver on all cores.

In one run, on the same frame pairs (consecutive frames of the real clips bikes.mp4 and
bigbuckbunny.mp4, taken in turn, gray, scaled with INTER_AREA to cover each ``--sizes`` W x H and
centre-cropped to it, so that motion is scaled alike in x and y):

1. baseline and fidelity reference: ``cv2.optflow.DualTVL1OpticalFlow`` with its defaults, one
   single-threaded process per core (multiprocessing, spawn), start-up outside the timing;
2. ``torch-cpu``: flowprep's PyTorch TV-L1 (variant ``cpu``) on the CPU, eager, PyTorch using
   every core, all pairs of a size in one batch;
3. on a CUDA GPU (``--device``): the PyTorch TV-L1 in both variants (``cpu``: OpenCV CPU's
   algorithm; ``cudavariant``: OpenCV CUDA's), eager and through ``torch.compile``, in batches of
   ``--batch`` pairs; one warm-up run (compilation included) outside the timing; the clock stops
   after ``torch.cuda.synchronize()``. GPU timings include copying the uint8 frames to the GPU and
   the flow back to the host, as an extraction has to;
4. ``opencv-cuda`` (``cv2.cuda.OpticalFlowDual_TVL1``) when this OpenCV was built with CUDA.

For each backend and size: pairs/s (median of ``--repeat`` runs, with min and max), its ratio to
the baseline at that size, and the endpoint error (EPE, px; mean and 99th percentile over all
pixels of all pairs) against the reference: OpenCV CPU for the ``cpu`` variant; for the ``cuda``
variant opencv-cuda when it ran, otherwise OpenCV CPU, flagged as another algorithm. Beside them,
the noise floor: OpenCV CPU against itself with 0.001 gray levels of noise on the first frames
(TV-L1 is so sensitive on some pairs that this moves its flow by 0.05-0.25 px mean EPE).

Then the memory-traffic floor of the PyTorch solver: a fused primal-dual step reads 9 float32
arrays (I1wx, I1wy, rho_c, u1, u2, p11, p12, p21, p22) and writes 6 (u1, u2, p11..p22),
60 bytes a pixel a step. Summed over the pyramid levels, for every iteration the parameters
allow (the bound), for the steps the batched solver ran, and for the steps each pair needed
until it stopped (counted by wrapping the solver's step), it gives bytes per pair and the
pairs/s that ``--bandwidth-gbs`` of memory bandwidth could at most sustain (the steps alone:
warps, median filters and resizes come on top).

Run:  python benchmarks/flow.py [--pairs 8] [--sizes 340x256,224x224] [--repeat 3]
      [--backends torch-cpu,...] [--batch N] [--device cuda] [--bandwidth-gbs 4800]
      On a GPU machine: python benchmarks/flow.py --pairs 512 --backends gpu
      (torch-cpu takes tens of seconds a pair on a few cores: leave it out of large runs).
Writes benchmarks/results/flow.json. Ratio = backend pairs/s / baseline pairs/s.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import torch
from results import write_results

from flowprep.bench import CLIPS, decode_gray, epe_stats, frame_pairs, noise_floor, opencv_pool, parse_frame_size, time_pool
from flowprep.flow.opencv import OpenCVCudaTVL1, opencv_cuda_devices
from flowprep.flow.torch_tvl1 import (
    VARIANT_DEFAULTS,
    TVL1Solver,
    device_description,
    pyramid_sizes,
)

# name -> (runs on the GPU, TV-L1 variant, torch.compile)
TORCH_BACKENDS = {
    "torch-cpu": (False, "cpu", False),
    "torch-gpu": (True, "cpu", False),
    "torch-gpu-compiled": (True, "cpu", True),
    "torch-gpu-cudavariant": (True, "cuda", False),
    "torch-gpu-cudavariant-compiled": (True, "cuda", True),
}
BACKENDS = ("opencv-cuda", *TORCH_BACKENDS)
# --backends gpu: every backend but torch-cpu, which is far too slow for GPU-sized runs.
GPU_BACKENDS = tuple(name for name in BACKENDS if name != "torch-cpu")
# A fused step reads I1wx, I1wy, rho_c, u1, u2, p11, p12, p21, p22 and writes u1, u2, p11..p22.
BYTES_PER_PIXEL_STEP = (9 + 6) * 4


# ---------------------------------------------------------------------------------------------
# the PyTorch TV-L1


class StepCounter:
    """Counts the primal-dual steps of a :class:`TVL1Solver` per pyramid level ``(h, w)``, summed
    over pairs: the steps run on each pair of a batch, and those a pair was still active in (a
    pair that has stopped is carried along, frozen, until the solver's next check drops it).
    Installed over the solver's ``_step`` for one run."""

    def __init__(self, solver: TVL1Solver):
        self.solver, self.step = solver, solver._step
        self.batch_steps: Counter = Counter()
        self.active_steps: dict[tuple[int, int], torch.Tensor] = {}  # level -> int64 scalar on the device

    def __call__(self, active, i1wx, *rest):
        level = tuple(i1wx.shape[1:])
        self.batch_steps[level] += active.shape[0]
        # Summed on the device: reading it here would wait for the GPU at every step.
        self.active_steps[level] = self.active_steps.get(level, 0) + active.sum()
        return self.step(active, i1wx, *rest)

    def __enter__(self):
        self.solver._step = self
        return self

    def __exit__(self, *exc):
        self.solver._step = self.step

    def per_pair(self, pairs: int) -> dict:
        """Mean steps per pair at each level, over the ``pairs`` solved: ``batch`` (run on it)
        and ``active`` (needed by it)."""
        return {level: {"batch": self.batch_steps[level] / pairs, "active": self.active_steps[level].item() / pairs}
                for level in self.batch_steps}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def torch_run(solver: TVL1Solver, first: np.ndarray, second: np.ndarray, batch: int) -> tuple[float, np.ndarray]:
    """Seconds to solve all pairs in batches of ``batch``, frames from and flow back to the host,
    and the flow ``[N, H, W, 2]`` px."""
    device = solver.device
    sync(device)
    t0 = time.perf_counter()
    flows = []
    for i in range(0, len(first), batch):
        a = torch.from_numpy(first[i:i + batch]).to(device)
        b = torch.from_numpy(second[i:i + batch]).to(device)
        flows.append(solver.solve(a, b).cpu())
    sync(device)
    return time.perf_counter() - t0, torch.cat(flows).numpy()


def torch_backend(name: str, first: np.ndarray, second: np.ndarray, args) -> dict:
    """Timed runs of one PyTorch configuration, with its step counts, batch and peak GPU memory.

    On the GPU a warm-up run (compilation, allocator) comes first, untimed, and counts the steps.
    On the CPU there is no warm-up to pay for; the steps are counted in the first timed run (one
    tiny add a step against milliseconds of work)."""
    on_gpu, variant, compile_step = TORCH_BACKENDS[name]
    device = torch.device(args.device if on_gpu else "cpu")
    solver = TVL1Solver({"variant": variant}, device, compile=compile_step)
    n = len(first)
    batch = min(args.batch or n, n) if on_gpu else n
    result = {"variant": variant, "compile": compile_step, "device": device_description(str(device)), "batch": batch}
    with StepCounter(solver) as counter:
        took, flow = torch_run(solver, first, second, batch)
    result["steps_per_pair"] = counter.per_pair(n)
    if on_gpu:
        result["warmup_seconds"] = took  # compilation and first allocations: not a measurement
        torch.cuda.reset_peak_memory_stats(device)
        seconds = []
    else:
        seconds = [took]
    while len(seconds) < args.repeat:
        took, flow = torch_run(solver, first, second, batch)
        seconds.append(took)
    if on_gpu:
        result["peak_bytes_per_pair"] = torch.cuda.max_memory_allocated(device) / batch
        # Against the bytes per pixel that flowprep.flow.torch_tvl1.pairs_per_batch assumes.
        result["peak_bytes_per_pair_pixel"] = result["peak_bytes_per_pair"] / first[0].size
    result["seconds"] = seconds
    return result | {"flow": flow}


# ---------------------------------------------------------------------------------------------
# opencv-cuda


def opencv_cuda(first: np.ndarray, second: np.ndarray, repeat: int) -> dict:
    """Timed runs of ``cv2.cuda.OpticalFlowDual_TVL1``, one pair at a time (upload, solve,
    download), after one untimed warm-up pair."""
    backend = OpenCVCudaTVL1({})
    backend.compute(np.stack([first[0], second[0]]))
    seconds, flow = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        flow = np.stack([backend.compute(np.stack([a, b]))[0] for a, b in zip(first, second, strict=True)])
        seconds.append(time.perf_counter() - t0)
    return {"variant": "opencv-cuda", "device": backend.device, "batch": 1, "seconds": seconds, "flow": flow}


# ---------------------------------------------------------------------------------------------
# fidelity and the memory-traffic floor


def max_steps_per_level(variant: str) -> int:
    """Primal-dual steps a level can take at most with the variant's default parameters."""
    p = VARIANT_DEFAULTS[variant]
    return p["warps"] * (p["outer_iterations"] * p["inner_iterations"] if variant == "cpu" else p["iterations"])


def floor(steps: dict[tuple[int, int], float], bandwidth_gbs: float) -> dict:
    """Bytes a pair must move for ``steps`` primal-dual steps per level ``(h, w)``, and the pairs/s
    that ``bandwidth_gbs`` (1e9 bytes/s) allows at most."""
    moved = sum(count * h * w * BYTES_PER_PIXEL_STEP for (h, w), count in steps.items())
    return {"steps": sum(steps.values()), "bytes_per_pair": moved, "ceiling_pairs_per_s": bandwidth_gbs * 1e9 / moved}


def size_floors(size: tuple[int, int], variants: set[str], backends: dict, bandwidth_gbs: float) -> list[dict]:
    """Rows of the floor table for one size, by variant: its all-iterations bound, then the steps
    each PyTorch backend of that variant ran on its batches and the steps its pairs needed."""
    width, height = size
    rows = []
    for variant in sorted(variants):
        p = VARIANT_DEFAULTS[variant]
        levels = pyramid_sizes(height, width, p["nscales"], p["scale_step"])
        rows.append({"variant": variant, "steps_from": "all iterations (bound)", "backend": None,
                     **floor(dict.fromkeys(levels, max_steps_per_level(variant)), bandwidth_gbs)})
        for name, result in backends.items():
            if result["variant"] != variant or "steps_per_pair" not in result:
                continue
            for kind, label in (("batch", "run on the batch"), ("active", "needed per pair")):
                steps = {level: counts[kind] for level, counts in result["steps_per_pair"].items()}
                rows.append({"variant": variant, "steps_from": label, "backend": name, **floor(steps, bandwidth_gbs)})
    return rows


# ---------------------------------------------------------------------------------------------
# the run


def skip_reason(name: str, device: str) -> str | None:
    """Why backend ``name`` cannot run on this machine, or None."""
    if name == "opencv-cuda" and opencv_cuda_devices() == 0:
        return f"cv2 {cv2.__version__} has no CUDA device"
    if TORCH_BACKENDS.get(name, (False,))[0] and not (torch.device(device).type == "cuda" and torch.cuda.is_available()):
        return f"torch sees no CUDA device {device!r}"
    return None


def machine_info(device: str) -> dict:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), platform.processor())
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "cv2": cv2.__version__, "numpy": np.__version__,
            "opencv_cuda_devices": opencv_cuda_devices(), "gpu": None}
    if torch.cuda.is_available() and torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info |= {"gpu": props.name, "gpu_memory_bytes": props.total_memory, "cuda": torch.version.cuda}
    return info


def rates(seconds: list[float], pairs: int, base_rate: float) -> dict:
    """pairs/s (median, min, max over the runs) and the ratio of the median to ``base_rate``."""
    per_s = [pairs / s for s in seconds]
    median = statistics.median(per_s)
    return {"pairs_per_s": median, "pairs_per_s_min": min(per_s), "pairs_per_s_max": max(per_s), "ratio": median / base_rate}


def reference_for(variant: str, flows: dict) -> tuple[str, str]:
    """The backend whose flow a ``variant`` is compared with (its own algorithm's OpenCV solver
    when that ran, else OpenCV CPU), and how the table names it."""
    if variant == "cpu":
        return "opencv", "opencv"
    if variant == "cuda" and "opencv-cuda" in flows:
        return "opencv-cuda", "opencv-cuda"
    return "opencv", "opencv (other algorithm)"


def measure_size(size, clips, pool, names, args) -> dict:
    """Every backend at one frame size: timings, fidelity, floor."""
    first, second, distinct = frame_pairs(clips, size, args.pairs)
    n = len(first)
    print(f"\n{size[0]}x{size[1]}: {n} pairs ({distinct} distinct)", flush=True)
    seconds, reference = time_pool(pool, first, second, args.repeat)
    backends = {"opencv": {"variant": "cpu", "device": f"cpu, {args.workers} processes", "batch": 1, "seconds": seconds}}
    flows = {"opencv": reference}
    for name in names:
        print(f"  {name} ...", flush=True)
        result = opencv_cuda(first, second, args.repeat) if name == "opencv-cuda" else torch_backend(name, first, second, args)
        flows[name] = result.pop("flow")
        backends[name] = result
    base_rate = statistics.median(n / s for s in seconds)
    for name, result in backends.items():
        result.update(rates(result["seconds"], n, base_rate))
        if name != "opencv":
            reference, label = reference_for(result["variant"], flows)
            result["fidelity"] = {"against": label, **epe_stats(flows[name], flows[reference])}
    variants = {r["variant"] for r in backends.values() if r["variant"] in VARIANT_DEFAULTS} | {"cpu"}
    return {"pairs": n, "distinct_pairs": distinct, "backends": backends,
            "noise_floor": epe_stats(noise_floor(pool, first, second), flows["opencv"]),
            "floor": size_floors(size, variants, backends, args.bandwidth_gbs)}


def print_size(label: str, result: dict) -> None:
    print(f"\n{label}, {result['pairs']} pairs ({result['distinct_pairs']} distinct)")
    print(f"{'backend':32} {'pairs/s':>8} {'min':>8} {'max':>8} {'x base':>7} {'batch':>5} {'MiB/pair':>8}"
          f"  {'EPE mean':>8} {'p99':>6}  against")
    for name, r in result["backends"].items():
        mib = f"{r['peak_bytes_per_pair'] / 2**20:8.1f}" if "peak_bytes_per_pair" in r else f"{'-':>8}"
        fid = r.get("fidelity")
        epe = f"{fid['mean_epe_px']:8.3f} {fid['p99_epe_px']:6.3f}  {fid['against']}" if fid else f"{'-':>8} {'-':>6}  (reference)"
        print(f"{name:32} {r['pairs_per_s']:8.3f} {r['pairs_per_s_min']:8.3f} {r['pairs_per_s_max']:8.3f} {r['ratio']:7.3f}"
              f" {r['batch']:5d} {mib}  {epe}")
    floor_epe = result["noise_floor"]
    print(f"{'noise floor':76}  {floor_epe['mean_epe_px']:8.3f} {floor_epe['p99_epe_px']:6.3f}  opencv, 0.001 gray levels of noise on frame 1")


def print_floor(label: str, result: dict, bandwidth_gbs: float) -> None:
    print(f"\n{label}: memory-traffic floor, {BYTES_PER_PIXEL_STEP} B/pixel/step, {bandwidth_gbs:g} GB/s")
    print(f"{'variant':8} {'steps':26} {'backend':32} {'steps/pair':>10} {'GB/pair':>8} {'max pairs/s':>11} {'measured':>9}")
    for row in result["floor"]:
        measured = f"{result['backends'][row['backend']]['pairs_per_s']:9.3f}" if row["backend"] else f"{'':9}"
        print(f"{row['variant']:8} {row['steps_from']:26} {row['backend'] or '':32} {row['steps']:10.0f}"
              f" {row['bytes_per_pair'] / 1e9:8.2f} {row['ceiling_pairs_per_s']:11.1f} {measured}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=8, help="frame pairs per size")
    parser.add_argument("--sizes", default="340x256,224x224", help="comma-separated W x H")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs of each backend; medians are reported")
    parser.add_argument("--backends", default=",".join(BACKENDS),
                        help=f"comma-separated, from {', '.join(BACKENDS)}, or gpu for all but torch-cpu (those "
                             "this machine cannot run are skipped); the OpenCV CPU baseline always runs")
    parser.add_argument("--batch", type=int, default=0, help="pairs per GPU batch (default: all pairs of a size)")
    parser.add_argument("--device", default="cuda", help="the torch device of the torch-gpu backends")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="baseline processes (default: every core)")
    parser.add_argument("--bandwidth-gbs", type=float, default=4800.0, help="memory bandwidth for the floor, 1e9 bytes/s (H200 HBM3e: 4800)")
    parser.add_argument("--json", default="benchmarks/results/flow.json")
    args = parser.parse_args()

    names = []
    requested = [b for name in args.backends.split(",") for b in (GPU_BACKENDS if name == "gpu" else [name]) if b]
    for name in dict.fromkeys(requested):
        if name not in BACKENDS:
            parser.error(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")
        reason = skip_reason(name, args.device)
        if reason:
            print(f"skipping {name}: {reason}")
        else:
            names.append(name)
    torch.set_num_threads(os.cpu_count())  # torch-cpu uses every core, as the baseline does
    sizes = [parse_frame_size(s) for s in args.sizes.split(",")]
    # Each clip takes every other pair: ceil(pairs / 2) + 1 frames of it are enough.
    clips = [decode_gray(name, -(-args.pairs // len(CLIPS)) + 1) for name in CLIPS]
    print(f"backends: opencv (baseline, {args.workers} processes), {', '.join(names) or 'no others'}")

    results = {"machine": machine_info(args.device), "args": vars(args), "clips": list(CLIPS),
               "bytes_per_pixel_step": BYTES_PER_PIXEL_STEP, "sizes": {}}
    warm = frame_pairs(clips, sizes[0], args.workers)
    with opencv_pool(args.workers, list(zip(warm[0], warm[1], strict=True))) as pool:
        for size in sizes:
            results["sizes"][f"{size[0]}x{size[1]}"] = measure_size(size, clips, pool, names, args)

    for label, result in results["sizes"].items():
        print_size(label, result)
    for label, result in results["sizes"].items():
        print_floor(label, result, args.bandwidth_gbs)
    # JSON keys must be strings: levels as "HxW".
    for result in results["sizes"].values():
        for r in result["backends"].values():
            if "steps_per_pair" in r:
                r["steps_per_pair"] = {f"{h}x{w}": c for (h, w), c in r["steps_per_pair"].items()}
    write_results(args.json, results)


if __name__ == "__main__":
    main()
