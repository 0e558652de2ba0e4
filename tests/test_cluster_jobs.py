"""Ray wiring's cleanup and the Kinetics cluster job's split handling."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import ray

from flowprep.ray_runner import kill_actors
from flowprep.samples import sample_clip
from flowprep.shards import ShardReader

KINETICS_JOB = Path(__file__).resolve().parents[1] / "pipelines" / "kinetics.py"


@pytest.mark.ray
def test_cleanup_after_ray_is_down_starts_no_ray():
    ray.init(num_cpus=1, include_dashboard=False)
    actor = ray.remote(num_cpus=0)(type("Idle", (), {"ping": lambda self: 1})).remote()
    assert ray.get(actor.ping.remote()) == 1
    ray.shutdown()
    kill_actors([actor])
    assert not ray.is_initialized()


def kinetics_download(root: Path, splits: tuple[str, ...]) -> Path:
    """A Kinetics download of one real clip per split (bikes.mp4 as youtube id 'bikes_<split>')."""
    (root / "annotations").mkdir(parents=True)
    for split in splits:
        (root / split).mkdir()
        shutil.copy(sample_clip("bikes.mp4"), root / split / f"bikes_{split}.mp4")
        (root / "annotations" / f"{split}.csv").write_text(f"label,youtube_id,time_start,time_end,split\nriding bike,bikes_{split},0,1,{split}\n")
    return root


def kinetics(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(KINETICS_JOB), *map(str, args)], capture_output=True, text=True)


def test_missing_default_splits_are_skipped_and_a_named_one_is_an_error(tmp_path):
    root = kinetics_download(tmp_path / "k400", ("train", "val"))
    out = tmp_path / "out"
    extract = ["--", "--workers", 0, "--max-frames", 4, "--short-side", 32, "--no-progress"]
    done = kinetics("--root", root, "--out", out, *extract)
    assert done.returncode == 0, done.stderr
    assert "split test skipped" in done.stderr
    assert [ShardReader(out / s).video_ids for s in ("train", "val")] == [["bikes_train"], ["bikes_val"]]
    refused = kinetics("--root", root, "--out", tmp_path / "out2", "--splits", "train,test", *extract)
    assert refused.returncode == 2 and "--splits names test" in refused.stderr
    assert not (tmp_path / "out2").exists()
