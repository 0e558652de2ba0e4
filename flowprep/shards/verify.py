"""Check an output folder against its index: every shard present and readable, every video's
bytes matching its checksum, a sample of frames decoding to the right shape."""

from __future__ import annotations

import hashlib
from collections import defaultdict
from pathlib import Path


from flowprep.shards.layout import PARTIAL, SHARDS, complete_shards, update_checksum
from flowprep.shards.reader import ShardReader, spread_indices


def video_checksum(reader: ShardReader, video_id: str) -> str:
    """sha256 over each frame's stored RGB bytes then its flow bytes, in frame order (as written)."""
    n = reader.meta(video_id)["num_frames"]
    rgb, flow = reader.blobs(video_id, "rgb", range(n)), reader.blobs(video_id, "flow", range(n - 1))
    sha = hashlib.sha256()
    update_checksum(sha, rgb, flow)
    return sha.hexdigest()


def verify(out: str | Path, sample_frames: int = 3) -> list[str]:
    """Problems found in ``out`` (empty when it is whole), each naming the file and the video.

    Decodes ``sample_frames`` RGB frames and flows per video, spread over its length.
    """
    out = Path(out)
    reader = ShardReader(out)
    leftovers = sorted([*out.glob(f"*{PARTIAL}"), *(out / SHARDS).glob(f"*{PARTIAL}")])
    problems = [f"{p}: left by an interrupted run (rerun extract to finish it)" for p in leftovers]
    by_shard: dict[str, list[str]] = defaultdict(list)
    for video_id in reader.video_ids:
        by_shard[reader.meta(video_id)["shard"]].append(video_id)
    problems += [f"{out / s}: complete shard missing from the index" for s in complete_shards(out) if s not in by_shard]
    for shard, video_ids in by_shard.items():
        try:
            reader._shard(shard)
        except OSError as e:
            problems.append(str(e))
            continue
        for video_id in video_ids:
            try:
                meta = reader.meta(video_id)
                if video_checksum(reader, video_id) != meta["checksum"]:
                    problems.append(f"{out / shard}: {video_id}: stored bytes do not match the index checksum")
                    continue
                n = meta["num_frames"]
                rgb = reader.rgb_at(video_id, spread_indices(n, sample_frames))
                flow = reader.flow_at(video_id, spread_indices(n - 1, sample_frames))
                if rgb.shape[1:] != (meta["height"], meta["width"], 3) or flow.shape[1:] != (meta["height"], meta["width"], 2):
                    problems.append(f"{out / shard}: {video_id}: frames decode to {rgb.shape[1:]} / {flow.shape[1:]}")
            except Exception as e:  # any failure to read is what verify is there to report
                problems.append(f"{out / shard}: {video_id}: {type(e).__name__}: {e}")
    reader.close()
    return problems
