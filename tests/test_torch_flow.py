"""The PyTorch TV-L1 against OpenCV's: its building blocks, its flow on real frames, known motion,
batching, and the ``torch`` backend in an extraction (in-process and on Ray)."""

from __future__ import annotations

import json
import threading

import av
import cv2
import numpy as np
import pytest
import torch

from conftest import textured_image
from flowprep.errors import FlowError
from flowprep.flow import flow_device, get_backend, resolve_backend_name
from flowprep.flow.batching import PairBatcher
from flowprep.flow.opencv import opencv_cuda_devices
from flowprep.flow.torch_tvl1 import (
    TVL1Solver,
    centered_gradient,
    median_filter,
    pyramid_sizes,
    resize_linear,
    torch_tvl1_params,
    warp_cubic,
)
from flowprep.samples import sample_clip

rng = np.random.default_rng(7)
# The solver's tests run on the CPU everywhere, and on the GPU too where there is one.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a))[None]


def gray_frames(name: str, short_side: int, count: int) -> np.ndarray:
    """The first ``count`` frames of a real sample clip, gray, short side ``short_side``."""
    frames = []
    with av.open(str(sample_clip(name))) as container:
        for frame in container.decode(video=0):
            gray = frame.to_ndarray(format="gray")
            scale = short_side / min(gray.shape)
            frames.append(cv2.resize(gray, (round(gray.shape[1] * scale), round(gray.shape[0] * scale)), interpolation=cv2.INTER_AREA))
            if len(frames) == count:
                return np.stack(frames)
    raise AssertionError(f"{name} has fewer than {count} frames")


def opencv_flow(frames: np.ndarray) -> np.ndarray:
    solver = cv2.optflow.DualTVL1OpticalFlow_create()
    return np.stack([solver.calc(frames[i], frames[i + 1], None) for i in range(len(frames) - 1)])


