"""Export an output folder to the rawframes layout of denseflow / mmaction2, for existing training code.

::

    <dest>/rawframes/<video_id>/img_00001.jpg ...      RGB frames 1..N
    <dest>/rawframes/<video_id>/flow_x_00001.jpg ...   flow 1..N-1, x (uint8 q, the stored values)
    <dest>/rawframes/<video_id>/flow_y_00001.jpg ...   flow 1..N-1, y
    <dest>/<split>_list_rawframes.txt        "<video_id> <N> <label_index>" per line (RGB)
    <dest>/<split>_list_rawframes_flow.txt   "<video_id> <N-1> <label_index>" per line (flow)

The list files are what mmaction2's RawframeDataset reads (``data_prefix = <dest>/rawframes``);
flow images hold the quantized values ``q = round((f + b) * 255 / 2b)`` as denseflow writes them.
An output extracted with ``--flow none`` gives the ``img_`` files and the RGB list only.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np

from flowprep.shards.reader import ShardReader

CHUNK = 64  # frames decoded at once: memory stays bounded for long videos


def export_rawframes(out: str | Path, dest: str | Path, quality: int = 95) -> dict[str, int]:
    """Write the rawframes layout of ``out`` under ``dest``; returns videos per split. Each video's
    stored bytes are checked against the index checksum as it is read (``verify=True``)."""
    reader = ShardReader(out, verify=True)
    if reader.has_flow and reader.flow_dtype != np.uint8:
        raise ValueError("rawframes holds uint8 flow: export needs a run with --flow-dtype uint8")
    # extract refuses ids that cannot name a folder; a space is a fine id, but not in these lists.
    spaced = [v for v in reader.video_ids if any(c.isspace() for c in v)]
    if spaced:
        raise ValueError(f"mmaction2's list files are split on whitespace: rename the videos {spaced[:5]} "
                         f"({len(spaced)} in all) and extract them again to export to rawframes")
    dest = Path(dest)
    params = [cv2.IMWRITE_JPEG_QUALITY, quality]
    videos: dict[str, list[tuple[str, int, int]]] = defaultdict(list)
    for video_id in reader.video_ids:
        meta = reader.meta(video_id)
        folder = dest / "rawframes" / video_id
        folder.mkdir(parents=True, exist_ok=True)
        n = meta["num_frames"]
        for start in range(0, n, CHUNK):
            stop = min(start + CHUNK, n)
            for i, frame in enumerate(reader.rgb(video_id, start, stop), start + 1):
                _write(folder / f"img_{i:05d}.jpg", cv2.cvtColor(frame, cv2.COLOR_RGB2BGR), params)
            if reader.has_flow:
                for i, flow in enumerate(reader.flow(video_id, start, min(stop, n - 1), raw=True), start + 1):
                    _write(folder / f"flow_x_{i:05d}.jpg", flow[..., 0], params)
                    _write(folder / f"flow_y_{i:05d}.jpg", flow[..., 1], params)
        videos[meta["split"] or "all"].append((video_id, n, meta["label_index"]))
    for split, rows in videos.items():
        (dest / f"{split}_list_rawframes.txt").write_text("".join(f"{v} {n} {label}\n" for v, n, label in rows))
        if reader.has_flow:
            (dest / f"{split}_list_rawframes_flow.txt").write_text("".join(f"{v} {n - 1} {label}\n" for v, n, label in rows))
    return {split: len(rows) for split, rows in videos.items()}


def _write(path: Path, image: np.ndarray, params: list[int]) -> None:
    if not cv2.imwrite(str(path), image, params):
        raise OSError(f"could not write {path}")
