"""ClipDataset throughput by RGB codec, against a rawframes JPEG folder (mmaction2's way).

In one run, 64-frame 224x224 training clips (random start, crop and flip) from the same videos
(bikes.mp4, bigbuckbunny.mp4, carphone at short side 256):

1. RGB codecs: the same videos extracted RGB-only (``--flow none``) with each ``--rgb-codec``
   (jpeg:95; jpeg-rst:95, the default, whose crops decode only their MCUs; yuv420:lz4,
   yuv420:zstd:3 and yuv420:raw, which unpack and convert only the crop's tiles; raw RGB), read
   by ClipDataset as uint8 (``normalize=False``, normalized later on the GPU) and float32, beside
   stored RGB bytes per frame; also the CPU's share of ``decode="gpu"`` (cutting each frame's
   JPEG to the crop's MCUs; nvJPEG's decoding is not in it); baseline (a): the same clips from an exported rawframes folder
   (JPEG q95 files) read with cv2.imread (mmaction2's RawframeDataset path), uint8 and float32 too.
2. Formats and flow, at the default codec: Arrow and HDF5 shards, rgb-only and rgb+flow, against
   (a), and (b) rgb decoded from the source mp4 with PyAV on the fly (seek, decode, resize, crop).

each with DataLoader num_workers 0 (one core) and 2. Run:

    python benchmarks/reader.py [--clips 24] [--json benchmarks/results/reader.json]

clips/s/core divides by the cores used (1, or the workers); pixel MB/s counts the clip's pixels as
uint8 (T x 224 x 224 x 3, + 2 channels of flow).

The shards are made with a cheap TV-L1 setting (1 scale, 1 warp) so that the set-up takes seconds;
the stored sizes are those of real flow, which is what reading costs depend on.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import av
import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from flowprep import ClipDataset, ShardReader
from flowprep.decode import resize_short_side
from flowprep.export import export_rawframes
from flowprep.extract import extract
from flowprep.pipeline import ExtractConfig
from flowprep.samples import make_sample_folder
from results import write_results

CHEAP_TVL1 = {"nscales": 1, "warps": 1, "outer_iterations": 1, "inner_iterations": 5, "median_filtering": 1}
T, CROP = 64, 224


class _Clips(Dataset):
    """Random (video, start, crop, flip) per item, as ClipDataset draws them; subclasses read frames."""

    def __init__(self, reader: ShardReader, with_flow: bool, normalize: bool = True, seed: int = 0):
        self.videos = reader.video_ids
        self.meta = {v: reader.meta(v) for v in self.videos}
        self.with_flow, self.normalize, self.seed = with_flow, normalize, seed

    def __len__(self) -> int:
        return len(self.videos)

    def draw(self, key: tuple[int, int]) -> tuple[str, int, int, int, bool]:
        index, epoch = key
        rng = np.random.default_rng([self.seed, epoch, index])
        video = self.videos[index]
        meta = self.meta[video]
        start = int(rng.integers(0, meta["num_frames"] - 1 - T + 1))
        y, x = int(rng.integers(0, meta["height"] - CROP + 1)), int(rng.integers(0, meta["width"] - CROP + 1))
        return video, start, y, x, bool(rng.integers(0, 2))

    def finish(self, rgb: np.ndarray, flow: np.ndarray | None, flip: bool) -> dict:
        if flip:
            rgb = rgb[:, :, ::-1]
        planar = np.ascontiguousarray(rgb.transpose(3, 0, 1, 2))
        item = {"rgb": torch.from_numpy(planar.astype(np.float32) / 127.5 - 1 if self.normalize else planar)}
        if flow is not None:
            if flip:
                flow = flow[:, :, ::-1] * np.array([-1, 1], np.float32)
            item["flow"] = torch.from_numpy(np.ascontiguousarray(flow.transpose(3, 0, 1, 2)))
        return item


class RawframesClips(_Clips):
    """mmaction2's RawframeDataset path: one cv2.imread per frame (and two per flow)."""

    def __init__(self, reader, with_flow, root: Path, normalize: bool = True):
        super().__init__(reader, with_flow, normalize)
        self.root = root

    def __getitem__(self, key: tuple[int, int]) -> dict:
        video, start, y, x, flip = self.draw(key)
        folder = self.root / video
        crop = (slice(y, y + CROP), slice(x, x + CROP))
        rgb = np.stack([cv2.cvtColor(cv2.imread(str(folder / f"img_{i + 1:05d}.jpg")), cv2.COLOR_BGR2RGB)[crop] for i in range(start, start + T)])
        flow = None
        if self.with_flow:
            flow = np.stack([np.stack([cv2.imread(str(folder / f"flow_{c}_{i + 1:05d}.jpg"), cv2.IMREAD_GRAYSCALE)[crop] for c in "xy"], -1)
                             for i in range(start, start + T)]).astype(np.float32) / 127.5 - 1
        return self.finish(rgb, flow, flip)