def epe(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.linalg.norm(a - b, axis=-1)


# ---------------------------------------------------------------------------------------------
# building blocks, each against the OpenCV function it stands for


def test_pyramid_sizes_follow_opencv_resize():
    sizes = pyramid_sizes(97, 131, 5, 0.8)
    image = np.zeros((97, 131), np.float32)
    for h, w in sizes[1:]:
        image = cv2.resize(image, None, fx=0.8, fy=0.8)
        assert image.shape == (h, w)
    # Levels under 16 pixels end the pyramid.
    assert pyramid_sizes(30, 200, 5, 0.8) == [(30, 200), (24, 160), (19, 128)]


def test_linear_resize_matches_opencv():
    image = (rng.random((37, 53)) * 255).astype(np.float32)
    small = cv2.resize(image, None, fx=0.8, fy=0.8, interpolation=cv2.INTER_LINEAR)
    ours = resize_linear(tensor(image), small.shape, (1.25, 1.25), half_pixel=True)[0].numpy()
    np.testing.assert_allclose(ours, small, atol=1e-3)
    big = cv2.resize(small, (53, 37), interpolation=cv2.INTER_LINEAR)
    ours = resize_linear(tensor(small), (37, 53), (small.shape[0] / 37, small.shape[1] / 53), half_pixel=True)[0].numpy()
    np.testing.assert_allclose(ours, big, atol=1e-3)


def test_cubic_warp_matches_opencv_remap_with_zero_border():
    image = (rng.random((37, 53)) * 255).astype(np.float32)
    gy, gx = np.mgrid[:37, :53].astype(np.float32)
    # Positions on a 1/32 px grid: OpenCV 4's remap rounds to it (docs/flow.md), OpenCV 5's does not.
    flow = rng.normal(0, 3, (2, 37, 53))  # reaches outside the image at the edges
    flow = (np.round((np.stack([gx, gy]) + flow) * 32) / 32 - np.stack([gx, gy])).astype(np.float32)
    expected = cv2.remap(image, gx + flow[0], gy + flow[1], cv2.INTER_CUBIC)
    ours = warp_cubic(torch.from_numpy(image)[None, None], tensor(flow[0]), tensor(flow[1]), a=-0.75, zero_border=True)
    np.testing.assert_allclose(ours[0, 0].numpy(), expected, atol=1e-3)
    # Whole-pixel flow samples the image itself (both kernels interpolate).
    shift = warp_cubic(torch.from_numpy(image)[None, None], torch.ones(1, 37, 53), torch.zeros(1, 37, 53), a=-0.5, zero_border=False)
    np.testing.assert_allclose(shift[0, 0, :, :-1].numpy(), image[:, 1:], atol=1e-3)
    np.testing.assert_allclose(shift[0, 0, :, -1].numpy(), image[:, -1], atol=1e-3)  # edge repeated


def test_median_and_gradient_match_opencv():
    image = (rng.random((23, 31)) * 255).astype(np.float32)
    ties = rng.integers(0, 4, (23, 31)).astype(np.float32)
    for values in (image, ties):
        for size in (3, 5):
            assert np.array_equal(median_filter(tensor(values), size)[0].numpy(), cv2.medianBlur(values, size))
    dx, dy = (g[0].numpy() for g in centered_gradient(tensor(image)))
    np.testing.assert_allclose(dx[:, 1:-1], 0.5 * (image[:, 2:] - image[:, :-2]), atol=1e-4)
    np.testing.assert_allclose(dx[:, 0], 0.5 * (image[:, 1] - image[:, 0]), atol=1e-4)
    np.testing.assert_allclose(dy[-1], 0.5 * (image[-1] - image[-2]), atol=1e-4)


# ---------------------------------------------------------------------------------------------
# the whole solver


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("clip, short_side, pairs", [("bikes.mp4", 64, 3), ("bigbuckbunny.mp4", 64, 3), ("bikes.mp4", 128, 1)])
def test_cpu_variant_matches_opencv_on_real_frames(clip, short_side, pairs, device):
    frames = gray_frames(clip, short_side, pairs + 1)
    expected = opencv_flow(frames)
    ours = get_backend("torch", device=device).compute(frames)
    assert ours.shape == expected.shape and ours.dtype == np.float32
    error = epe(ours, expected)
    # The noise floor of OpenCV itself is about 0.01-0.02 px mean (a 0.001 gray-level change).
    assert error.mean() <= 0.05 and np.percentile(error, 99) <= 0.5, (error.mean(), np.percentile(error, 99))


def known_motion(kind: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two gray frames of a real image and the exact flow from the first to the second."""
    h, w = 72, 96
    image = cv2.cvtColor(textured_image(272, 640), cv2.COLOR_RGB2GRAY)[:2 * h, 240:240 + 2 * w]  # a textured part
    centre = (w - 0.5, h - 0.5)
    matrix = {
        "translate": np.float32([[1, 0, 1.7], [0, 1, -0.6]]),
        "rotate": cv2.getRotationMatrix2D(centre, 2.0, 1.0),
        "zoom": cv2.getRotationMatrix2D(centre, 0.0, 1.04),
    }[kind]
    moved = cv2.warpAffine(image, matrix, image.shape[::-1], flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REFLECT)
    # A point p of the first frame is at M p in the second.
    gy, gx = np.mgrid[:2 * h, :2 * w].astype(np.float64)
    truth = np.stack([matrix[0, 0] * gx + matrix[0, 1] * gy + matrix[0, 2] - gx, matrix[1, 0] * gx + matrix[1, 1] * gy + matrix[1, 2] - gy], -1)
    window = (slice(h // 2, h // 2 + h), slice(w // 2, w // 2 + w))
    return np.stack([image[window], moved[window]]), truth[window].astype(np.float32), window


@pytest.mark.parametrize("kind", ["translate", "rotate", "zoom"])
def test_known_motion_no_worse_than_opencv(kind):
    frames, truth, _ = known_motion(kind)
    inner = (slice(8, -8), slice(8, -8))  # content entering at the edges is unknowable
    opencv_error = epe(opencv_flow(frames)[0][inner], truth[inner]).mean()
    torch_error = epe(get_backend("torch").compute(frames)[0][inner], truth[inner]).mean()
    assert opencv_error < 0.3
    assert torch_error <= opencv_error * 1.05 + 0.005, (torch_error, opencv_error)


def test_cuda_variant_solves_known_motion_and_stops_by_epsilon():
    frames, truth, _ = known_motion("translate")
    inner = (slice(8, -8), slice(8, -8))
    backend = get_backend("torch", {"variant": "cuda"})
    assert backend.params["iterations"] == 300 and "median_filtering" not in backend.params
    flow = backend.compute(frames)[0]
    assert epe(flow[inner], truth[inner]).mean() < 0.3
    # A loose epsilon stops early, so the flow differs from a run to the iteration limit.
    loose = get_backend("torch", {"variant": "cuda", "epsilon": 0.5}).compute(frames)[0]
    full = get_backend("torch", {"variant": "cuda", "epsilon": 0.0}).compute(frames)[0]
    assert np.abs(loose - full).max() > 1e-3


@pytest.mark.parametrize("variant", ["cpu", "cuda"])
@pytest.mark.parametrize("device", DEVICES)
def test_a_pair_flow_does_not_depend_on_its_batch(device, variant):
    clip = gray_frames("bikes.mp4", 48, 4)
    other = np.stack([cv2.resize(f, (clip.shape[2], clip.shape[1])) for f in gray_frames("bigbuckbunny.mp4", 48, 2)])
    solver = TVL1Solver({"variant": variant, "nscales": 3}, device)
    # Pairs that converge at different steps, solved together and one by one.
    first = torch.from_numpy(np.concatenate([clip[:-1], other[:1], clip[:1]]))
    second = torch.from_numpy(np.concatenate([clip[1:], other[1:], clip[:1]]))
    together = solver.solve(first, second).cpu().numpy()
    alone = np.stack([solver.solve(first[i:i + 1], second[i:i + 1]).cpu().numpy()[0] for i in range(len(first))])
    assert np.array_equal(together, alone)
    assert np.abs(together[-1]).max() < 0.05  # the static pair


def test_params_and_errors():
    assert torch_tvl1_params({}) == {"variant": "cpu", "tau": 0.25, "lambda": 0.15, "theta": 0.3, "nscales": 5, "warps": 5,
                                     "epsilon": 0.01, "scale_step": 0.8, "gamma": 0.0, "inner_iterations": 30,
                                     "outer_iterations": 10, "median_filtering": 5}
    assert torch_tvl1_params({"variant": "cuda", "iterations": 50.0})["iterations"] == 50
    with pytest.raises(ValueError, match="variant"):
        torch_tvl1_params({"variant": "gpu"})
    with pytest.raises(ValueError, match="iterations"):
        torch_tvl1_params({"variant": "cpu", "iterations": 50})
    with pytest.raises(ValueError, match="gamma"):
        torch_tvl1_params({"gamma": 0.1})
    backend = get_backend("torch", {"nscales": 1, "warps": 1}, device="cpu")  # a GPU machine's default is cuda
    assert backend.name == "torch" and backend.device == "cpu"
    with pytest.raises(FlowError, match="uint8 gray"):
        backend.compute(np.zeros((2, 8, 8), np.float32))
    with pytest.raises(FlowError, match="too small"):
        backend.compute(np.zeros((2, 2, 8), np.uint8))
    assert backend.compute(np.zeros((1, 8, 8), np.uint8)).shape == (0, 8, 8, 2)


def test_compiled_solver_gives_the_eager_flow(tmp_path, monkeypatch, caplog):
    # What the GPU runs by default, checked on the CPU: torch.compile with dynamic shapes over
    # pyramid levels and batches that shrink as pairs stop.
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # nothing compiled before
    torch._dynamo.reset()
    frames = gray_frames("bikes.mp4", 24, 4)
    first, second = torch.from_numpy(frames[:-1]), torch.from_numpy(frames[1:])
    params = {"nscales": 2, "warps": 2, "outer_iterations": 3}
    eager = TVL1Solver(params, "cpu", compile=False).solve(first, second)
    # Where compiling fails (here: no C++ compiler for Inductor), the solver runs eagerly.
    with torch._inductor.config.patch({"cpp.cxx": ("/nonexistent/c++",)}):
        fallback = TVL1Solver(params, "cpu", compile=True).solve(first, second)
    assert "InvalidCxxCompiler" in caplog.text and torch.equal(fallback, eager)
    torch._dynamo.reset()
    compiled = TVL1Solver(params, "cpu", compile=True).solve(first, second)
    assert torch.allclose(eager, compiled, atol=1e-4)
    torch._dynamo.reset()


def test_a_batch_out_of_memory_is_solved_in_halves():
    backend = get_backend("torch", {"nscales": 2, "warps": 1, "outer_iterations": 1})
    frames = gray_frames("bikes.mp4", 24, 11)
    expected = backend.compute(frames)
    solve, sizes = backend.solver.solve, []

    def small_memory(first, second):
        sizes.append(len(first))
        if len(first) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return solve(first, second)

    backend.solver.solve = small_memory
    assert np.array_equal(backend.compute(frames), expected)
    assert sizes == [10, 5, 2, 2, 2, 2, 2] and backend.max_batch(*frames.shape[1:]) == 2


def test_backend_choice_and_device():
    on_gpu = torch.cuda.is_available()
    assert resolve_backend_name("auto") == ("torch" if on_gpu else "opencv-cuda" if opencv_cuda_devices() else "opencv")
    assert resolve_backend_name("auto", gpus=4) == "torch"
    assert resolve_backend_name("auto", gpus=0) == "opencv"  # a cluster without GPUs
    with pytest.raises(ValueError, match="warps=2.5 must be a whole number"):
        get_backend("torch", {"warps": 2.5})
    assert flow_device("opencv") == "cpu" and flow_device("torch", gpus=0) == "cpu" and flow_device("torch", gpus=2) == "cuda"
    if not opencv_cuda_devices():
        with pytest.raises(FlowError, match="OpenCV built with CUDA"):
            get_backend("opencv-cuda")


# ---------------------------------------------------------------------------------------------
# batching across callers


class CountingBackend:
    """The real torch backend, recording how many pairs each ``solve`` call got."""

    def __init__(self, backend):
        self.backend, self.batches, self.shapes = backend, [], []
        self.name, self.device, self.params = backend.name, backend.device, backend.params
        self.started = threading.Event()
        self.release = threading.Event()

    def max_batch(self, height, width):
        return 12

    def solve(self, first, second):
        self.batches.append(len(first))
        self.shapes.append(first.shape[1:])
        self.started.set()
        self.release.wait()  # hold the first batch until every caller has queued
        return self.backend.solve(first, second)


def wait_until_queued(batcher: PairBatcher, requests: int) -> None:
    """Block until ``requests`` callers wait in the batcher's queues (it notifies on each)."""
    with batcher._ready:
        batcher._ready.wait_for(lambda: sum(len(q) for q in batcher._queues.values()) >= requests)


def test_pair_batcher_solves_many_callers_together():
    fast = get_backend("torch", {"nscales": 2, "warps": 2, "inner_iterations": 5, "outer_iterations": 2})
    clips = [gray_frames("bikes.mp4", 40, 9)[i:i + 4] for i in range(6)] + [gray_frames("bigbuckbunny.mp4", 40, 4)]
    counting = CountingBackend(fast)
    batcher = PairBatcher(counting)
    results = [None] * len(clips)

    def call(i):
        results[i] = batcher.compute(clips[i])

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(clips))]
    threads[0].start()
    counting.started.wait()
    for t in threads[1:]:
        t.start()
    wait_until_queued(batcher, len(clips) - 1)
    counting.release.set()
    for t in threads:
        t.join()
    batcher.close()
    for clip, flow in zip(clips, results):
        assert np.array_equal(flow, fast.compute(clip))
    # 3 pairs alone; then the 5 waiting callers of one size (15 pairs) in batches of at most 12,
    # the fullest first, and the other size on its own.
    assert counting.batches[:2] == [3, 12] and sorted(counting.batches[2:]) == [3, 3]
    with pytest.raises(FlowError, match="too small"):
        PairBatcher(fast).compute(np.zeros((3, 2, 2), np.uint8))


