"""Bytes per frame and decode time per frame of the stored frame codecs, on real footage.

RGB frames and TV-L1 flow of bikes.mp4 at short side 256 (the default size). The baseline is the
raw array (ratio = codec bytes / raw bytes). Run:

    python benchmarks/codecs.py [--frames 16] [--json benchmarks/results/codecs.json]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from flowprep.codec import Codec, quantize_flow
from flowprep.decode import VideoDecoder
from flowprep.flow import get_backend
from flowprep.samples import sample_clip
from results import write_results

RGB_CODECS = ["raw", "jpeg:90", "jpeg:95", "png:1", "png:6", "zstd:1", "zstd:3"]
FLOW_CODECS = ["raw", "jpeg:95", "png:1", "png:6", "zstd:1", "zstd:3", "zstd:6", "zstd:9"]


def measure(codec_name: str, frames: list[np.ndarray], repeats: int = 5) -> dict:
    codec = Codec.parse(codec_name)
    t0 = time.perf_counter()
    blobs = [codec.encode(f) for f in frames]
    encode_ms = 1e3 * (time.perf_counter() - t0) / len(frames)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for blob, frame in zip(blobs, frames):
            codec.decode(blob, frame.shape, frame.dtype)
        times.append((time.perf_counter() - t0) / len(frames))
    raw = frames[0].nbytes
    size = statistics.mean(len(b) for b in blobs)
    return {"codec": codec_name, "bytes_per_frame": size, "ratio_to_raw": size / raw, "encode_ms": encode_ms,
            "decode_ms_median": 1e3 * statistics.median(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--json", default="benchmarks/results/codecs.json")
    args = parser.parse_args()

    with VideoDecoder(str(sample_clip("bikes.mp4"))) as video:
        rgb = list(video.frames(25, 256, max_frames=args.frames + 1))
    gray = np.stack([f.mean(axis=2).astype(np.uint8) for f in rgb])
    flow = get_backend("opencv", threads=2).compute(gray)
    flow_q = [quantize_flow(f, 20.0) for f in flow]
    results = {
        "clip": "bikes.mp4",
        "frame_shape": list(rgb[0].shape),
        "rgb": [measure(c, rgb[:-1]) for c in RGB_CODECS],
        "flow_uint8": [measure(c, flow_q) for c in FLOW_CODECS],
        "flow_float16": [measure(c, [f.astype(np.float16) for f in flow]) for c in ("raw", "zstd:3")],
    }
    for name in ("rgb", "flow_uint8", "flow_float16"):
        print(f"\n{name} ({rgb[0].shape[0]}x{rgb[0].shape[1]}, {len(flow_q)} frames)")
        print(f"{'codec':10} {'bytes/frame':>12} {'x raw':>7} {'encode ms':>10} {'decode ms':>10}")
        for r in results[name]:
            print(f"{r['codec']:10} {r['bytes_per_frame']:12.0f} {r['ratio_to_raw']:7.3f} {r['encode_ms']:10.3f} {r['decode_ms_median']:10.3f}")
    write_results(args.json, results)


if __name__ == "__main__":
    main()