class DecodeClips(_Clips):
    """RGB decoded from the source video on the fly: seek to the clip, decode, resize, crop."""

    def __init__(self, reader, sources: dict[str, str]):
        super().__init__(reader, with_flow=False)
        self.sources = sources

    def __getitem__(self, key: tuple[int, int]) -> dict:
        video, start, y, x, flip = self.draw(key)
        frames = []
        with av.open(self.sources[video]) as container:
            stream = container.streams.video[0]
            container.seek(int(start / 25 / stream.time_base), stream=stream, backward=True)
            for frame in container.decode(stream):
                if frame.time is not None and frame.time + 1e-6 < start / 25:
                    continue
                frames.append(resize_short_side(frame.to_ndarray(format="rgb24"), 256)[y : y + CROP, x : x + CROP])
                if len(frames) == T:
                    break
        return self.finish(np.stack(frames), None, flip)


def measure(dataset: Dataset, clips: int, workers: int, repeat: int = 3) -> float:
    """Median clips/s over ``repeat`` passes of ``clips`` items; item k is a fresh random clip of video k mod n."""
    keys = [(k % len(dataset), k) for k in range(clips)]  # (index, epoch): ClipDataset's key
    times = []
    for _ in range(repeat):
        loader = DataLoader(dataset, batch_size=None, sampler=keys, num_workers=workers)
        t0 = time.perf_counter()
        for _ in loader:
            pass
        times.append(time.perf_counter() - t0)
    return clips / statistics.median(times)


RGB_CODECS = ["jpeg:95", "jpeg-rst:95", "yuv420:lz4", "yuv420:zstd:3", "yuv420:raw", "raw"]
RAWFRAMES = "(a) rawframes cv2.imread"
GPU_SIDE = "jpeg-rst decode=gpu (CPU part)"


