"""The teacher under careless or hostile input: stale, damaged or foreign targets, bad
checkpoints and options; each a one-line error or a recomputation, never stale targets served."""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flowprep import ClipDataset
from flowprep.shards import ShardReader
from flowprep.shards.layout import complete_shards
from flowprep.teacher.targets import TeacherTargets

from test_teacher import CLIP, CROP, STRIDE, save_checkpoint

GRID = ["--clip-len", CLIP, "--crop", CROP, "--window-stride", STRIDE, "--crops", 1, "--no-flip"]


def flowprep(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flowprep.cli", *map(str, args)], capture_output=True, text=True)


def one_line(result: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith(("Usage:", "Try "))]
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def taught(small_shards, tmp_path_factory):
    """Shards with targets of teacher ``t`` (S3D-G, one crop, no flip), the arguments that made
    them and a pristine copy of the whole folder."""
    root = tmp_path_factory.mktemp("taught")
    out = root / "shards"
    shutil.copytree(small_shards, out)
    args = ["teacher", "--shards", out, "--name", "t", "--model", "s3dg", "--checkpoint",
            save_checkpoint(root / "s3dg.pt", "s3dg"), *GRID, "--workers", 0, "--no-progress"]
    assert flowprep(*args).returncode == 0
    shutil.copytree(out, root / "pristine")
    return args, out, root / "pristine"


@pytest.fixture
def work(taught, tmp_path):
    """A fresh copy of the taught shards for one test, and the teacher arguments pointing at it."""
    args, out, pristine = taught
    copy = tmp_path / "shards"
    shutil.copytree(pristine, copy)
    return [copy if a == out else a for a in args], copy


def target_bytes(out) -> dict[str, bytes]:
    folder = out / "teachers" / "t"
    return {s: (folder / s).read_bytes() for s in complete_shards(folder)}


def test_targets_without_their_teacher_json_are_never_adopted(work):
    args, out = work
    (out / "teachers" / "t" / "teacher.json").unlink()
    refused = flowprep(*args[:-1], "--crops", 2)  # other options
    assert refused.returncode == 1 and "no teacher.json" in one_line(refused)
    assert flowprep(*args, "--overwrite").returncode == 0
    assert len(TeacherTargets(out, "t")) == 5


def test_a_row_that_is_not_the_view_asked_for_is_an_error(work):
    args, out = work
    index = out / "teachers" / "t" / "index.parquet"
    rows = pq.read_table(index).to_pylist()
    row = next(r for r in rows if r["views"] > 1)
    row["row"] += 1  # the index points one row off: the stored rows are other views
    pq.write_table(pa.Table.from_pylist(rows, schema=pq.read_schema(index)), index)
    targets = TeacherTargets(out, "t")
    video = row["video_id"]
    with pytest.raises(ValueError, match="holds view"):
        targets.get(video, *targets.views(video)[0])
    with pytest.raises(ValueError, match="past its end"):
        targets.get(video, *targets.views(video)[-1])
    result = flowprep("verify", out)
    assert result.returncode == 1 and video in result.stdout


def test_damaged_target_shards_are_found_refused_and_repaired(work):
    args, out = work
    before = target_bytes(out)
    folder = out / "teachers" / "t"
    cut, nan = complete_shards(folder)[:2]
    (folder / cut).write_bytes((folder / cut).read_bytes()[:2541])
    data = bytearray((folder / nan).read_bytes())
    logits = pa.ipc.open_file(pa.py_buffer(bytes(data))).get_batch(0).column("logits").values
    start = data.find(np.asarray(logits.to_numpy(zero_copy_only=False), np.float16).tobytes())
    data[start : start + 4] = np.array([np.nan, np.nan], np.float16).tobytes()
    (folder / nan).write_bytes(bytes(data))

    with pytest.raises(ValueError, match="cannot be read"):
        targets = TeacherTargets(out, "t")
        video = next(v for v in targets.video_ids if targets._video(v)["shard"] == cut)
        targets.get(video, *targets.views(video)[0])
    rerun = flowprep(*args)
    assert rerun.returncode == 1 and "damaged" in one_line(rerun) and "verify" in rerun.stderr
    found = flowprep("verify", out)
    assert found.returncode == 1 and cut in found.stdout and nan in found.stdout
    assert "teacher:" in flowprep("info", out).stdout  # info still summarises
    repaired = flowprep("verify", out, "--repair")
    assert repaired.returncode == 0 and "dropped 2" in repaired.stdout
    again = flowprep(*args)
    assert again.returncode == 0 and "2 written" in again.stdout
    assert target_bytes(out) == before


def test_a_nan_checkpoint_stores_no_target(small_shards, tmp_path):
    import torch

    out = tmp_path / "shards"
    shutil.copytree(small_shards, out)
    checkpoint = save_checkpoint(tmp_path / "s3dg.pt", "s3dg")
    state = torch.load(checkpoint)
    state["logits.conv3d.bias"] = torch.full_like(state["logits.conv3d.bias"], float("nan"))
    torch.save(state, checkpoint)
    result = flowprep("teacher", "--shards", out, "--name", "nan", "--model", "s3dg", "--checkpoint", checkpoint, *GRID,
                      "--workers", 0, "--no-progress")
    assert result.returncode == 3 and "0 of 5 videos have targets" in result.stdout
    failures = [json.loads(line) for line in (out / "teachers" / "nan" / "failures.jsonl").read_text().splitlines()]
    assert {f["stage"] for f in failures} == {"model"} and "not finite" in failures[0]["error"]
    assert len(TeacherTargets(out, "nan")) == 0


def test_overwrite_deletes_only_flowprep_files_and_checks_first(work):
    args, out = work
    folder = out / "teachers" / "t"
    before = target_bytes(out)
    bad_device = flowprep(*args, "--overwrite", "--device", "foo")
    assert bad_device.returncode == 2 and "--device" in one_line(bad_device)
    assert target_bytes(out) == before  # nothing deleted
    checkpoint = folder / "teacher.pt"
    shutil.copy(args[args.index("--checkpoint") + 1], checkpoint)
    refused = flowprep(*[checkpoint if a == args[args.index("--checkpoint") + 1] else a for a in args], "--overwrite")
    assert refused.returncode == 1 and "teacher.pt" in one_line(refused) and "did not write" in refused.stderr
    assert checkpoint.exists() and target_bytes(out) == before
    checkpoint.unlink()
    assert flowprep(*args, "--overwrite").returncode == 0 and target_bytes(out) == before


def test_unusable_checkpoints_and_options_are_one_line_and_leave_nothing(small_shards, tmp_path):
    out = tmp_path / "shards"
    shutil.copytree(small_shards, out)
    good = save_checkpoint(tmp_path / "s3dg.pt", "s3dg")
    files = {"truncated": good.read_bytes()[:1000], "text": b"not weights\n", "empty": b"",
             "pickle": pickle.dumps({"a": [1, 2, 3]})}
    base = ["teacher", "--shards", out, "--name", "t", *GRID, "--workers", 0, "--no-progress"]
    for name, data in files.items():
        (tmp_path / f"{name}.pt").write_bytes(data)
        result = flowprep(*base, "--model", "s3dg", "--checkpoint", tmp_path / f"{name}.pt")
        assert result.returncode == 2 and "--checkpoint" in one_line(result), name
    for options, status, says in ((["--model", "s3dg", "--checkpoint", good, "--device", "foo"], 2, "--device"),
                                  (["--model", "os:getcwd", "--num-classes", 2], 2, "--model"),
                                  (["--model", "s3dg", "--checkpoint", good, "--outputs", ","], 2, "--outputs"),
                                  (["--model", "s3dg", "--checkpoint", save_checkpoint(tmp_path / "ten.pt", "s3dg", 10)], 1,
                                   "10 classes")):
        result = flowprep(*base, *options)
        assert result.returncode == status and says in one_line(result), options
    assert not (out / "teachers" / "t").exists()


def test_one_bad_teacher_folder_does_not_break_info(work):
    args, out = work
    shutil.copytree(out / "teachers" / "t", out / "teachers" / "broken")
    (out / "teachers" / "broken" / "teacher.json").write_text("{ not json")
    result = flowprep("info", out)
    assert result.returncode == 0 and "teacher: t:" in result.stdout
    assert "teacher: broken: cannot be read" in result.stdout and "teacher.json" in result.stdout


def test_retry_failed_recomputes_videos_whose_flow_was_unreadable(work):
    args, out = work
    shard = ShardReader(out).meta("pan_b")["shard"]
    good = (out / shard).read_bytes()
    (out / shard).write_bytes(good[:2000])
    shutil.rmtree(out / "teachers" / "t")
    assert flowprep(*args, "--allow-failures", 1).returncode == 0
    assert "pan_b" not in TeacherTargets(out, "t")
    (out / shard).write_bytes(good)  # the same bytes back, as verify --repair and a re-extract give them
    assert "0 written, 1 failed" in flowprep(*args, "--allow-failures", 1).stdout
    retried = flowprep(*args, "--retry-failed")
    assert retried.returncode == 0 and "1 written, 0 failed" in retried.stdout
    assert "pan_b" in TeacherTargets(out, "t")
    assert len(ClipDataset(out, ("rgb",), clip_len=CLIP, crop=CROP, teacher="t")) == 5
