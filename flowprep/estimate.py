"""``extract --dry-run``: what a run would write and how long it would take, writing nothing.

The run's own code finds and plans the videos (:func:`~flowprep.extract.find_run`,
:func:`~flowprep.extract.pending_work`: the container headers, as the real run reads them, and on
an existing output only what is left to do). A short calibration then runs the run's own stages
(:func:`~flowprep.pipeline.decode_chunks`, :func:`~flowprep.pipeline.flow_chunk`) on a few pairs
of a few videos spread over the input, with the chosen backend set up as a flow worker of the run
would have it, and the measured seconds and bytes per pixel are extrapolated to every frame the
headers announce.

How the run spreads its work comes from the same sizing as the real run
(:func:`~flowprep.extract_actors.size_workers`); without ``ray_address`` no Ray is started: the
local Ray's CPUs and GPUs are counted as it would be started (:class:`RunShape`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from flowprep.errors import VideoError
from flowprep.extract import check_output, find_run, pending_work, refuse_damaged
from flowprep.flow import get_backend
from flowprep.pipeline import ExtractConfig, decode_chunks, flow_chunk
from flowprep.shards.layout import complete_shards
from flowprep.shards.plan import VideoSize, estimate_bytes, probe_sizes
from flowprep.sources import VideoSpec
from flowprep.storage import storage

log = logging.getLogger(__name__)

# Videos calibrated, spread over the input, and flow pairs solved in each, spread over the video
# (its first frames are often a fade or a title, far quicker to solve than the rest; a pair's
# solve time varies several-fold within a video): as many in each video, so that a long video
# weighs no more than a short one.
CALIBRATION_VIDEOS = 3
CALIBRATION_PAIRS = 2
# Frames decoded from a video's start to time decoding (after a seek, the frames before it from
# the key frame would count too).
DECODE_FRAMES = 8


@dataclass(frozen=True)
class RunShape:
    """How a run would spread its work. ``mode``: ``in-process`` (``--workers 0``: decoding and flow
    take turns in one process) or ``ray``; ``flow_workers`` solvers (0 for RGB only) and
    ``decoders`` sharing ``cores`` CPUs, on ``gpus`` GPUs when ``on_gpu``; each solver has
    ``solver_threads`` threads, each video decodes with ``decoder_threads`` FFmpeg threads (0:
    FFmpeg's choice); a GPU solver takes ``gpu_batch`` pairs at once. ``counted``: where these
    numbers come from, said to the user."""

    mode: str
    flow_workers: int
    decoders: int
    cores: int
    gpus: int
    on_gpu: bool
    solver_threads: int
    decoder_threads: int
    gpu_batch: int
    counted: str


def run_shape(config: ExtractConfig, workers: int | None, decoders: int | None, gpu_share: int,
              cluster_gpus: int | None) -> RunShape:
    """The :class:`RunShape` of a run of (resolved) ``config``; ``cluster_gpus``: the GPUs of the
    Ray cluster this process is connected to, ``None`` for a local run (no Ray is started)."""
    from flowprep.flow.torch_tvl1 import default_device

    flow_on_gpu = config.has_flow and (config.flow_backend == "opencv-cuda"
                                       or (config.flow_backend == "torch" and default_device() == "cuda"))
    if workers == 0:
        return RunShape("in-process", int(config.has_flow), 1, os.cpu_count(), int(flow_on_gpu), flow_on_gpu,
                        cv2.getNumberOfCPUs(), 0, config.chunk_frames,
                        "this process (--workers 0): decoding and flow take turns")
    # Imported here: Ray's modules only for a run that would use Ray (importing starts nothing).
    from flowprep.extract_actors import FLOW_LOOKAHEAD, GPU_VIDEOS, local_ray_cpus, size_workers

    if cluster_gpus is None:
        import torch

        cpus, gpus, cores = local_ray_cpus(config, workers) or os.cpu_count(), torch.cuda.device_count(), os.cpu_count()
        counted = (f"a local Ray as the run would start it (not started here): {cpus} CPUs on this machine's {cores} "
                   f"cores, {gpus} GPUs")
    else:
        from flowprep.cluster import cluster_cpus

        cpus, gpus = cluster_cpus(), cluster_gpus
        cores = cpus
        counted = f"the Ray cluster: {cpus} CPUs, {gpus} GPUs; each worker assumed as fast as this machine"
    sizes = size_workers(config, workers, decoders, cpus, gpus, gpu_share)
    gpu_count = -(-sizes.flow_workers // gpu_share) if sizes.on_gpu else 0
    return RunShape("ray", sizes.flow_workers, sizes.decoders, cores, gpu_count, sizes.on_gpu, 1, 1,
                    GPU_VIDEOS * FLOW_LOOKAHEAD * config.chunk_frames, counted)


def calibration_videos(specs: list[VideoSpec], sizes: dict[str, VideoSize], count: int) -> list[VideoSpec]:
    """Up to ``count`` of ``specs`` whose headers announce at least 2 frames, one from the middle of
    each of ``count`` equal parts of the input."""
    usable = [spec for spec in specs if sizes[spec.video_id].frames >= 2]
    if len(usable) <= count:
        return usable
    return [usable[(2 * i + 1) * len(usable) // (2 * count)] for i in range(count)]


@dataclass
class Calibration:
    """What the run's stages measured on ``videos``, as one worker of the run spends it.

    Decoding: ``decode_seconds`` to decode and RGB-encode ``decoded_frames`` frames from each
    video's start, from ``source_pixels`` source pixels (coded size x output frames). Flow and
    bytes: ``pairs`` flow pairs spread over each video (``frames`` frames), their output pixels
    (``frame_pixels``, ``pair_pixels``), encoded bytes (``rgb_bytes``, ``flow_bytes``) and
    ``flow_seconds`` to solve, quantize and encode them (on a GPU: to solve them, per pair, in
    batches of the run's size). ``failed``: videos that failed (their reason), left out.
    ``seconds``: wall time of the calibration.
    """

    videos: list[str] = field(default_factory=list)
    decoded_frames: int = 0
    decode_seconds: float = 0.0
    source_pixels: int = 0
    frames: int = 0
    pairs: int = 0
    frame_pixels: int = 0
    pair_pixels: int = 0
    rgb_bytes: int = 0
    flow_bytes: int = 0
    flow_seconds: float = 0.0
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def add(self, other: Calibration) -> None:
        for f in dataclasses.fields(self):
            if f.name not in ("failed", "seconds"):
                setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        self.failed.update(other.failed)

    def to_dict(self) -> dict:
        return {"videos": self.videos, "failed": self.failed, "decoded_frames": self.decoded_frames, "frames": self.frames,
                "pairs": self.pairs, "seconds": round(self.seconds, 3), "decode_seconds": self.decode_seconds,
                "flow_seconds": self.flow_seconds,
                "rgb_bytes_per_pixel": self.rgb_bytes / self.frame_pixels if self.frame_pixels else None,
                "flow_bytes_per_pixel": self.flow_bytes / self.pair_pixels if self.pair_pixels else None}


def _time_gpu_solve(backend, first: np.ndarray, second: np.ndarray, batch: int) -> float:
    """Seconds a batched GPU ``backend`` takes per pair of ``first`` and ``second`` (``[n, H, W]``
    uint8), repeated to ``batch`` pairs: a GPU worker solves the pairs of many chunks at once. The
    first run is untimed: it compiles and allocates for this batch and frame size."""
    repeat = np.arange(batch) % len(first)
    first, second = first[repeat], second[repeat]
    backend.solve(first, second)
    start = time.perf_counter()
    backend.solve(first, second)  # returns host arrays: the GPU has finished
    return (time.perf_counter() - start) / batch


def pair_starts(spec: VideoSpec, size: VideoSize, config: ExtractConfig, count: int) -> list[float]:
    """Where ``count`` pairs spread over the video start, in seconds into the source: the middle of
    each of ``count`` equal parts of its frames, a few frames clear of its end (a header's
    duration can be off by a frame or two)."""
    last = max(size.frames - 4, 0)
    return [(spec.start or 0.0) + min((2 * j + 1) * size.frames // (2 * count), last) / config.fps for j in range(count)]


def calibrate_video(spec: VideoSpec, size: VideoSize, config: ExtractConfig, shape: RunShape,
                    make_backend: Callable[[], object] | None) -> Calibration:
    """:class:`Calibration` of one video through the run's stages: ``DECODE_FRAMES`` frames from its
    start for decoding, ``CALIBRATION_PAIRS`` pairs spread over it for flow and bytes, with a
    backend from ``make_backend`` (``None`` for RGB only)."""
    result = Calibration(videos=[spec.video_id])
    from_start = dataclasses.replace(config, max_frames=min(DECODE_FRAMES, config.max_frames or DECODE_FRAMES),
                                     chunk_frames=DECODE_FRAMES)
    # One pair a chunk: the codecs encode frame by frame, so chunking changes no byte.
    one_pair = dataclasses.replace(config, max_frames=2, chunk_frames=2)
    try:
        start = time.perf_counter()
        decoded = list(decode_chunks(spec, from_start, shape.decoder_threads))
        result.decode_seconds = time.perf_counter() - start
        # Decoded after a seek (the frames from the key frame before it are not the run's work): untimed.
        chunks = [chunk for at in pair_starts(spec, size, config, CALIBRATION_PAIRS)
                  for chunk in decode_chunks(dataclasses.replace(spec, start=at), one_pair, shape.decoder_threads)]
        backend = make_backend() if make_backend else None
        start = time.perf_counter()
        solved = [flow_chunk(chunk, backend, one_pair) for chunk in chunks] if backend else chunks
        result.flow_seconds = time.perf_counter() - start
    except VideoError as e:
        return Calibration(failed={spec.video_id: f"{e.stage}: {e}"})
    for chunk in decoded:
        result.decoded_frames += len(chunk.rgb)
        result.source_pixels += len(chunk.rgb) * size.source_pixels
    for chunk, done in zip(chunks, solved):
        pixels = chunk.height * chunk.width
        result.frames += len(chunk.rgb)
        result.pairs += len(done.flow)
        result.frame_pixels += len(chunk.rgb) * pixels
        result.pair_pixels += len(done.flow) * pixels
        result.rgb_bytes += sum(map(len, chunk.rgb))
        result.flow_bytes += sum(map(len, done.flow))
    if shape.on_gpu and getattr(backend, "batched", False):  # flow_chunk solved a batch far smaller than the run's
        first, second = np.stack([chunk.gray[0] for chunk in chunks]), np.stack([chunk.gray[1] for chunk in chunks])
        result.flow_seconds = _time_gpu_solve(backend, first, second, shape.gpu_batch) * len(chunks)
    return result


def calibrate(specs: list[VideoSpec], sizes: dict[str, VideoSize], config: ExtractConfig, shape: RunShape) -> Calibration:
    """Calibrate ``config`` on :func:`calibration_videos` of ``specs``, each video as one worker of
    a run of ``shape`` would process it.

    CPU flow workers of a Ray run are as many single-threaded solvers at once (up to the cores
    and videos): that many threads here, each with a solver of its own, so the timings include
    their sharing of the machine. A GPU solver runs once untimed first (compilation, allocation).
    """
    chosen = calibration_videos(specs, sizes, CALIBRATION_VIDEOS)
    total = Calibration()
    start = time.perf_counter()

    def make_backend():
        return get_backend(config.flow_backend, config.flow_params, threads=shape.solver_threads)

    if not chosen:
        return total
    if shape.on_gpu:
        backend = make_backend()  # one GPU solver, as a GPU worker holds one
        calibrate_video(chosen[0], sizes[chosen[0].video_id], config, shape, lambda: backend)  # warm-up
        results = [calibrate_video(spec, sizes[spec.video_id], config, shape, lambda: backend) for spec in chosen]
    else:
        parallel = max(1, min(shape.flow_workers if shape.mode == "ray" else 1, shape.cores, len(chosen)))
        with ThreadPoolExecutor(parallel) as pool:  # the solvers and FFmpeg release the GIL
            results = list(pool.map(lambda spec: calibrate_video(spec, sizes[spec.video_id], config, shape,
                                                                 make_backend if config.has_flow else None), chosen))
    for result in results:
        total.add(result)
    total.seconds = time.perf_counter() - start
    return total


@dataclass
class Estimate:
    """What ``extract`` with the same arguments would do, predicted (see :func:`estimate_run`).

    Counts: ``videos`` found (``missing`` among them: named by the source but unusable),
    ``unreadable`` (headers that cannot be read or announce fewer than 2 frames: they would
    fail), ``done`` (in complete shards of the output), ``to_do``; ``shards`` the run would write,
    ``shards_done`` complete already. ``frames`` and ``flow_pairs`` to do, from the headers.
    Bytes: ``rgb_bytes`` + ``flow_bytes`` = ``estimated_bytes`` (calibrated), ``plan_bytes`` the
    shard plan's header estimate. Seconds: ``planning`` (headers, measured here), ``decode`` and
    ``flow`` (the work of one worker, summed over the videos to do), and ``estimated_seconds``,
    the wall time of the whole run with its workers (``shape``), Ray's start-up aside.
    """

    out: str
    output: str
    flow: str
    device: str | None
    shape: RunShape
    videos: int = 0
    missing: int = 0
    unreadable: dict[str, str] = field(default_factory=dict)
    done: int = 0
    to_do: int = 0
    shards: int = 0
    shards_done: int = 0
    frames: int = 0
    flow_pairs: int = 0
    rgb_bytes: int = 0
    flow_bytes: int = 0
    plan_bytes: int = 0
    planning_seconds: float = 0.0
    decode_seconds: float = 0.0
    flow_seconds: float = 0.0
    estimated_seconds: float = 0.0
    calibration: Calibration = field(default_factory=Calibration)
    notes: list[str] = field(default_factory=list)

    @property
    def estimated_bytes(self) -> int:
        return self.rgb_bytes + self.flow_bytes

    def to_dict(self) -> dict:
        return {"dry_run": True, "out": self.out, "output": self.output, "videos": self.videos, "missing": self.missing,
                "unreadable": len(self.unreadable), "done": self.done, "to_do": self.to_do, "shards": self.shards,
                "shards_done": self.shards_done, "frames": self.frames, "flow_pairs": self.flow_pairs,
                "estimated_bytes": self.estimated_bytes, "rgb_bytes": self.rgb_bytes, "flow_bytes": self.flow_bytes,
                "plan_bytes": self.plan_bytes, "estimated_seconds": round(self.estimated_seconds, 1),
                "seconds": {"planning": round(self.planning_seconds, 3), "decode": round(self.decode_seconds, 1),
                            "flow": round(self.flow_seconds, 1)},
                "flow": self.flow, "device": self.device, "workers": dataclasses.asdict(self.shape),
                "calibration": self.calibration.to_dict(), "notes": self.notes}


def wall_seconds(decode: float, flow: float, shape: RunShape) -> float:
    """Wall time of ``decode`` and ``flow`` seconds of one worker's work spread as ``shape`` does:
    in one process they add up; CPU flow workers and decoders share the cores; GPU flow runs on
    the GPUs beside the decoders, and the slower of the two sets the pace."""
    if shape.mode == "in-process":
        return decode + flow
    decoding = decode / max(1, min(shape.decoders, shape.cores))
    if shape.on_gpu:
        return max(flow / shape.gpus, decoding)
    return max((decode + flow) / max(1, min(max(shape.flow_workers, shape.decoders), shape.cores)), decoding)


def estimate_run(
    src: str | Path,
    out: str | Path,
    config: ExtractConfig = ExtractConfig(),
    *,
    annotations: str | Path | None = None,
    labels_file: str | Path | None = None,
    limit: int | None = None,
    overwrite: bool = False,
    retry_failed: bool = False,
    workers: int | None = None,
    decoders: int | None = None,
    writers: str = "auto",
    ray_address: str | None = None,
    gpu_share: int = 1,
) -> Estimate:
    """Predict what ``extract`` with these arguments would write and how long it would take,
    writing nothing (not even ``out``) and taking no lock.

    The same checks as ``extract`` raise the same errors (bad options, an ``out`` the run would
    refuse). On an existing output only what is left to do is counted (``overwrite``: all of it).
    With ``ray_address`` (or ``$RAY_ADDRESS``) this connects to the cluster to count its CPUs
    and GPUs; the calibration runs in this process either way.
    """
    start = time.perf_counter()
    out = storage(out)
    run = find_run(src, out, config, annotations, labels_file, limit, workers, writers, ray_address)
    config = run.config
    exists = bool(out.entries())
    if exists:
        check_output(out, run.description, overwrite)
        if not overwrite:
            refuse_damaged(out)
    pending = pending_work(out, run.specs, config, retry_failed, fresh=overwrite)
    todo = pending.todo_videos
    sizes = {**pending.sizes, **probe_sizes([spec for spec in todo if spec.video_id not in pending.sizes], config)}
    shape = run_shape(config, workers, decoders, gpu_share, run.gpus)
    estimate = Estimate(
        out=str(out), output="overwritten" if exists and overwrite else "resumed" if exists else "new",
        flow=config.flow_backend, device=run.description["flow"]["device"], shape=shape,
        videos=len(run.specs) + len(run.problems), missing=len(run.problems), done=len(run.specs) - len(todo),
        to_do=len(todo), shards=len(pending.todo), shards_done=len(complete_shards(out)) if exists and not overwrite else 0,
        planning_seconds=time.perf_counter() - start)
    todo_sizes = [sizes[spec.video_id] for spec in todo]
    for spec, size in zip(todo, todo_sizes):
        if size.error or size.frames < 2:
            estimate.unreadable[spec.video_id] = size.error or f"its header announces {size.frames} frame(s): flow needs 2"
    estimate.frames = sum(size.frames for size in todo_sizes if size.frames >= 2)
    estimate.flow_pairs = estimate.frames - sum(size.frames >= 2 for size in todo_sizes) if config.has_flow else 0
    estimate.plan_bytes = sum(estimate_bytes(size, config) for size in todo_sizes)

    cal = estimate.calibration = calibrate(todo, sizes, config, shape)
    if cal.frames and cal.decoded_frames:
        usable = [size for size in todo_sizes if size.frames >= 2]
        frame_pixels = sum(size.pixels for size in usable)
        pair_pixels = sum((size.frames - 1) * size.height * size.width for size in usable) if config.has_flow else 0
        source_pixels = sum(size.frames * size.source_pixels for size in usable)
        estimate.rgb_bytes = round(frame_pixels * cal.rgb_bytes / cal.frame_pixels)
        estimate.decode_seconds = source_pixels * cal.decode_seconds / cal.source_pixels
        if cal.pairs:
            estimate.flow_bytes = round(pair_pixels * cal.flow_bytes / cal.pair_pixels)
            estimate.flow_seconds = pair_pixels * cal.flow_seconds / cal.pair_pixels
        estimate.estimated_seconds = estimate.planning_seconds + wall_seconds(estimate.decode_seconds, estimate.flow_seconds, shape)
    elif todo:
        estimate.notes.append("no video to do could be decoded for calibration: every one would fail, storing nothing")
    if exists and not overwrite:
        estimate.notes.append(f"resumed: {estimate.done} videos in {estimate.shards_done} complete shards of {out} count as done")
    elif exists:
        estimate.notes.append(f"--overwrite: everything in {out} would be deleted and done again")
    if shape.mode == "ray":
        estimate.notes.append("not counted: starting Ray and its workers (seconds on one machine)")
    return estimate
