"""Check a teacher's targets as ``flowprep verify`` checks shards: every complete target shard as
long as written and with its recorded sha256, readable, every value finite, every indexed video's
rows holding its views; and repair by dropping what is damaged, for a rerun of ``flowprep
teacher`` to compute again."""

from __future__ import annotations

import numpy as np

from flowprep.lock import output_lock
from flowprep.shards.layout import complete_shards, damaged_shards, drop_shards, leftovers, rebuild_index, remove_leftovers
from flowprep.storage import Storage
from flowprep.teacher.targets import TARGET_INDEX_SCHEMA, TeacherTargets, teacher_storage


def target_problems(out: Storage, name: str) -> list[tuple[str | None, str]]:
    """``(target shard, problem)`` for each problem of teacher ``name`` of ``out``; the shard is
    the one to drop to repair it, ``None`` for what a rerun of ``flowprep teacher`` mends itself
    or what only ``--overwrite`` can (an unreadable teacher.json)."""
    folder = teacher_storage(out, name)
    problems: list[tuple[str | None, str]] = [
        (None, f"{folder / n}: left by an interrupted run (rerun flowprep teacher to finish it)") for n in leftovers(folder)]
    try:
        targets = TeacherTargets(out, name)
        videos = list(targets.video_ids)
    except (OSError, ValueError) as e:
        return problems + [(None, str(e))]
    damaged = damaged_shards(folder)
    problems += [(s, f"{folder / s}: damaged: {reason}") for s, reason in damaged.items()]
    for shard in complete_shards(folder):
        if shard in damaged:
            continue
        try:
            columns = targets._shard(shard)
        except ValueError as e:
            problems.append((shard, str(e)))
            continue
        bad = [k for k in targets.outputs if not np.isfinite(columns[k]).all()]
        if bad:
            problems.append((shard, f"{folder / shard}: {', '.join(bad)} hold values that are not finite (NaN or infinity)"))
    broken = {s for s, _ in problems if s}
    for video_id in videos:
        shard = targets._video(video_id)["shard"]
        if shard in broken:
            continue
        try:
            if targets.stored_views(video_id) != [(video_id, *view) for view in targets.views(video_id)]:
                raise ValueError(f"{folder / shard}: its rows are not the views of the grid, in order")
        except (ValueError, IndexError) as e:
            problems.append((shard, f"{video_id}: {e}"))
            broken.add(shard)
    return problems


def repair_targets(out: Storage, name: str) -> tuple[list[str], list[str]]:
    """Drop the damaged target shards of teacher ``name`` (and leftovers) and rebuild its index,
    holding its lock; returns ``(problems found, shards dropped)``. A rerun of ``flowprep
    teacher`` (same options) then computes the dropped shards' targets again."""
    folder = teacher_storage(out, name)
    with output_lock(folder):
        found = [f"{p}: left by an interrupted run, deleted" for p in remove_leftovers(folder)]
        problems = target_problems(out, name)
        bad = sorted({s for s, _ in problems if s})
        drop_shards(folder, bad)
        if bad:
            rebuild_index(folder, TARGET_INDEX_SCHEMA)
        return found + [p for _, p in problems], bad
