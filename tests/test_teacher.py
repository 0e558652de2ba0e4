"""flowprep teacher: the view grid, stored targets against fresh forwards, resume, errors, Ray."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from flowprep import ClipDataset, ShardReader
from flowprep.shards.layout import complete_shards
from flowprep.networks import build_model, sequence_logits
from flowprep.teacher.run import TeacherConfig, compute_targets
from flowprep.teacher.targets import TeacherTargets, list_teachers
from flowprep.teacher.views import View, ViewGrid

from conftest import kill_cli_when

CLIP, CROP, STRIDE = 8, 112, 8
GRID = ViewGrid(clip_len=CLIP, crop=CROP, window_stride=STRIDE)


def flowprep(*args, check_status: int | None = 0) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "flowprep.cli", *map(str, args)], capture_output=True, text=True)
    if check_status is not None:
        assert result.returncode == check_status, result.stderr
    return result


def save_checkpoint(path, model: str, num_classes: int = 2, seed: int = 0, wrap: str | None = None):
    """A randomly initialised network whose activations keep their scale through the layers (He
    init), so its outputs depend on the input as a trained one's do."""
    torch.manual_seed(seed)
    network = build_model(model, 2, num_classes)
    for module in network.modules():
        if isinstance(module, torch.nn.Conv3d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    state = network.state_dict()
    torch.save({wrap: state} if wrap else state, path)
    return path


def test_grid_starts_crops_flips_and_rows():
    grid = ViewGrid(clip_len=64, crop=224, window_stride=16, crops=3)
    assert list(grid.starts(249)) == list(range(0, 186, 16))  # 12 starts for a 250-frame video
    assert grid.corners(256, 340) == [(16, 0), (16, 58), (16, 116)]  # along the long side, centred on the short
    assert grid.corners(340, 256) == [(0, 16), (58, 16), (116, 16)]
    assert grid.corners(224, 224) == [(0, 0)]  # coinciding positions count once
    views = grid.views(249, 256, 340)
    assert len(views) == 12 * 3 * 2 and views[0] == View(0, 16, 0, False) and views[1] == View(0, 16, 0, True)
    assert [grid.row(v, 249, 256, 340) for v in views] == list(range(len(views)))
    assert list(grid.starts(30)) == [0]  # shorter than the clip: one wrapped start
    assert ViewGrid(crop=224, crops=1, flip=False).views(100, 256, 340) == [View(s, 16, 58, False) for s in (0, 16, 32)]
    assert grid.centre(249, 256, 340) == View(96, 16, 58, False)  # nearest the eval clip's start (185 // 2 = 92)
    with pytest.raises(KeyError, match="not on the grid"):
        grid.row(View(8, 16, 0, False), 249, 256, 340)
    with pytest.raises(ValueError, match="smaller than crop"):
        grid.views(249, 200, 340)


@pytest.fixture(scope="module", params=["i3d", "s3dg"])
def stored(request, small_shards, tmp_path_factory):
    """Targets of a randomly initialised model in a copy of the shards."""
    out = tmp_path_factory.mktemp(request.param) / "shards"
    shutil.copytree(small_shards, out)
    checkpoint = save_checkpoint(out.parent / "teacher.pt", request.param)
    config = TeacherConfig(request.param, str(checkpoint), GRID, ("logits", "embedding", "Mixed_4f"), batch_size=5)
    report = compute_targets(out, "t", config, workers=0, progress=False)
    return out, request.param, checkpoint, report


def test_a_stored_target_is_the_models_output_on_clipdatasets_clip(stored):
    out, model_name, checkpoint, report = stored
    assert report.written == 5 and report.failed == 0
    model = build_model(model_name, 2, 2)
    model.load_state_dict(torch.load(checkpoint))
    model.eval()
    dataset = ClipDataset(out, ("flow",), clip_len=CLIP, crop=CROP, teacher="t", teacher_outputs=("logits", "embedding", "Mixed_4f"))
    seen = set()
    for k in range(40):
        item = dataset[(k % len(dataset), k)]
        if item["flip"] in seen:
            continue
        seen.add(item["flip"])
        assert View(item["start"], *item["crop"], item["flip"]) in TeacherTargets(out, "t").views(item["video_id"])
        with torch.inference_mode():
            fresh = sequence_logits(model(item["flow"][None]))[0]
        assert item["teacher_logits"].dtype == torch.float32 and item["teacher_logits"].shape == (2,)
        torch.testing.assert_close(item["teacher_logits"], fresh, atol=2e-3, rtol=2e-3)
        assert item["teacher_embedding"].shape == (1024,) and item["teacher_Mixed_4f"].shape == (832,)
    assert seen == {False, True}



def test_reader_api_and_evaluation_items_carry_the_centre_view(stored):
    out, *_ = stored
    targets = TeacherTargets(out, "t")
    assert sorted(targets.video_ids) == ["pan_a", "pan_b", "pan_c", "pan_d", "short"]
    assert targets.outputs == {"logits": 2, "embedding": 1024, "Mixed_4f": 832}
    assert len(targets.views("pan_a")) == 2 * 3 * 2 and len(targets.views("short")) == 1 * 3 * 2  # 23 and 5 positions
    first, second = targets.views("pan_a")[:2]
    a, b = targets.get("pan_a", *first), targets.get("pan_a", *second)
    assert a["logits"].dtype == np.float32 and not np.allclose(a["Mixed_4f"], b["Mixed_4f"])  # the flipped view differs
    with pytest.raises(KeyError, match="not on the grid"):
        targets.get("pan_a", 1, *first[1:])
    val = ClipDataset(out, ("rgb",), clip_len=CLIP, crop=CROP, train=False, split="val", teacher="t")
    item = val[0]
    centre = targets.centre("pan_d")
    assert item["crop"] == (0, (150 - CROP) // 2) and item["flip"] is False and item["rgb"].shape == (3, CLIP, CROP, CROP)
    np.testing.assert_array_equal(item["teacher_logits"].numpy(), targets.get("pan_d", *centre)["logits"])
    assert list_teachers(out) == ["t"]
    info = json.loads(flowprep("info", out, "--json").stdout)["teachers"]["t"]
    assert info["videos"] == 5 and info["views"] == 4 * 12 + 6 and info["outputs"]["logits"] == 2
    assert "teacher: t:" in flowprep("info", out).stdout


def test_clipdataset_refuses_a_teacher_of_other_clips(stored):
    out, *_ = stored
    with pytest.raises(ValueError, match="clip_len 8"):
        ClipDataset(out, ("rgb",), clip_len=16, crop=CROP, teacher="t")
    with pytest.raises(ValueError, match="not"):
        ClipDataset(out, ("rgb",), clip_len=CLIP, crop=CROP, teacher="t", teacher_outputs=("Mixed_5c",))
    with pytest.raises(FileNotFoundError, match="no teacher 'other'"):
        ClipDataset(out, ("rgb",), clip_len=CLIP, crop=CROP, teacher="other")


def test_mismatched_checkpoint_and_changed_options_are_clear_errors(small_shards, tmp_path):
    out = tmp_path / "shards"
    shutil.copytree(small_shards, out)
    s3dg = save_checkpoint(tmp_path / "s3dg.pt", "s3dg", wrap="state_dict")
    args = ["teacher", "--shards", out, "--name", "t", "--clip-len", CLIP, "--crop", CROP, "--window-stride", STRIDE,
            "--workers", 0, "--no-progress"]
    wrong = flowprep(*args, "--model", "i3d", "--checkpoint", s3dg, check_status=1)
    assert "does not fit" in wrong.stderr and "missing" in wrong.stderr and "unexpected" in wrong.stderr
    assert not list_teachers(out)  # nothing written
    assert "needs --checkpoint" in flowprep(*args, "--model", "s3dg", check_status=2).stderr
    done = flowprep(*args, "--model", "s3dg", "--checkpoint", s3dg, "--crops", 1, "--no-flip")
    assert "5 written, 0 failed" in done.stdout and "views/s" in done.stdout
    refused = flowprep(*args, "--model", "s3dg", "--checkpoint", s3dg, check_status=1)
    assert "other params (grid" in refused.stderr and "--overwrite" in refused.stderr
    again = flowprep(*args, "--model", "s3dg", "--checkpoint", s3dg, "--crops", 1, "--no-flip")
    assert "5 done before, 0 written" in again.stdout
    assert "5 written" in flowprep(*args, "--model", "s3dg", "--checkpoint", s3dg, "--overwrite").stdout
    assert len(TeacherTargets(out, "t").views("pan_a")) == 12


def test_unreadable_flow_is_a_failure_and_the_rest_is_written(small_shards, tmp_path):
    out = tmp_path / "shards"
    shutil.copytree(small_shards, out)
    reader_shard = ShardReader(out).meta("pan_b")["shard"]
    (out / reader_shard).write_bytes((out / reader_shard).read_bytes()[:2000])  # truncated
    checkpoint = save_checkpoint(tmp_path / "i3d.pt", "i3d")
    report = compute_targets(out, "t", TeacherConfig("i3d", str(checkpoint), ViewGrid(CLIP, 1, CROP, STRIDE, 1, False)),
                             workers=0, progress=False)
    assert report.written == 4 and [f["video_id"] for f in report.failures] == ["pan_b"]
    failures = [json.loads(line) for line in (out / "teachers" / "t" / "failures.jsonl").read_text().splitlines()]
    assert failures[0]["stage"] == "read" and "corrupt or truncated" in failures[0]["error"]
    assert "pan_b" not in TeacherTargets(out, "t")
    assert len(ClipDataset(out, ("rgb",), clip_len=CLIP, crop=CROP, teacher="t")) == 4  # left out, with a warning


@pytest.mark.ray
def test_killed_run_resumes_to_the_same_files_and_ray_matches_in_process(small_shards, tmp_path):
    out = tmp_path / "shards"
    shutil.copytree(small_shards, out)
    checkpoint = save_checkpoint(tmp_path / "i3d.pt", "i3d")
    args = ["--shards", out, "--model", "i3d", "--checkpoint", checkpoint, "--clip-len", CLIP, "--crop", CROP,
            "--window-stride", STRIDE, "--batch-size", 4, "--no-progress"]
    flowprep("teacher", *args, "--name", "reference", "--workers", 0)
    reference = out / "teachers" / "reference"

    assert kill_cli_when(["teacher", *args, "--name", "killed", "--workers", 0], "target shard complete") == -signal.SIGKILL
    killed = out / "teachers" / "killed"
    killed_at = len(complete_shards(killed))
    assert 1 <= killed_at < 5
    result = flowprep("teacher", *args, "--name", "killed", "--workers", 0)
    assert f"{killed_at} done before, {5 - killed_at} written" in result.stdout
    assert complete_shards(killed) == complete_shards(reference)
    for name in [*complete_shards(reference), "index.parquet", "failures.jsonl"]:
        assert (killed / name).read_bytes() == (reference / name).read_bytes(), name
    assert not list(killed.glob("**/*.partial"))

    flowprep("teacher", *args, "--name", "ray", "--workers", 2)
    on_ray, local = TeacherTargets(out, "ray"), TeacherTargets(out, "reference")
    assert on_ray.video_ids == local.video_ids
    for video_id in local.video_ids:
        assert on_ray.views(video_id) == local.views(video_id)
        for view in local.views(video_id)[:3]:
            np.testing.assert_allclose(on_ray.get(video_id, *view)["logits"], local.get(video_id, *view)["logits"], atol=2e-3, rtol=2e-3)


def test_a_model_error_fails_the_videos_with_stage_model_and_exit_status_3(small_shards, tmp_path, monkeypatch):
    out = tmp_path / "shards"
    shutil.copytree(small_shards, out)
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent))
    args = ["teacher", "--shards", out, "--name", "t", "--model", "exploding_teacher:model", "--num-classes", 2,
            "--clip-len", CLIP, "--crop", CROP, "--window-stride", STRIDE, "--workers", 0, "--no-progress"]
    failed = flowprep(*args, check_status=3)
    assert "0 of 5 videos have targets, 5 have none" in failed.stdout and "more than --allow-failures 0" in failed.stderr
    failures = [json.loads(line) for line in (out / "teachers" / "t" / "failures.jsonl").read_text().splitlines()]
    assert {f["stage"] for f in failures} == {"model"} and "the model exploded" in failures[0]["error"]
    assert "5 done before" in flowprep(*args, "--allow-failures", 5).stdout  # settled: the model's own error


def test_evaluation_clips_are_stored_views_with_their_own_targets(stored):
    out, *_ = stored
    targets = TeacherTargets(out, "t")
    for clips in (1, 2):
        val = ClipDataset(out, ("flow",), clip_len=CLIP, crop=CROP, train=False, num_clips=clips, teacher="t")
        starts = set()
        for index in range(len(val)):
            item = val[index]
            view = View(item["start"], *item["crop"], item["flip"])
            assert view in targets.views(item["video_id"]) and not item["flip"]
            np.testing.assert_array_equal(item["teacher_logits"].numpy(), targets.get(item["video_id"], *view)["logits"])
            starts.add((item["video_id"], item["start"]))
        assert len(starts) == len(val) - (clips == 2)  # "short" has a single start: its two clips share it
