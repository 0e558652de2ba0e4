"""``flowprep extract`` throughput against the bare OpenCV TV-L1 solver, and bytes per video.

In one run, on the same frames (real clips decoded at ``--short-side``):

1. baseline: cv2 DualTVL1 on every frame pair, one single-threaded process per core
   (multiprocessing), frames already decoded: the solver alone;
2. flowprep extract (local Ray, one flow worker per core) from the video files: decode, flow,
   encode, write, index;
3. bytes per video of the Arrow and HDF5 shards against a denseflow-style folder of JPEG files
   (img_/flow_x_/flow_y_ per frame, quality 95).

Run:  python benchmarks/extract.py [--short-side 256] [--frames 24] [--copies 2] [--repeat 3]
Writes benchmarks/results/extract.json. Ratio = pipeline pairs/s / baseline pairs/s (goal >= 0.9).

With ``--flow none``, the pipeline's own ceiling instead (decode, JPEG, write; no solver), on a
local two-node Ray cluster (``ray start`` on 127.0.0.2 and .3, one CPU each): frames/s per core
and this process's (the driver's) CPU time, with every shard written by the driver
(``--writers driver``, the old single writer) against shards written by tasks on the nodes
(``--writers workers``), and one process without Ray (``--workers 0``) as the baseline.
Writes benchmarks/results/extract_none.json.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2
import pyarrow as pa

from flowprep import ShardReader
from flowprep.bench import opencv_flow, opencv_pool
from flowprep.decode import SourceInfo, VideoDecoder
from flowprep.export import export_rawframes
from flowprep.extract import extend_index, extract
from flowprep.pipeline import ExtractConfig, VideoChunk
from flowprep.samples import make_sample_folder
from flowprep.cli import parse_size
from flowprep.shards.writer import commit_shard, write_shard
from flowprep.shards.layout import INDEX_SCHEMA, complete_shards
from flowprep.shards.plan import ShardPlan
from flowprep.sources import VideoSpec
from flowprep.storage import storage
from results import write_results

def bare_solver(pairs: list, processes: int) -> float:
    """Seconds for the bare solver on ``pairs`` with ``processes`` single-threaded processes."""
    with opencv_pool(processes, pairs) as pool:
        t0 = time.perf_counter()
        pool.map(opencv_flow, pairs, chunksize=1)
        return time.perf_counter() - t0


def denseflow_folder_bytes(out: Path, dest: Path) -> tuple[int, int, int]:
    """Export ``out`` to the JPEG-per-frame layout (q95); returns (bytes, files, bytes on disk in 4 KiB blocks)."""
    export_rawframes(out, dest, quality=95)
    files = list(dest.rglob("*.jpg"))
    sizes = [p.stat().st_size for p in files]
    return sum(sizes), len(files), sum(-(-s // 4096) * 4096 for s in sizes)


def rewrite_as_hdf5(reader: ShardReader, out: Path, config: ExtractConfig) -> int:
    """Write the stored blobs of an Arrow output again as one HDF5 shard; returns its bytes."""
    hdf5 = ExtractConfig(**{**config.to_dict(), "format": "hdf5"})
    specs = [VideoSpec(v, reader.meta(v)["source"], reader.meta(v)["label"], reader.meta(v)["split"]) for v in reader.video_ids]
    (out / "shards").mkdir(parents=True)
    result = write_shard(out, ShardPlan(0, tuple(specs)), hdf5, reader.label_map, {},
                         ((spec, _chunks(reader, spec.video_id, config.chunk_frames)) for spec in specs))
    commit_shard(storage(out), result)
    return sum(p.stat().st_size for p in (out / "shards").glob("*.h5"))


def _chunks(reader: ShardReader, video_id: str, size: int):
    meta = reader.meta(video_id)
    n = meta["num_frames"]
    rgb = [bytes(b) for b in reader.blobs(video_id, "rgb", range(n))]
    flow = [bytes(b) for b in reader.blobs(video_id, "flow", range(n - 1))]
    source = SourceInfo(meta["source_codec"], meta["source_fps"], meta["source_duration"], meta["width"], meta["height"])
    for start in range(0, n, size):
        stop = min(start + size, n)
        yield VideoChunk(video_id, start, rgb[start:stop], None, meta["height"], meta["width"], source, stop == n, flow[start:stop])


def writers_run(src: Path, work: Path, args) -> None:
    """``--flow none``: the pipeline alone, single writer against writers on the nodes."""
    # The cluster runs with token authentication (Ray >= 2.60): Ray reads this when imported.
    os.environ["RAY_AUTH_MODE"] = "token"
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import RayCluster  # the two-node cluster the cluster tests run on

    import ray

    config = ExtractConfig(flow_backend="none", short_side=args.short_side, max_frames=args.frames, shard_size=parse_size(args.shard_size))
    cluster = RayCluster(work)
    rows = []
    try:
        cluster.start_node()
        # The process without Ray uses what CPU FFmpeg's threads take: its measured share counts as its cores.
        for mode, workers, writers, address, cores in (("one process, no Ray", 0, "driver", None, None),
                                                       ("Ray, driver writes every shard", 2, "driver", cluster.address, 2),
                                                       ("Ray, decoders on the nodes write", 2, "workers", cluster.address, 2)):
            walls, cpus = [], []
            for r in range(args.repeat):
                out = work / f"{writers}-{workers}-{r}"
                t0, c0 = time.perf_counter(), time.process_time()
                report = extract(src, out, config, workers=workers, writers=writers, ray_address=address, progress=False)
                walls.append(time.perf_counter() - t0)
                cpus.append(time.process_time() - c0)
                assert report.written == report.videos
                reference = work / "driver-0-0"  # every run writes the bytes of the first
                assert complete_shards(out) == complete_shards(reference)
                assert all((out / s).read_bytes() == (reference / s).read_bytes() for s in complete_shards(out))
            frames, wall, cpu = report.frames, statistics.median(walls), statistics.median(cpus)
            cores = cores or cpu / wall
            rows.append({"mode": mode, "writers": writers, "cores": cores, "frames": frames, "shards": len(complete_shards(out)),
                         "wall_s": walls, "driver_cpu_s": cpus, "frames_per_s": frames / wall, "frames_per_s_per_core": frames / wall / cores,
                         "driver_cores": cpu / wall, "driver_cpu_us_per_frame": cpu / frames * 1e6,
                         "stored_bytes_per_frame": report.bytes_written / frames})
    finally:
        ray.shutdown()
        cluster.stop()
    commit_s = kinetics_commit_seconds(work / "driver-0-0")
    base = rows[0]["frames_per_s_per_core"]
    print(f"\n{'':32} {'frames/s':>9} {'/core':>7} {'x 1 proc':>8} {'driver cores':>12} {'driver us/frame':>15}")
    for r in rows:
        print(f"{r['mode']:32} {r['frames_per_s']:9.1f} {r['frames_per_s_per_core']:7.1f} {r['frames_per_s_per_core'] / base:8.2f} "
              f"{r['driver_cores']:12.2f} {r['driver_cpu_us_per_frame']:15.0f}")
    print(f"stored bytes per frame (RGB only): {rows[0]['stored_bytes_per_frame']:.0f}")
    print(f"driver CPU to commit a shard of {KINETICS_SHARD} videos into an index of {KINETICS_VIDEOS} rows: {commit_s:.3f} s (median)")
    write_results(args.json.replace("extract.json", "extract_none.json"),
                  {"short_side": args.short_side, "frames_per_clip": args.frames, "videos": report.videos, "shard_size": args.shard_size,
                   "rows": rows, "kinetics_commit_cpu_s": commit_s})


KINETICS_VIDEOS, KINETICS_SHARD = 240_000, 70  # Kinetics-400; videos of ~15 MB in a 1 GiB shard


def kinetics_commit_seconds(out: Path, repeat: int = 5) -> float:
    """The driver's CPU seconds to commit the last shard of a Kinetics-400 run: its rows added to an
    index of ``KINETICS_VIDEOS`` rows (copies of ``out``'s), sorted and written (:func:`extend_index`)."""
    rows = ShardReader(out).meta(ShardReader(out).video_ids[0])
    index = pa.Table.from_pylist([{**rows, "video_id": f"v{i:06d}", "shard": f"shards/shard-{i // KINETICS_SHARD:05d}.arrow"}
                                  for i in range(KINETICS_VIDEOS - KINETICS_SHARD)], schema=INDEX_SCHEMA)
    last = [{**rows, "video_id": f"w{i:06d}", "shard": "shards/shard-99999.arrow"} for i in range(KINETICS_SHARD)]
    times = []
    for _ in range(repeat):
        c0 = time.process_time()
        extend_index(storage(out), index, last)
        times.append(time.process_time() - c0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--short-side", type=int, default=256)
    parser.add_argument("--frames", type=int, default=24, help="frames per clip")
    parser.add_argument("--copies", type=int, default=2, help="copies of each clip (more videos: the run's tail weighs less)")
    parser.add_argument("--repeat", type=int, default=1, help="measurements of each side; medians are reported")
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--flow", default="opencv", choices=["opencv", "none"], help="none: the pipeline without the solver (see above)")
    parser.add_argument("--shard-size", default="4MiB", help="with --flow none: several shards, for the writers to share")
    parser.add_argument("--json", default="benchmarks/results/extract.json")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="flowprep-bench-"))
    src = work / "src"
    targets = make_sample_folder(src, args.copies)
    if args.flow == "none":
        writers_run(src, work, args)
        shutil.rmtree(work)
        return
    pairs = []
    for path in targets:
        with VideoDecoder(str(path)) as video:
            gray = [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in video.frames(25, args.short_side, max_frames=args.frames)]
        pairs += list(zip(gray[:-1], gray[1:]))
    print(f"{len(pairs)} pairs from {len(targets)} videos at short side {args.short_side}, {args.workers} workers")

    baseline = [bare_solver(pairs, args.workers) for _ in range(args.repeat)]
    config = ExtractConfig(short_side=args.short_side, max_frames=args.frames)
    steady, wall = [], []
    for r in range(args.repeat):
        out = work / f"arrow{r}"
        t0 = time.perf_counter()
        report = extract(src, out, config, workers=args.workers, progress=False)
        wall.append(time.perf_counter() - t0)
        steady.append(report.seconds)
        assert report.written == len(targets) and report.flow_pairs == len(pairs)
    import ray

    ray.shutdown()

    reader = ShardReader(work / "arrow0")
    videos = len(reader.video_ids)
    arrow_bytes = sum(p.stat().st_size for p in (work / "arrow0" / "shards").glob("*.arrow"))
    hdf5_bytes = rewrite_as_hdf5(reader, work / "hdf5", config)
    jpeg_bytes, jpeg_files, jpeg_disk = denseflow_folder_bytes(work / "arrow0", work / "jpeg")

    base_rate = len(pairs) / statistics.median(baseline)
    steady_rate, wall_rate = len(pairs) / statistics.median(steady), len(pairs) / statistics.median(wall)
    results = {
        "pairs": len(pairs), "videos": len(targets), "short_side": args.short_side, "frames_per_clip": args.frames, "workers": args.workers,
        "frame_sizes": {v: [reader.meta(v)["height"], reader.meta(v)["width"]] for v in reader.video_ids},
        "baseline_seconds": baseline, "extract_seconds": steady, "extract_wall_seconds": wall,
        "baseline_pairs_per_s": base_rate, "extract_pairs_per_s": steady_rate, "extract_wall_pairs_per_s": wall_rate,
        "ratio": steady_rate / base_rate, "ratio_wall": wall_rate / base_rate,
        "bytes_per_video": {"arrow": arrow_bytes / videos, "hdf5": hdf5_bytes / videos, "jpeg_folder": jpeg_bytes / videos,
                            "jpeg_folder_on_disk": jpeg_disk / videos},
        "files_per_video": {"arrow": "shared", "hdf5": "shared", "jpeg_folder": jpeg_files / videos},
    }
    print(f"\n{'':34} {'pairs/s':>9} {'ratio':>7}")
    print(f"{'bare cv2 TV-L1, ' + str(args.workers) + ' processes':34} {base_rate:9.3f} {1:7.3f}")
    print(f"{'flowprep extract (after start-up)':34} {steady_rate:9.3f} {results['ratio']:7.3f}")
    print(f"{'flowprep extract (whole call)':34} {wall_rate:9.3f} {results['ratio_wall']:7.3f}")
    print(f"\n{'bytes per video':34} {'bytes':>12} {'x jpeg':>7}")
    for name, size in results["bytes_per_video"].items():
        print(f"{name:34} {size:12.0f} {size / results['bytes_per_video']['jpeg_folder']:7.3f}")
    print(f"JPEG folder: {jpeg_files / videos:.0f} files per video")
    write_results(args.json, results)
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
