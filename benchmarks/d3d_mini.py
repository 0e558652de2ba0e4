"""A miniature D3D: the whole method, through its command lines, on a task where motion is the only cue.

The data set is made here from real frames of the sample clips (bikes.mp4, bigbuckbunny.mp4,
carphone): each video is a window sliding over one still frame, and its class is the motion
alone, 8 classes: the content moves left, right, up or down at 1 or 2 px a frame. No single
frame tells the class: every still serves every class equally, and each still is tiled into a
seamless torus (mirrored copies) on which every frame's window position is uniform, for every
class alike. Training and validation videos come from different stills.

Then, each step a subprocess running the real command (with ``benchmarks/`` on PYTHONPATH for
the network, ``mini3d:factory``, a small 3D CNN that trains in seconds on two cores):

1. ``flowprep extract`` (OpenCV TV-L1, the frames kept at their size);
2. ``pipelines/train_teacher.py``: the flow teacher;
3. ``flowprep teacher``: its logits for every stored view (starts, 3 crops, flips);
4. ``pipelines/train_d3d.py`` twice per seed, same steps and seed: cross-entropy alone
   (``--distill-weight 0``, the RGB baseline) and with distillation;
5. ``pipelines/evaluate.py`` on the validation videos for the teacher and each student;
6. ``pipelines/probe_motion.py`` (layer ``conv3``, simple decoder) on each student, and on the
   teacher for reference: features of a network whose input is the motion.

Horizontal flips mirror a left motion into a right one, so training flips swap those labels
(``--flip-swap``): the flow teacher learns left from right only if flipped flow has x negated,
and the student's flipped views only agree with their label if the teacher's stored flipped
view is the same mirrored clip. A flip sign or a view misalignment anywhere shows as a teacher
or D3D student that confuses left and right, and in the stored views' agreement with their
labels, which the benchmark checks through ``ClipDataset`` itself (:func:`view_agreement`).

Prints a table and, last, a JSON line with ``teacher_top1``, ``student_ce_top1``,
``student_d3d_top1`` (means over seeds), ``probe_epe_ce``, ``probe_epe_d3d``, ``probe_epe_zeros``
(pixels a frame; means over seeds), ``chance``, and also ``probe_epe_teacher``,
``teacher_view_agreement`` and the per-seed values; writes benchmarks/results/d3d_mini.json.

    python benchmarks/d3d_mini.py                  # about 8 minutes on 2 CPU cores
    python benchmarks/d3d_mini.py --quick          # a smoke run of every step (tests/test_d3d_mini.py)
    python benchmarks/d3d_mini.py --work runs/mini # keep the videos, shards, runs and logs
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import fmean

import av
import cv2
import numpy as np

from flowprep import ClipDataset
from flowprep.process import run_and_exit
from flowprep.samples import SAMPLE_LAYOUT, sample_clip
from results import write_results

HERE = Path(__file__).resolve().parent
PIPELINES = HERE.parent / "pipelines"
MODEL = "mini3d:factory"  # benchmarks/mini3d.py
PROBE_LAYER = "conv3"  # the last layer before pooling: the most frames behind each feature

# Content motion per class, (dy, dx) pixels a frame (x right, y down: the flow's convention).
DIRECTIONS = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}
SPEEDS = (1, 2)
MOTIONS = {f"{name}_{speed}px": (dy * speed, dx * speed) for name, (dy, dx) in DIRECTIONS.items() for speed in SPEEDS}
# A horizontal flip turns a left motion into a right one: the training jobs swap those labels.
FLIP_PAIRS = [(f"left_{speed}px", f"right_{speed}px") for speed in SPEEDS]
TEACHER = "mini"  # the stored targets' name

HEIGHT, WIDTH = 64, 80  # video frames; 80 wide gives the teacher's grid 3 crop positions
STILL_HEIGHT = 96  # stills are scaled to this height before tiling
CROP, CLIP_LEN, BATCH = 56, 6, 16
LR = 0.05
# TV-L1 for --quick: one scale, one warp, few iterations (the smoke run checks the wiring, not the flow).
CHEAP_TVL1 = "nscales=1,warps=1,outer_iterations=1,inner_iterations=5,median_filtering=1"


def sample_stills(per_clip: int) -> list[np.ndarray]:
    """``per_clip`` frames of each sample clip, evenly spaced in time, scaled to STILL_HEIGHT rows
    and tiled into a torus: ``[2 * STILL_HEIGHT, 2 * w, 3] uint8``, the frame beside its mirror
    image, above the two flipped upside down, so that wrapping around it shows no seam."""
    stills = []
    for name in SAMPLE_LAYOUT.values():
        with av.open(str(sample_clip(name))) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        for k in range(per_clip):
            frame = frames[(2 * k + 1) * len(frames) // (2 * per_clip)]
            width = round(frame.shape[1] * STILL_HEIGHT / frame.shape[0])
            frame = cv2.resize(frame, (width, STILL_HEIGHT), interpolation=cv2.INTER_AREA)
            row = np.concatenate([frame, frame[:, ::-1]], axis=1)
            stills.append(np.concatenate([row, row[::-1]], axis=0))
    return stills


def sliding_window(torus: np.ndarray, motion: tuple[int, int], frames: int, rng: np.random.Generator) -> list[np.ndarray]:
    """``frames`` ``[HEIGHT, WIDTH, 3] uint8`` windows of ``torus``, the first at a uniform random
    position, moving so that the content moves by ``motion`` (dy, dx) whole pixels a frame:
    every frame is an exact crop (no resampling blur that would tell the speed)."""
    dy, dx = motion
    top, left = rng.integers(0, torus.shape[0]), rng.integers(0, torus.shape[1])
    return [np.take(np.take(torus, np.arange(HEIGHT) + top - dy * t, axis=0, mode="wrap"),
                    np.arange(WIDTH) + left - dx * t, axis=1, mode="wrap") for t in range(frames)]


def write_video(path: Path, frames: list[np.ndarray]) -> None:
    """Lossless H.264 (``qp=0``; yuv420p, so chroma is subsampled) at 25 fps, extract's rate (no
    resampling): no codec artefact depends on the motion, and the frames decode to the same
    pixels in every run (x264's lossy output is not bit-reproducible here; its lossless output
    decodes the same whatever its bitstream)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25, options={"qp": "0"})
        stream.height, stream.width, stream.pix_fmt = HEIGHT, WIDTH, "yuv420p"
        for image in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())


