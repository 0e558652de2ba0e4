"""Student training steps/s with the real ClipDataset against the same loop on in-memory tensors.

The D3D student's loop (``pipelines/train_d3d.py``'s step: RGB network, CE + λ·MSE to the stored
teacher logits, SGD) is run twice in one process:

* baseline: the same batches, already in memory (uint8 RGB, labels, teacher logits), so the
  step never waits;
* ``ClipDataset(rgb, teacher=NAME, normalize=False)`` through a DataLoader with ``--workers``
  processes: what a real run reads (JPEG decode, crop, flip, target lookup).

The network is deliberately tiny (a strided 3D convolution and a linear layer), so the step
costs little and the data wait shows what the reader can feed: the ratio and the data-wait
fraction (time waiting for the DataLoader / step time) say how many reader cores a student
step of a given cost needs. Clips: 64 frames at 224x224 from the sample clips at short side 256.

    python benchmarks/train.py [--steps 30 --batch-size 4 --workers 0 2 --repeat 3]
    # on a GPU machine, the real student:
    python benchmarks/train.py --model s3dg --device cuda --batch-size 8 --workers 4 8 16
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from flowprep import ClipDataset, ClipSampler
from flowprep.extract import extract
from flowprep.pipeline import ExtractConfig
from flowprep.samples import make_sample_folder
from flowprep.networks import build_model
from flowprep.teacher.run import TeacherConfig, compute_targets
from flowprep.teacher.views import ViewGrid
from flowprep.train import to_device
from results import write_results

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pipelines"))
from train_d3d import Student, distill_step  # noqa: E402

CHEAP_TVL1 = {"nscales": 1, "warps": 1, "outer_iterations": 1, "inner_iterations": 5, "median_filtering": 1}
T, CROP = 64, 224


def tiny(in_channels: int, num_classes: int) -> nn.Module:
    """A network that costs almost nothing: one strided 3D convolution, global pooling, a linear layer."""
    return nn.Sequential(nn.Conv3d(in_channels, 16, (3, 7, 7), stride=(2, 4, 4)), nn.ReLU(),
                         nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(16, num_classes))


def run_steps(student: nn.Module, batches, steps: int, device: torch.device) -> tuple[float, float]:
    """Seconds for ``steps`` training steps over ``batches``, and the fraction spent waiting for them."""
    optimizer = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9)
    wait, it = 0.0, iter(batches)
    start = ready = time.perf_counter()
    for _ in range(steps):
        batch = next(it)
        wait += time.perf_counter() - ready
        result = distill_step(student, to_device(batch, device), 1.0, "logits")
        optimizer.zero_grad()
        result.loss.mean().backward()
        optimizer.step()
        result.loss.sum().item()  # the device finishes the step before the next wait starts
        ready = time.perf_counter()
    seconds = time.perf_counter() - start
    return seconds, wait / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="__main__:tiny", help="the student network (default: the tiny one)")
    parser.add_argument("--copies", type=int, default=4, help="copies of the three sample clips")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader workers to measure")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", default="benchmarks/results/train.json")
    args = parser.parse_args()
    device = torch.device(args.device)

    with tempfile.TemporaryDirectory(prefix="flowprep-bench-") as tmp:
        tmp = Path(tmp)
        make_sample_folder(tmp / "src", copies=args.copies)
        out = tmp / "out"
        extract(tmp / "src", out, ExtractConfig(short_side=256, max_frames=96, flow_params=CHEAP_TVL1), workers=0, progress=False)
        torch.manual_seed(0)
        torch.save(tiny(2, 3).state_dict(), tmp / "teacher.pt")
        compute_targets(out, "bench", TeacherConfig("__main__:tiny", str(tmp / "teacher.pt"), ViewGrid(clip_len=T, crop=CROP),
                                                        num_classes=3),
                        workers=0, progress=False)
        dataset = ClipDataset(out, ("rgb",), clip_len=T, crop=CROP, teacher="bench", normalize=False)
        if len(dataset) < args.batch_size:
            raise SystemExit(f"{len(dataset)} videos make no batch of {args.batch_size}: raise --copies")
        student = Student(build_model(args.model, 3, 3).to(device), "logits")

        def loader(workers: int):
            sampler = ClipSampler(dataset, num_replicas=1, rank=0)
            # An endless stream: the sampler's epoch advances whenever the few sample videos run out.
            def batches():
                epoch = 0
                while True:
                    sampler.set_epoch(epoch)
                    yield from DataLoader(dataset, args.batch_size, sampler=sampler, num_workers=workers, drop_last=True)
                    epoch += 1
            return batches()

        in_memory = [b for b, _ in zip(loader(0), range(4))]
        results: dict[str, dict[str, list[float]]] = {"in memory": {"seconds": [], "wait": []}}
        results.update({f"ClipDataset, {w} workers": {"seconds": [], "wait": []} for w in args.workers})
        run_steps(student, iter(in_memory * 2), 2, device)  # warm-up
        for _ in range(args.repeat):
            for name, batches in [("in memory", (in_memory[i % len(in_memory)] for i in range(args.steps)))] + \
                    [(f"ClipDataset, {w} workers", loader(w)) for w in args.workers]:
                seconds, wait = run_steps(student, batches, args.steps, device)
                results[name]["seconds"].append(seconds)
                results[name]["wait"].append(wait)

    base = statistics.median(results["in memory"]["seconds"])
    print(f"{args.steps} steps of {args.batch_size} clips ({T}x{CROP}x{CROP} RGB + teacher logits), student {args.model} "
          f"on {args.device}; medians of {args.repeat}")
    print(f"| {'':28} | steps/s | clips/s | ratio | data wait |")
    summary = {}
    for name, r in results.items():
        seconds, wait = statistics.median(r["seconds"]), statistics.median(r["wait"])
        summary[name] = {"steps_per_s": args.steps / seconds, "clips_per_s": args.steps * args.batch_size / seconds,
                         "ratio": base / seconds, "data_wait": wait}
        s = summary[name]
        print(f"| {name:28} | {s['steps_per_s']:7.2f} | {s['clips_per_s']:7.2f} | {s['ratio']:5.3f} | {wait:9.3f} |")
    write_results(args.json, {"args": vars(args), "runs": results, "summary": summary})


if __name__ == "__main__":
    main()