def test_a_rare_frame_size_waits_at_most_a_few_batches():
    fast = get_backend("torch", {"nscales": 1, "warps": 1, "inner_iterations": 2, "outer_iterations": 1})
    counting = CountingBackend(fast)
    counting.max_batch = lambda height, width: 3  # one request a batch
    batcher = PairBatcher(counting)
    common, rare = np.zeros((4, 16, 24), np.uint8), np.zeros((4, 24, 16), np.uint8)
    threads = [threading.Thread(target=batcher.compute, args=(frames,)) for frames in [common, rare] + [common] * 8]
    threads[0].start()
    counting.started.wait()
    for queued, t in enumerate(threads[1:], start=1):
        t.start()
        wait_until_queued(batcher, queued)  # so that they queue in this order
    counting.release.set()
    for t in threads:
        t.join()
    batcher.close()
    # The common size has more pairs waiting every time, yet the rare one goes fifth after the
    # first batch: MAX_WAIT_BATCHES (4) batches after it came.
    assert [shape[1] for shape in counting.shapes] == [24] * 5 + [16] + [24] * 4


class FailingBackend(CountingBackend):
    def solve(self, first, second):
        if len(first) == 2:
            raise RuntimeError("solver exploded")
        return self.backend.solve(first, second)


def test_pair_batcher_turns_solver_errors_into_flow_errors():
    backend = FailingBackend(get_backend("torch", {"nscales": 1, "warps": 1, "inner_iterations": 2, "outer_iterations": 1}))
    batcher = PairBatcher(backend)
    with pytest.raises(FlowError, match="solver exploded"):
        batcher.compute(np.zeros((3, 16, 16), np.uint8))
    assert batcher.alive and batcher.compute(np.zeros((4, 16, 16), np.uint8)).shape == (3, 16, 16, 2)
    # An error outside a batch's solve stops the thread: the waiting caller hears of it.
    backend.max_batch = lambda height, width: 1 / 0
    with pytest.raises(FlowError, match="ZeroDivisionError"):
        batcher.compute(np.zeros((4, 16, 16), np.uint8))
    batcher._thread.join()
    assert not batcher.alive
    with pytest.raises(FlowError, match="closed"):
        batcher.compute(np.zeros((4, 16, 16), np.uint8))