def make_videos(src: Path, stills_per_clip: int, per_class: dict[str, int], frames: int, seed: int) -> dict[str, int]:
    """``src/<split>/<class>/<split>_<class>_<k>.mp4``: ``per_class[split]`` videos per class and
    split. Of each clip's stills the last third (at least one) is validation's, the rest
    training's; a split's videos cycle through its stills, so each class gets the same ones.
    Returns the videos per split."""
    stills = sample_stills(stills_per_clip)
    held_out = max(1, stills_per_clip // 3)
    split_of = ["val" if i % stills_per_clip >= stills_per_clip - held_out else "train" for i in range(len(stills))]
    rng = np.random.default_rng(seed)
    counts = {}
    for split, count in per_class.items():
        mine = [still for still, s in zip(stills, split_of) if s == split]
        for label, motion in MOTIONS.items():
            for k in range(count):
                write_video(src / split / label / f"{split}_{label}_{k:03d}.mp4",
                            sliding_window(mine[k % len(mine)], motion, frames, rng))
        counts[split] = count * len(MOTIONS)
    return counts


class Steps:
    """Runs the commands, one subprocess each, with stdout and stderr in ``logs/<name>.log``,
    and keeps each one's wall time."""

    def __init__(self, work: Path):
        self.logs = work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.seconds: dict[str, float] = {}
        # The network's module, for every command that builds it.
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))}

    def __call__(self, name: str, *command) -> dict | None:
        """Run ``command``; the JSON object on its last stdout line, if it has one. A failed
        command stops the benchmark with its log's tail."""
        log = self.logs / f"{name}.log"
        start = time.perf_counter()
        with open(log, "w") as f:
            done = subprocess.run([sys.executable, *map(str, command)], stdout=subprocess.PIPE, stderr=f, text=True,
                                  env=self.env, cwd=HERE.parent)
            f.write(done.stdout)
        self.seconds[name] = time.perf_counter() - start
        if done.returncode:
            tail = "\n".join(log.read_text().splitlines()[-15:])
            raise SystemExit(f"{name} failed with exit status {done.returncode} ({log}):\n{tail}")
        lines = done.stdout.strip().splitlines()
        try:
            return json.loads(lines[-1]) if lines else None
        except json.JSONDecodeError:
            return None