def table(rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    """Print ``rows`` with ``columns`` given as (key, heading, format)."""
    print("  ".join(f"{heading:>{len(format(0, fmt)) if fmt else 30}}" for _, heading, fmt in columns))
    for r in rows:
        print("  ".join(f"{r[key]:{fmt}}" if fmt else f"{r[key]:30}" for key, _, fmt in columns))


def codec_rows(work: Path, sources: Path, clips: int) -> list[dict]:
    """Part 1: RGB clips by codec, uint8 and float32 out, 0 and 2 workers, against rawframes."""
    outs = {}
    for codec in RGB_CODECS:
        outs[codec] = work / f"rgb-{codec.replace(':', '-')}"
        extract(sources, outs[codec], ExtractConfig(flow_backend="none", rgb_codec=codec), workers=0, progress=False)
    reader = ShardReader(outs["jpeg:95"])
    frames = sum(reader.meta(v)["num_frames"] for v in reader.video_ids)
    pixels = sum(reader.meta(v)["num_frames"] * reader.meta(v)["height"] * reader.meta(v)["width"] for v in reader.video_ids)
    rows = []
    for normalize in (False, True):
        candidates = {codec: ClipDataset(out, ("rgb",), clip_len=T, crop=CROP, normalize=normalize) for codec, out in outs.items()}
        if not normalize:  # the CPU's share of decode="gpu": cut each frame's JPEG to the crop's MCUs
            candidates[GPU_SIDE] = ClipDataset(outs["jpeg-rst:95"], ("rgb",), clip_len=T, crop=CROP, decode="gpu")
        candidates[RAWFRAMES] = RawframesClips(reader, False, work / "rawframes" / "rawframes", normalize)
        for workers in (0, 2):
            rates = {name: measure(ds, clips, workers) for name, ds in candidates.items()}
            for name, rate in rates.items():
                folder = outs["jpeg-rst:95" if name == GPU_SIDE else name] if name != RAWFRAMES else None
                stored = (sum(ShardReader(folder).meta(v)["bytes"] for v in reader.video_ids) if folder
                          else sum(f.stat().st_size for f in (work / "rawframes" / "rawframes").rglob("img_*.jpg")))
                rows.append({"output": "float32" if normalize else "uint8", "workers": workers, "reader": name,
                             "rgb_KB_per_frame": stored / frames / 1e3, "rgb_bytes_per_pixel": stored / pixels, "clips_per_s": rate,
                             "clips_per_s_per_core": rate / max(workers, 1), "ratio_to_rawframes": rate / rates[RAWFRAMES]})
    return rows


def format_rows(work: Path, sources: dict[str, str], clips: int) -> list[dict]:
    """Part 2: Arrow and HDF5, rgb and rgb+flow, at the default codec, against rawframes and PyAV."""
    extract(work / "src", work / "hdf5", ExtractConfig(flow_params=CHEAP_TVL1, format="hdf5"), workers=0, progress=False)
    arrow = work / "arrow"
    reader = ShardReader(arrow)
    rows = []
    for with_flow in (False, True):
        modalities = ("rgb", "flow") if with_flow else ("rgb",)
        candidates = {"flowprep arrow": ClipDataset(arrow, modalities, clip_len=T, crop=CROP),
                      "flowprep hdf5": ClipDataset(work / "hdf5", modalities, clip_len=T, crop=CROP),
                      "flowprep arrow, uint8 out": ClipDataset(arrow, modalities, clip_len=T, crop=CROP, normalize=False),
                      RAWFRAMES: RawframesClips(reader, with_flow, work / "rawframes" / "rawframes")}
        if not with_flow:
            candidates["(b) PyAV decode on the fly"] = DecodeClips(reader, sources)
        for workers in (0, 2):
            rates = {name: measure(ds, clips, workers) for name, ds in candidates.items()}
            for name, rate in rates.items():
                rows.append({"modalities": "+".join(modalities), "workers": workers, "reader": name, "clips_per_s": rate,
                             "ratio_to_rawframes": rate / rates[RAWFRAMES],
                             "pixel_MB_per_s": rate * T * CROP * CROP * (5 if with_flow else 3) / 1e6})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=24)
    parser.add_argument("--skip-formats", action="store_true", help="only part 1, the RGB codecs")
    parser.add_argument("--json", default="benchmarks/results/reader.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)

    work = Path(tempfile.mkdtemp(prefix="flowprep-reader-"))
    sources = {path.stem: str(path) for path in make_sample_folder(work / "src")}
    extract(work / "src", work / "arrow", ExtractConfig(flow_params=CHEAP_TVL1), workers=0, progress=False)
    export_rawframes(work / "arrow", work / "rawframes")
    codecs = codec_rows(work, work / "src", args.clips)
    table(codecs, [("output", "output", "7"), ("workers", "workers", "7d"), ("reader", "reader", ""),
                   ("rgb_KB_per_frame", "KB/frame", "8.1f"), ("rgb_bytes_per_pixel", "B/pixel", "7.3f"), ("clips_per_s", "clips/s", "8.2f"),
                   ("clips_per_s_per_core", "clips/s/core", "12.2f"), ("ratio_to_rawframes", "x rawframes", "11.2f")])
    formats = [] if args.skip_formats else format_rows(work, sources, args.clips)
    if formats:
        print()
        table(formats, [("modalities", "modalities", "10"), ("workers", "workers", "7d"), ("reader", "reader", ""),
                        ("clips_per_s", "clips/s", "8.2f"), ("ratio_to_rawframes", "x rawframes", "11.2f"),
                        ("pixel_MB_per_s", "pixel MB/s", "10.1f")])
    write_results(args.json, {"clip_len": T, "crop": CROP, "clips": args.clips, "cores": os.cpu_count(),
                              "codecs": codecs, "formats": formats})
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
