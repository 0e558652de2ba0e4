"""The training jobs' --log-every step lines and --tensorboard event files."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from flowprep.teacher.run import TeacherConfig, compute_targets
from flowprep.teacher.views import ViewGrid

from test_train import SMALL, argv, read_jsonl, tiny

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pipelines"))
import train_d3d  # noqa: E402
import train_teacher  # noqa: E402

STEP_KEYS = {"event", "step", "epoch", "loss", "ce", "lr", "clips_per_s", "data_wait", "steps", "seconds"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_teacher_step_lines_cover_the_steps_since_the_last_and_go_to_tensorboard(small_shards, tmp_path):
    run = tmp_path / "flow"
    # 4 training videos, 2 a step: 2 steps an epoch; a step line every 2 steps covers one epoch.
    # Stopped after the first epoch and resumed: each invocation writes its own event file.
    for stop in (2, 4):
        train_teacher.main(argv("--shards", small_shards, "--out", run, "--model", "test_train:tiny", "--epochs", 2,
                                "--max-steps", stop, "--log-every", 2, "--tensorboard", *SMALL))
    log = read_jsonl(run / "log.jsonl")
    assert [e["event"] for e in log] == ["start", "step", "epoch", "end"] * 2
    steps, epochs = log[1::4], log[2::4]
    for step, epoch in zip(steps, epochs):
        assert set(step) == STEP_KEYS  # the teacher has no distillation term: no "distill"
        assert step["steps"] == 2 and step["step"] == epoch["step"]
        assert step["ce"] == step["loss"] == pytest.approx(epoch["loss"]) and step["lr"] == epoch["lr"]
        assert step["clips_per_s"] > 0 and 0 <= step["data_wait"] <= 1
    assert [s["epoch"] for s in steps] == [0, 1] and steps[1]["lr"] < steps[0]["lr"]  # the cosine schedule

    events = list(run.glob("events.out.tfevents.*"))
    assert len(events) == 2
    board = EventAccumulator(str(run))
    board.Reload()
    assert {"step/loss", "step/ce", "step/lr", "step/data_wait", "epoch/loss"} <= set(board.Tags()["scalars"])
    loss = board.Scalars("step/loss")
    assert [s.step for s in loss] == [2, 4]
    assert [s.value for s in loss] == pytest.approx([s["loss"] for s in steps], rel=1e-6)


def test_student_step_lines_carry_the_distillation_term(small_shards, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(small_shards, shards)
    torch.manual_seed(0)
    torch.save({"model": tiny(2, 2).state_dict()}, tmp_path / "teacher.pt")
    config = TeacherConfig("test_train:tiny", str(tmp_path / "teacher.pt"), ViewGrid(clip_len=8, crop=112, window_stride=8),
                           num_classes=2, device="cpu")
    assert compute_targets(shards, "t", config, workers=0, progress=False).written == 5
    run = tmp_path / "d3d"
    train_d3d.main(argv("--shards", shards, "--teacher", "t", "--out", run, "--model", "test_train:tiny", "--epochs", 1,
                        "--log-every", 1, *SMALL))
    steps = [e for e in read_jsonl(run / "log.jsonl") if e["event"] == "step"]
    assert [s["step"] for s in steps] == [1, 2] and all(s["steps"] == 1 for s in steps)
    for step in steps:
        assert set(step) == STEP_KEYS | {"distill"} and step["distill"] > 0
        assert step["loss"] == pytest.approx(step["ce"] + step["distill"])
    assert not list(run.glob("events.out.tfevents.*"))  # no --tensorboard, no event file
