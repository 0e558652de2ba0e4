"""``flowprep teacher`` views/s against a bare loop running the same model on the same batches in memory.

In one run, on the sample clips (bikes.mp4, bigbuckbunny.mp4, carphone) extracted at short side
256 with a cheap TV-L1 setting (stored sizes are those of real flow, which is what reading costs):

* baseline: every view's input tensor built beforehand, then ``model`` over batches of
  ``--batch-size``, torch on every core: the model alone;
* ``compute_targets`` on Ray (one single-threaded model actor per core, a reader actor), timed
  from the first item to the last shard written and as the whole call (Ray start-up included);
* ``compute_targets`` in this process (``--workers 0``: reading and the model take turns).

The ratio to the baseline shows how far reading, cropping and writing starve the model. Also
prints the bytes per video of target shards for a Kinetics-like video (250 frames, 256x340, the
default grid: 12 starts x 3 crops x 2 flips), measured by writing one with the real writer.

    python benchmarks/teacher.py [--model s3dg --clip-len 16 --crop 224 --frames 64 --repeat 3]
    # on a GPU machine:
    python benchmarks/teacher.py --device cuda --clip-len 64 --frames 250 --copies 8 --batch-size 32
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from flowprep.extract import extract
from flowprep.networks import build_model
from flowprep.pipeline import ExtractConfig
from flowprep.samples import make_sample_folder
from flowprep.shards import ShardReader
from flowprep.shards.layout import complete_shards
from flowprep.storage import storage
from flowprep.teacher.items import plan_items, read_windows, views_per_item
from flowprep.teacher.model import TeacherConfig, TeacherModel
from flowprep.teacher.run import compute_targets
from flowprep.teacher.targets import target_schema, write_target_shard
from flowprep.teacher.views import ViewGrid
from results import write_results

CHEAP_TVL1 = {"nscales": 1, "warps": 1, "outer_iterations": 1, "inner_iterations": 5, "median_filtering": 1}


def bare_loop(model: TeacherModel, batches: list[torch.Tensor]) -> float:
    """Seconds for the model alone over ``batches`` already in memory."""
    start = time.perf_counter()
    for batch in batches:
        model.forward(batch)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def in_memory_batches(out: Path, config: TeacherConfig, model: TeacherModel) -> list[torch.Tensor]:
    reader = ShardReader(out)
    inputs = []
    for item in plan_items(reader, complete_shards(out), config.grid, views_per_item(config.batch_size)):
        for w in read_windows(reader, item, config.grid):
            frames = torch.from_numpy(w.frames).to(model.device)
            inputs += [model.clip(frames, w.rows[v], view) for v, view in enumerate(w.segment.views)]
    return [torch.stack(inputs[b : b + config.batch_size]) for b in range(0, len(inputs), config.batch_size)]


def storage_per_video(outputs: dict[str, int], folder: Path) -> int:
    """Bytes of a target shard holding one 250-frame 256x340 video with the default grid."""
    grid = ViewGrid()
    views = [("kinetics_video_0000000", v) for v in grid.views(249, 256, 340)]
    values = {k: np.zeros((len(views), d), np.float16) for k, d in outputs.items()}
    rows = [{"video_id": views[0][0], "shard": "shards/shard-00000.arrow", "row": 0, "views": len(views),
             "positions": 249, "height": 256, "width": 340}]
    write_target_shard(storage(folder), "shards/shard-00000.arrow", views, values, target_schema(outputs), rows)
    return (folder / "shards/shard-00000.arrow").stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="s3dg")
    parser.add_argument("--clip-len", type=int, default=16)
    parser.add_argument("--crop", type=int, default=224)
    parser.add_argument("--frames", type=int, default=64, help="Frames per video (max_frames of the extract).")
    parser.add_argument("--copies", type=int, default=1, help="Copies of the three sample clips.")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", default="benchmarks/results/teacher.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="flowprep-bench-") as tmp:
        tmp = Path(tmp)
        make_sample_folder(tmp / "src", copies=args.copies)
        extract(tmp / "src", tmp / "out", ExtractConfig(short_side=256, max_frames=args.frames, flow_params=CHEAP_TVL1,
                                                        shard_size=1 << 20), workers=0, progress=False)
        torch.manual_seed(0)
        torch.save(build_model(args.model, 2, 400).state_dict(), tmp / "teacher.pt")
        grid = ViewGrid(clip_len=args.clip_len, crop=args.crop)
        config = TeacherConfig(args.model, str(tmp / "teacher.pt"), grid, batch_size=args.batch_size, device=args.device)
        torch.set_num_threads(os.cpu_count())
        model = TeacherModel(config, torch.load(tmp / "teacher.pt"), 400, 20.0, args.device)
        batches = in_memory_batches(tmp / "out", config, model)
        views = sum(len(b) for b in batches)
        bare_loop(model, batches[:1])  # warm-up
        runs: dict[str, list[float]] = {"baseline": [], "ray": [], "ray_call": [], "local": []}
        for r in range(args.repeat):
            runs["baseline"].append(bare_loop(model, batches))
            start = time.perf_counter()
            report = compute_targets(tmp / "out", f"ray{r}", config, progress=False)
            runs["ray_call"].append(time.perf_counter() - start)
            runs["ray"].append(report.seconds)
            assert report.views == views, (report.views, views)
            runs["local"].append(compute_targets(tmp / "out", f"local{r}", config, workers=0, progress=False).seconds)
        import ray

        ray.shutdown()
        storage = {name: storage_per_video(outputs, tmp / name) for name, outputs in
                   {"logits": {"logits": 400}, "logits+embedding": {"logits": 400, "embedding": 1024},
                    "logits+embedding+Mixed_4f": {"logits": 400, "embedding": 1024, "Mixed_4f": 832}}.items()}

    median = {k: statistics.median(v) for k, v in runs.items()}
    rate = {k: views / s for k, s in median.items()}
    print(f"{views} views ({args.model}, clip {args.clip_len}, crop {args.crop}, batch {args.batch_size}, {args.device}), "
          f"3 x {args.copies} videos of {args.frames} frames; medians of {args.repeat}")
    print(f"| {'':62} | views/s | ratio |")
    labels = {"baseline": "bare loop, batches in memory, torch on all cores",
              "ray": "flowprep teacher on Ray, after start-up",
              "ray_call": "flowprep teacher on Ray, whole call",
              "local": "flowprep teacher --workers 0 (in-process)"}
    for k, label in labels.items():
        print(f"| {label:62} | {rate[k]:7.2f} | {rate[k] / rate['baseline']:5.3f} |")
    print("target shard bytes per 250-frame video (72 views):")
    for name, size in storage.items():
        print(f"| {name:30} | {size:9,d} B | {size / 72:7.0f} B/view |")
    write_results(args.json, {"args": vars(args), "views": views, "seconds": runs, "views_per_second": rate,
                              "ratio": {k: rate[k] / rate["baseline"] for k in rate}, "bytes_per_video": storage})


if __name__ == "__main__":
    main()