def view_agreement(shards: Path, epochs: int = 4) -> dict[str, float]:
    """The fraction of the student's training items whose stored teacher logits pick the item's
    label (after the flip swap), unflipped and flipped views apart, over ``epochs`` epochs of
    ClipDataset's draws: the teacher's own accuracy on those views when every view's target is
    the teacher's output on exactly that (mirrored) clip. A flipped view whose target came from
    flow with x not negated, or from another view, drops the flipped figure towards the share of
    up/down classes (a half)."""
    dataset = ClipDataset(shards, ("rgb",), clip_len=CLIP_LEN, crop=CROP, split="train", teacher=TEACHER, flip_swap=FLIP_PAIRS)
    names = {False: "unflipped", True: "flipped"}
    hits, counts = dict.fromkeys(names.values(), 0), dict.fromkeys(names.values(), 0)
    for epoch in range(epochs):
        for index in range(len(dataset)):
            item = dataset[(index, epoch)]
            counts[names[item["flip"]]] += 1
            hits[names[item["flip"]]] += int(item["teacher_logits"].argmax()) == item["label"]
    return {name: hits[name] / max(counts[name], 1) for name in names.values()}


def epochs_for(steps: int, videos: int) -> int:
    """Epochs that make at least ``steps`` steps of BATCH clips over ``videos`` items (one a video)."""
    return max(1, math.ceil(steps / math.ceil(videos / BATCH)))


