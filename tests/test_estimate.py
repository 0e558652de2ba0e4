"""``flowprep extract --dry-run``: it writes nothing, and counts what the real run then does."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import ray
from click.testing import CliRunner

from flowprep.cli import main
from flowprep.estimate import estimate_run
from flowprep.extract import OutputRefused, extract
from flowprep.pipeline import ExtractConfig
from flowprep.shards.layout import complete_shards

from conftest import textured_image, write_video

# Frames of each generated video (the order is the input order: sorted paths).
FRAMES = {"left/pan0": 12, "left/pan1": 9, "right/pan2": 14, "right/pan3": 11}
# 48 x 72 output frames: the shard plan puts about 2 of these videos in a shard.
CONFIG = ExtractConfig(short_side=48, shard_size=40_000, chunk_frames=4)
OPTIONS = ["--short-side", "48", "--shard-size", "40000", "--chunk-frames", "4", "--workers", "0", "--no-progress"]


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    image = textured_image(64, 96)
    for name, frames in FRAMES.items():
        write_video(root / f"{name}.mp4", [np.roll(image, 2 * i, axis=1) for i in range(frames)])
    (root / "right" / "broken.mp4").write_text("not a video\n")
    return root


def snapshot(folder) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def test_dry_run_writes_nothing_and_counts_the_shards_the_run_writes(src, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["extract", "--src", str(src), "--out", str(out), *OPTIONS, "--dry-run"])
    assert result.exit_code == 0, result.output
    assert not out.exists()
    estimate = json.loads(result.output.splitlines()[-1])
    assert {"videos", "shards", "estimated_bytes", "estimated_seconds"} <= estimate.keys()
    assert (estimate["videos"], estimate["unreadable"], estimate["to_do"], estimate["done"]) == (5, 1, 5, 0)
    assert estimate["frames"] == sum(FRAMES.values())
    assert estimate["flow_pairs"] == sum(FRAMES.values()) - len(FRAMES)
    assert estimate["estimated_bytes"] == estimate["rgb_bytes"] + estimate["flow_bytes"]
    assert estimate["rgb_bytes"] > 0 and estimate["flow_bytes"] > 0 and estimate["estimated_seconds"] > 0
    assert estimate["calibration"]["pairs"] > 0 and not estimate["calibration"]["failed"]
    assert estimate["workers"]["mode"] == "in-process"
    assert "unreadable: broken" in result.output

    # The default, a local Ray, is counted as the run would start it, without starting it.
    on_ray = estimate_run(src, out, CONFIG)
    assert (on_ray.shape.mode, on_ray.shape.flow_workers, on_ray.shape.cores) == ("ray", os.cpu_count(), os.cpu_count())
    assert not ray.is_initialized() and not out.exists()
    assert (on_ray.shards, on_ray.frames) == (estimate["shards"], estimate["frames"])

    report = extract(src, out, CONFIG, workers=0, progress=False)
    assert (report.written, report.failed, report.frames) == (4, 1, estimate["frames"])
    assert len(complete_shards(out)) == estimate["shards"] >= 2


def test_dry_run_on_a_started_output_counts_what_is_left(src, tmp_path):
    out = tmp_path / "out"
    extract(src, out, CONFIG, limit=2, workers=0, progress=False)
    before, shards_before = snapshot(out), len(complete_shards(out))

    estimate = estimate_run(src, out, CONFIG, workers=0)
    assert snapshot(out) == before  # no lock, no plan, no index rewritten
    assert (estimate.output, estimate.done, estimate.to_do, estimate.shards_done) == ("resumed", 2, 3, shards_before)
    assert estimate.frames == FRAMES["right/pan2"] + FRAMES["right/pan3"]
    assert any("resumed" in note for note in estimate.notes)

    extract(src, out, CONFIG, workers=0, progress=False)
    assert len(complete_shards(out)) - shards_before == estimate.shards
    assert estimate_run(src, out, CONFIG, workers=0).to_do == 0

    finished = snapshot(out)
    everything = estimate_run(src, out, CONFIG, workers=0, overwrite=True)
    assert (everything.output, everything.done, everything.to_do) == ("overwritten", 0, 5)
    assert snapshot(out) == finished  # --overwrite counted, nothing deleted


def test_dry_run_refuses_what_the_run_refuses(src, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    with pytest.raises(OutputRefused, match="notes.txt"):
        estimate_run(src, out, CONFIG, workers=0)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