# ---------------------------------------------------------------------------------------------
# extraction with --flow torch


@pytest.mark.ray
def test_extract_with_torch_flow_is_the_same_in_process_and_on_ray(kinetics_folder, tmp_path):
    from test_extract_cli import SMALL, flowprep

    fast = "nscales=2,warps=2,inner_iterations=5,outer_iterations=2"
    outputs = {}
    for workers in (0, 2):
        out = outputs[workers] = tmp_path / f"out{workers}"
        ray_workers = ["--workers", workers] if workers == 0 or not torch.cuda.is_available() else []  # a GPU: one worker
        flowprep("extract", "--src", kinetics_folder, "--out", out, *ray_workers, "--flow", "torch", "--flow-params", fast, *SMALL)
    dataset = json.loads((outputs[2] / "dataset.json").read_text())
    assert dataset["flow"]["backend"] == "torch"
    assert dataset["flow"]["device"].startswith("cuda" if torch.cuda.is_available() else "cpu")
    assert dataset["params"]["flow_params"]["variant"] == "cpu" and dataset["params"]["flow_params"]["warps"] == 2
    assert "torch" in dataset["versions"]
    shards = sorted(p.relative_to(outputs[0]) for p in (outputs[0] / "shards").iterdir())
    assert shards and shards == sorted(p.relative_to(outputs[2]) for p in (outputs[2] / "shards").iterdir())
    for shard in shards:
        assert (outputs[0] / shard).read_bytes() == (outputs[2] / shard).read_bytes()


