"""Check an output folder against its index: every shard present, as long as written and readable,
every video's bytes matching its checksum, a sample of frames decoding to the right shape; and
repair one by dropping what is damaged, for a rerun of extract to redo."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from flowprep.lock import output_lock
from flowprep.shards.layout import (
    INDEX,
    complete_shards,
    damaged_shards,
    drop_shards,
    leftovers,
    rebuild_index,
    remove_leftovers,
)
from flowprep.shards.reader import ShardReader, spread_indices
from flowprep.storage import Storage, storage


def verify(out: str | Path | Storage, sample_frames: int = 3) -> list[str]:
    """Problems found in ``out`` (empty when it is whole), each naming the file and the video.

    Decodes ``sample_frames`` RGB frames and flows (if the output has flow) per video, spread over its length.
    """
    return [problem for _, problem in find_problems(storage(out), sample_frames)]


def find_problems(out: Storage, sample_frames: int) -> list[tuple[str | None, str]]:
    """``(shard, problem)`` for each problem of ``out``; ``shard`` is the complete shard to drop to
    repair it, ``None`` for the problems a rerun of extract mends by itself."""
    problems: list[tuple[str | None, str]] = [(None, f"{out / name}: left by an interrupted run (rerun extract to finish it)")
                                              for name in leftovers(out)]
    damaged = damaged_shards(out)
    problems += [(s, f"{out / s}: damaged: {reason}") for s, reason in damaged.items()]
    if not out.exists(INDEX):
        return problems + [(None, f"{out / INDEX} is missing (a rerun of extract or `verify --repair` rebuilds it)")]
    reader = ShardReader(out)
    by_shard: dict[str, list[str]] = defaultdict(list)
    for video_id in reader.video_ids:
        by_shard[reader.meta(video_id)["shard"]].append(video_id)
    problems += [(None, f"{out / s}: complete shard missing from the index (a rerun of extract rebuilds it)")
                 for s in complete_shards(out) if s not in by_shard and s not in damaged]
    for shard, video_ids in by_shard.items():
        if shard in damaged:
            continue
        try:
            reader._shard(shard)
        except OSError as e:
            problems.append((shard, str(e)))
            continue
        for video_id in video_ids:
            try:
                meta = reader.meta(video_id)
                if reader.checksum(video_id) != meta["checksum"]:
                    problems.append((shard, f"{out / shard}: {video_id}: stored bytes do not match the index checksum"))
                    continue
                n = meta["num_frames"]
                reader.rgb_at(video_id, spread_indices(n, sample_frames))
                if reader.has_flow:
                    reader.flow_at(video_id, spread_indices(n - 1, sample_frames))
            except Exception as e:  # any failure to read is what verify is there to report
                problems.append((shard, f"{out / shard}: {video_id}: {type(e).__name__}: {e}"))
    reader.close()
    return problems


def repair(out: str | Path | Storage, sample_frames: int = 3) -> tuple[list[str], list[str]]:
    """Make ``out`` whole by dropping what is damaged; returns ``(problems found, shards dropped)``.

    Deletes the leftovers of an interrupted run and every complete shard with a problem, with its
    index part, and rebuilds ``index.parquet`` from the shards that remain. The videos of the
    dropped shards are then missing: a rerun of the extract command (same options) extracts them
    again, into the shards the stored plan gives them. Holds ``out``'s lock meanwhile: while a
    run writes ``out`` (whose files in flight look like leftovers) it raises
    :class:`~flowprep.lock.OutputLocked` and deletes nothing.
    """
    out = storage(out)
    with output_lock(out):
        return _repair(out, sample_frames)


def _repair(out: Storage, sample_frames: int) -> tuple[list[str], list[str]]:
    found = [f"{p}: left by an interrupted run, deleted" for p in remove_leftovers(out)]
    if not out.exists(INDEX):
        found.append(f"{out / INDEX} was missing, rebuilt")
    # The cheap checks first, so that the index can be rebuilt from the intact shards' parts and
    # the full check reads an index that lists exactly them.
    damaged = damaged_shards(out)
    found += [f"{out / s}: damaged: {reason}" for s, reason in damaged.items()]
    drop_shards(out, list(damaged))
    rebuild_index(out)
    problems = find_problems(out, sample_frames)
    bad = sorted({s for s, _ in problems if s})
    drop_shards(out, bad)
    rebuild_index(out)
    return found + [p for _, p in problems], sorted(damaged) + bad