def spread(values: list[float]) -> str:
    """``mean (v1, v2, ...)`` for the table."""
    text = f"{fmean(values):.3f}"
    return text if len(values) == 1 else f"{text} ({', '.join(f'{v:.3f}' for v in values)})"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, help="keep everything in this folder (new or empty; default: a temporary one)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: a training and a validation video a class, "
                        "8 frames, 2 steps each, one seed, cheap TV-L1")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="student seeds (each: a CE and a D3D run)")
    parser.add_argument("--stills", type=int, default=6, help="stills per sample clip (a third of them for validation)")
    parser.add_argument("--train-videos", type=int, default=12, help="training videos per class")
    parser.add_argument("--val-videos", type=int, default=6, help="validation videos per class")
    parser.add_argument("--frames", type=int, default=12, help="frames per video")
    parser.add_argument("--teacher-steps", type=int, default=200)
    parser.add_argument("--student-steps", type=int, default=500)
    parser.add_argument("--probe-steps", type=int, default=200)
    parser.add_argument("--distill-weight", type=float, default=1.0, help="λ of the D3D students")
    parser.add_argument("--flow-params", default="", help="TV-L1 parameters for extract (default: OpenCV's)")
    parser.add_argument("--json", default="benchmarks/results/d3d_mini.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.stills, args.train_videos, args.val_videos, args.frames = args.seeds[:1], 3, 1, 1, 8
        args.teacher_steps = args.student_steps = args.probe_steps = 2
        args.flow_params = args.flow_params or CHEAP_TVL1

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="d3d-mini-") as tmp:
        work = args.work.resolve() if args.work else Path(tmp)
        if work.exists() and any(work.iterdir()):
            parser.error(f"--work {work} is not empty")
        src, out, runs, evals = work / "src", work / "shards", work / "runs", work / "evals"
        videos = make_videos(src, args.stills, {"train": args.train_videos, "val": args.val_videos}, args.frames, seed=0)
        step = Steps(work)
        step.seconds["videos"] = time.perf_counter() - started

        step("extract", "-m", "flowprep.cli", "extract", "--src", src, "--out", out, "--short-side", HEIGHT,
             "--flow-params", args.flow_params, "--workers", 0, "--no-progress")
        common = ["--shards", out, "--model", MODEL, "--batch-size", BATCH, "--clip-len", CLIP_LEN, "--crop", CROP,
                  "--lr", LR, "--flip-swap", ",".join(f"{a}:{b}" for a, b in FLIP_PAIRS), "--num-workers", 0, "--device", "cpu"]
        step("train_teacher", PIPELINES / "train_teacher.py", *common, "--out", runs / "teacher",
             "--epochs", epochs_for(args.teacher_steps, videos["train"]))
        step("teacher_targets", "-m", "flowprep.cli", "teacher", "--shards", out, "--name", TEACHER, "--model", MODEL,
             "--checkpoint", runs / "teacher" / "checkpoint.pt", "--clip-len", CLIP_LEN, "--crop", CROP,
             "--window-stride", 4, "--crops", 3, "--flip", "--workers", 0, "--device", "cpu", "--no-progress")

        def evaluate(name: str) -> float:
            return step(f"evaluate_{name}", PIPELINES / "evaluate.py", "--shards", out, "--checkpoint", runs / name / "checkpoint.pt",
                        "--model", MODEL, "--split", "val", "--clips", 2, "--crops", 1, "--clip-len", CLIP_LEN, "--crop", CROP,
                        "--batch-size", 32, "--num-workers", 0, "--device", "cpu", "--out", evals / name)["top1"]

        def probe(name: str) -> dict:
            return step(f"probe_{name}", PIPELINES / "probe_motion.py", "--shards", out, "--checkpoint", runs / name / "checkpoint.pt",
                        "--model", MODEL, "--layer", PROBE_LAYER, "--decoder", "simple", "--out", runs / f"probe_{name}",
                        "--max-steps", args.probe_steps, "--batch-size", BATCH, "--clip-len", CLIP_LEN, "--crop", CROP,
                        "--device", "cpu")

        start = time.perf_counter()
        agreement = view_agreement(out)
        step.seconds["view_agreement"] = time.perf_counter() - start
        teacher_top1, teacher_probe = evaluate("teacher"), probe("teacher")
        per_seed = []
        for seed in args.seeds:
            result = {"seed": seed}
            for kind, weight in (("ce", 0.0), ("d3d", args.distill_weight)):
                name = f"student_{kind}_seed{seed}"
                step(f"train_{name}", PIPELINES / "train_d3d.py", *common, "--out", runs / name, "--teacher", TEACHER,
                     "--distill-weight", weight, "--seed", seed, "--epochs", epochs_for(args.student_steps, videos["train"]))
                result[f"{kind}_top1"] = evaluate(name)
                probed = probe(name)
                result[f"probe_epe_{kind}"], result[f"probe_epe_zeros_{kind}"] = probed["epe"], probed["epe_zeros"]
            per_seed.append(result)
        seconds = time.perf_counter() - started

    def column(key: str) -> list[float]:
        return [r[key] for r in per_seed]

    summary = {
        "teacher_top1": teacher_top1,
        "student_ce_top1": fmean(column("ce_top1")),
        "student_d3d_top1": fmean(column("d3d_top1")),
        "probe_epe_ce": fmean(column("probe_epe_ce")),
        "probe_epe_d3d": fmean(column("probe_epe_d3d")),
        # The same held-out clips for every probe: one all-zeros error.
        "probe_epe_zeros": fmean(column("probe_epe_zeros_ce")),
        # The flow network's features: how low the probe gets where the input is the motion.
        "probe_epe_teacher": teacher_probe["epe"],
        "teacher_view_agreement": agreement,
        "chance": 1 / len(MOTIONS),
        "seeds": args.seeds,
        "per_seed": per_seed,
        "videos": videos,
        "seconds": seconds,
    }
    print(f"{len(MOTIONS)} motion classes ({', '.join(MOTIONS)}); {videos['train']} training and {videos['val']} validation "
          f"videos of {args.frames} frames {HEIGHT}x{WIDTH}; clips {CLIP_LEN}x{CROP}x{CROP}; teacher {args.teacher_steps} steps, "
          f"students {args.student_steps} steps (λ = {args.distill_weight} for D3D), seeds {args.seeds}; "
          f"probe {PROBE_LAYER}, simple decoder, {args.probe_steps} steps")
    print(f"| {'':34} | {'top-1, val':24} | {'probe EPE, px/frame':24} |")
    print(f"| {'flow teacher':34} | {teacher_top1:<24.3f} | {teacher_probe['epe']:<24.3f} |")
    print(f"| {'RGB student, cross-entropy':34} | {spread(column('ce_top1')):24} | {spread(column('probe_epe_ce')):24} |")
    print(f"| {'RGB student, D3D':34} | {spread(column('d3d_top1')):24} | {spread(column('probe_epe_d3d')):24} |")
    print(f"| {'all-zeros flow':34} | {'':24} | {summary['probe_epe_zeros']:<24.3f} |")
    print(f"| {'chance':34} | {summary['chance']:<24.3f} | {'':24} |")
    print(f"stored teacher views: the logits pick the item's label on {agreement['unflipped']:.3f} of the unflipped "
          f"and {agreement['flipped']:.3f} of the flipped training views")
    print("seconds: " + ", ".join(f"{name} {s:.0f}" for name, s in step.seconds.items()) + f"; total {seconds:.0f}")
    write_results(args.json, {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                              "seconds_per_step": step.seconds, **summary})
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    run_and_exit(main)  # after reading Arrow shards (view_agreement): see flowprep.process
