"""How well ``flowprep extract --dry-run`` predicts the run: estimate against the real extraction.

For each run shape (``--workers 0``: decoding and flow in one process; ``ray``: a local Ray with
the default workers), on the embedded sample clips (bikes.mp4, bigbuckbunny.mp4, carphone;
``--copies`` of each), the dry run's prediction (:func:`flowprep.estimate.estimate_run`, which
writes nothing) is compared with the extraction it predicts, run right after into a fresh folder
with the same arguments:

* bytes: ``estimated_bytes`` against the shard files written (RGB and flow; the index and
  ``dataset.json`` are a few KB and not predicted);
* time: ``estimated_seconds`` against the extraction's wall time. For ``ray`` the estimate leaves
  out Ray's start-up (it says so), so the table shows the wall time with and without it (the
  seconds until Ray answered, measured in the same call).

The issue's bounds are within 2x for bytes and 3x for time. Prints a table, writes JSON.

    python benchmarks/estimate.py                        # both shapes, short side 128, 50 frames
    python benchmarks/estimate.py --short-side 256 --max-frames 0 --shapes in-process
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import ray
from results import write_results

from flowprep.estimate import estimate_run
from flowprep.extract import extract
from flowprep.pipeline import ExtractConfig
from flowprep.samples import make_sample_folder
from flowprep.shards.layout import complete_shards

SHAPES = {"in-process": 0, "ray": None}  # --workers of each


def shard_bytes(out: Path) -> int:
    """Bytes of the complete shard files under ``out``."""
    return sum((out / name).stat().st_size for name in complete_shards(out))


def measure(src: Path, work: Path, config: ExtractConfig, shape: str) -> dict:
    workers = SHAPES[shape]
    out = work / f"out-{shape}"
    estimate = estimate_run(src, out, config, workers=workers)
    assert not out.exists(), "the dry run wrote its output folder"
    start = time.perf_counter()
    report = extract(src, out, config, workers=workers, progress=False)
    wall = time.perf_counter() - start
    ray_start = 0.0
    if workers is None:  # what Ray's start-up took: a fresh local Ray, up to its first task
        ray.shutdown()
        begin = time.perf_counter()
        ray.init(num_cpus=estimate.shape.cores, include_dashboard=False, logging_level="ERROR")
        ray.get(ray.remote(lambda: None).remote())
        ray_start = time.perf_counter() - begin
        ray.shutdown()
    real_bytes = shard_bytes(out)
    return {
        "shape": shape, "videos": estimate.videos, "shards": estimate.shards, "real_shards": len(complete_shards(out)),
        "flow_pairs": estimate.flow_pairs, "failed": report.failed,
        "estimated_bytes": estimate.estimated_bytes, "real_bytes": real_bytes,
        "bytes_ratio": estimate.estimated_bytes / real_bytes,
        "estimated_seconds": estimate.estimated_seconds, "real_seconds": wall, "ray_start_seconds": ray_start,
        "seconds_ratio": estimate.estimated_seconds / wall,
        "seconds_ratio_without_ray_start": estimate.estimated_seconds / max(1e-9, wall - ray_start),
        "dry_run_seconds": estimate.planning_seconds + estimate.calibration.seconds,
        "workers": estimate.shape.flow_workers, "decoders": estimate.shape.decoders,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="in-process,ray", help=f"comma-separated, of {', '.join(SHAPES)}")
    parser.add_argument("--short-side", type=int, default=128)
    parser.add_argument("--max-frames", type=int, default=50, help="frames per video (0: whole videos)")
    parser.add_argument("--copies", type=int, default=1, help="copies of each sample clip")
    parser.add_argument("--json", default="benchmarks/results/estimate.json")
    args = parser.parse_args()
    config = ExtractConfig(short_side=args.short_side, max_frames=args.max_frames or None)
    rows = []
    with tempfile.TemporaryDirectory(prefix="flowprep-estimate-") as tmp:
        work = Path(tmp)
        make_sample_folder(work / "src", copies=args.copies)
        for shape in args.shapes.split(","):
            rows.append(measure(work / "src", work, config, shape))
    print(f"\nshort side {args.short_side}, {args.max_frames or 'all'} frames a video, {args.copies} copies of the 3 sample clips")
    print("| run | videos | shards (est/real) | bytes est | bytes real | ratio | seconds est | seconds real | ratio | real less Ray start | ratio |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['shape']} | {r['videos']} | {r['shards']}/{r['real_shards']} | {r['estimated_bytes'] / 1e6:.2f} MB | "
              f"{r['real_bytes'] / 1e6:.2f} MB | {r['bytes_ratio']:.2f} | {r['estimated_seconds']:.1f} | {r['real_seconds']:.1f} | "
              f"{r['seconds_ratio']:.2f} | {r['real_seconds'] - r['ray_start_seconds']:.1f} | {r['seconds_ratio_without_ray_start']:.2f} |")
    write_results(args.json, {"short_side": args.short_side, "max_frames": args.max_frames, "copies": args.copies, "runs": rows})


if __name__ == "__main__":
    main()