@pytest.mark.ray
def test_gpu_flow_workers_wiring_on_a_cluster_that_declares_a_gpu(kinetics_folder, tmp_path):
    """A local Ray with one (declared) GPU runs the GPU wiring: one threaded flow actor holding a
    GPU and batching across videos, many videos in flight. Its torch solves on whatever device it
    sees (the CPU here), and the shards are the bytes of an in-process run."""
    import ray

    from flowprep.extract import extract
    from flowprep.pipeline import ExtractConfig
    from flowprep.extract_actors import ray_write_shards
    from flowprep.storage import storage

    config = ExtractConfig(short_side=48, max_frames=10, chunk_frames=4, flow_backend="torch",
                           flow_params={"nscales": 2, "warps": 2, "inner_iterations": 5, "outer_iterations": 2})
    extract(kinetics_folder, tmp_path / "local", config, workers=0, progress=False)
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, logging_level="WARNING")
    try:
        report = extract(kinetics_folder, tmp_path / "gpu", config, progress=False)
    finally:
        ray.shutdown()
    assert report.written == 4 and report.failed == 0
    shards = sorted(p.name for p in (tmp_path / "local" / "shards").iterdir())
    for name in shards:
        assert (tmp_path / "local" / "shards" / name).read_bytes() == (tmp_path / "gpu" / "shards" / name).read_bytes()
    ray.init(num_cpus=1, num_gpus=0, include_dashboard=False, logging_level="WARNING")
    try:
        with pytest.raises(ValueError, match="needs a GPU; the Ray cluster has none"):
            next(ray_write_shards([], ExtractConfig(flow_backend="opencv-cuda"), storage(tmp_path / "none"), {}, {}))
    finally:
        ray.shutdown()
