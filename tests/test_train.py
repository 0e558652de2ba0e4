"""The D3D training jobs: teacher -> stored targets -> student, exact resume, the distillation
loss, no flow read by the student, and two ranks under torchrun."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flowprep import ClipDataset
from flowprep.errors import OptionError
from flowprep.extract import extract
from flowprep.networks import build_model, load_state, load_weights, sequence_logits
from flowprep.pipeline import ExtractConfig
from flowprep.provenance import file_sha256
from flowprep.teacher.model import TeacherConfig
from flowprep.teacher.run import compute_targets
from flowprep.teacher.targets import TeacherTargets
from flowprep.teacher.views import ViewGrid
from flowprep.train import to_device

from conftest import textured_image, write_video

PIPELINES = Path(__file__).resolve().parents[1] / "pipelines"
sys.path.insert(0, str(PIPELINES))
import probe_motion  # noqa: E402
import train_d3d  # noqa: E402
import train_teacher  # noqa: E402

SMALL = ["--clip-len", 8, "--crop", 112, "--batch-size", 2, "--lr", 0.01, "--num-workers", 0, "--device", "cpu"]


class Tiny(nn.Module):
    """A user model for ``--model test_train:tiny``: one conv, global pooling, a linear classifier."""

    classifier_name = "fc"

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.conv = nn.Conv3d(in_channels, 8, 3, padding=1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):  # [B, C, T, H, W] -> [B, num_classes]
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3, 4)))


def tiny(in_channels: int, num_classes: int) -> Tiny:
    return Tiny(in_channels, num_classes)


class Poisoned(Tiny):
    """Tiny with a buffer that holds NaN and takes no part in the forward: the loss stays finite,
    the weights do not (as BatchNorm statistics that overflowed)."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__(in_channels, num_classes)
        self.register_buffer("scale", torch.tensor(float("nan")))


def poisoned(in_channels: int, num_classes: int) -> Poisoned:
    return Poisoned(in_channels, num_classes)


def argv(*args) -> list[str]:
    return [str(a) for a in args]


def read_jsonl(path: Path) -> list[dict]:
    """The lines of a log, strict JSON: a bare NaN or Infinity fails the test."""
    def refuse(constant):
        raise AssertionError(f"{path} holds {constant}, which is not JSON")
    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def stopped(capsys, main, *args) -> tuple[int, str]:
    """Run a script's ``main`` that must stop: its exit status and what it wrote to stderr."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        main(argv(*args))
    return stop.value.code, capsys.readouterr().err


def assert_same_tensors(a, b, where="checkpoint"):
    """Equal nested dicts/lists, tensors bit for bit."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same_tensors(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, f"{where}[{i}]")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: fast on 2 shared cores and reproducible bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def targets(small_shards, tmp_path_factory):
    """A copy of the shards with the targets (logits, Mixed_4f) of a 2-step flow teacher, and that teacher's run folder."""
    shards = tmp_path_factory.mktemp("train") / "shards"
    shutil.copytree(small_shards, shards)
    run = shards.parent / "teacher-run"
    train_teacher.main(argv("--shards", shards, "--out", run, "--model", "s3dg", "--epochs", 1, "--max-steps", 2, *SMALL))
    result = subprocess.run([sys.executable, "-m", "flowprep.cli", "teacher", *argv(
        "--shards", shards, "--name", "flow", "--model", "s3dg", "--checkpoint", run / "checkpoint.pt", "--clip-len", 8,
        "--crop", 112, "--window-stride", 8, "--workers", 0, "--outputs", "logits,Mixed_4f", "--no-progress")],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    assert "5 written, 0 failed" in result.stdout
    return shards, run


def d3d(shards, out, *extra):
    return train_d3d.main(argv("--shards", shards, "--teacher", "flow", "--out", out, "--model", "s3dg", *SMALL, *extra))


def test_teacher_targets_student_and_a_resumed_run_equals_an_uninterrupted_one(targets, tmp_path, capsys):
    shards, teacher_run = targets
    teacher_log = read_jsonl(teacher_run / "log.jsonl")
    assert [e["event"] for e in teacher_log] == ["start", "epoch", "end"] and teacher_log[0]["reads"] == ["flow"]
    assert teacher_log[-1]["step"] == 2 and all(math.isfinite(e["loss"]) for e in teacher_log[1:])
    saved = torch.load(teacher_run / "checkpoint.pt", weights_only=True)
    assert (saved["step"], saved["epoch"], saved["epoch_step"], saved["num_classes"]) == (2, 1, 0, 2)
    assert {"model", "optimizer", "scheduler", "scaler", "seed", "args"} <= saved.keys()
    # flowprep teacher ran this very checkpoint (the fixture's CLI call loaded its "model").
    assert TeacherTargets(shards, "flow").description["params"]["checkpoint_sha256"] == file_sha256(teacher_run / "checkpoint.pt")

    # 4 training videos, 2 a step: 2 steps an epoch; 3 steps stop in the middle of the second epoch.
    resumed, straight = tmp_path / "resumed", tmp_path / "straight"
    d3d(shards, resumed, "--epochs", 3, "--max-steps", 3, "--record-items")
    log = read_jsonl(resumed / "log.jsonl")
    assert [e["event"] for e in log] == ["start", "epoch", "end"]
    assert (log[-1]["step"], log[-1]["epoch"], log[-1]["epoch_step"]) == (3, 1, 1)
    assert all(math.isfinite(e[k]) and e[k] > 0 for e in log[1:] for k in ("loss", "ce", "distill"))
    assert torch.load(resumed / "checkpoint.pt", weights_only=True)["step"] == 3

    d3d(shards, resumed, "--epochs", 3, "--max-steps", 5, "--record-items")
    log = read_jsonl(resumed / "log.jsonl")
    assert [e["event"] for e in log] == ["start", "epoch", "end", "start", "epoch", "end"]
    assert log[3]["resumed"] and log[3]["step"] == 3 and log[4]["step"] == 4 and log[4]["steps"] == 1  # the rest of epoch 2
    assert log[-1]["step"] == 5 and log[-1]["steps"] == 2
    items = read_jsonl(resumed / "items-rank0.jsonl")
    assert [line["step"] for line in items] == [1, 2, 3, 4, 5]
    for epoch in (0, 1):  # each epoch is a permutation of the items
        assert sorted(i for line in items if line["epoch"] == epoch for i in line["items"]) == [0, 1, 2, 3]

    d3d(shards, straight, "--epochs", 3, "--max-steps", 5, "--record-items")
    assert read_jsonl(straight / "items-rank0.jsonl") == items
    a, b = (torch.load(run / "checkpoint.pt", weights_only=True) for run in (resumed, straight))
    assert (a["step"], a["epoch"], a["epoch_step"]) == (5, 2, 1)
    for key in ("model", "optimizer", "scheduler"):
        assert_same_tensors(a[key], b[key], key)

    capsys.readouterr()
    with pytest.raises(SystemExit) as refused:
        d3d(shards, resumed, "--epochs", 3, "--max-steps", 6, "--lr", 0.02)
    assert refused.value.code == 2
    assert "--lr 0.01 (now 0.02)" in capsys.readouterr().err
    assert len(read_jsonl(resumed / "log.jsonl")) == 6  # nothing ran

    # The paper's probe on the student: a decoder on its frozen Mixed_3c features, scored beside zeros.
    probe = probe_motion.main(argv("--shards", shards, "--checkpoint", straight / "checkpoint.pt", "--model", "s3dg",
                                   "--layer", "Mixed_3c", "--decoder", "simple", "--out", tmp_path / "probe", "--max-steps", 2,
                                   "--batch-size", 2, "--clip-len", 8, "--crop", 112, "--device", "cpu"))
    assert probe["steps"] == 2 and math.isfinite(probe["epe"]) and probe["epe_zeros"] > 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == probe


@pytest.mark.parametrize("output", ["logits", "embedding"])
def test_the_distillation_term_falls_on_a_fixed_batch(output):
    torch.manual_seed(0)
    network = tiny(3, 4)
    projection = nn.Linear(8, 5) if output == "embedding" else None
    student = train_d3d.Student(network, output, projection)
    teacher = torch.randn(2, 4 if output == "logits" else 5)  # random targets: cross-entropy alone would not approach them
    rgb = torch.stack([torch.full((3, 8, 16, 16), 0.8), torch.full((3, 8, 16, 16), -0.8)]) + 0.1 * torch.randn(2, 3, 8, 16, 16)
    batch = {"rgb": rgb, "label": torch.tensor([0, 3]), f"teacher_{output}": teacher}
    optimizer = torch.optim.SGD(student.parameters(), lr=0.2)
    distill = []
    for _ in range(20):
        result = train_d3d.distill_step(student, batch, weight=1.0, output=output)
        distill.append(result.terms["distill"].mean().item())
        optimizer.zero_grad()
        result.loss.mean().backward()
        optimizer.step()
    assert distill[-1] < 0.5 * distill[0]
    torch.testing.assert_close(result.loss, result.terms["ce"] + result.terms["distill"])
    if projection is not None:
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in projection.parameters())


def test_weight_zero_is_cross_entropy_alone(targets, tmp_path):
    torch.manual_seed(0)
    student = train_d3d.Student(tiny(3, 4), None)
    batch = {"rgb": torch.rand(2, 3, 8, 16, 16) * 2 - 1, "label": torch.tensor([1, 2])}  # no teacher target to read
    result = train_d3d.distill_step(student, batch, weight=0.0, output="logits")
    assert torch.equal(result.loss, F.cross_entropy(student.network(batch["rgb"]), batch["label"], reduction="none"))
    assert torch.equal(result.terms["distill"], torch.zeros(2))

    shards, _ = targets
    run = tmp_path / "ce"
    train_d3d.main(argv("--shards", shards, "--teacher", "flow", "--out", run, "--model", "test_train:tiny", *SMALL,
                        "--epochs", 1, "--distill-weight", 0, "--distill-output", "Mixed_4f"))
    end = read_jsonl(run / "log.jsonl")[-1]
    assert end["distill"] == 0 and end["ce"] == pytest.approx(end["loss"]) and end["ce"] > 0
    assert "projection" not in torch.load(run / "checkpoint.pt", weights_only=True)


def test_the_student_never_opens_a_flow_column(targets, tmp_path):
    shards, _ = targets
    # Positive control: a dataset that reads flow shows it.
    flow = ClipDataset(shards, ("flow",), clip_len=8, crop=112)
    flow[0]
    assert flow.readers[0].columns_read == {"flow"}

    run = tmp_path / "layer"
    result = d3d(shards, run, "--epochs", 1, "--distill-output", "Mixed_4f", "--val-split", "val", "--val-clips", 2)
    for dataset in (result.job.train_set, result.job.val_set):
        assert dataset.modalities == ("rgb",)
        assert [r.columns_read for r in dataset.readers] == [{"rgb"}]
    log = read_jsonl(run / "log.jsonl")
    assert log[0]["reads"] == ["rgb"] and "no flow read, no teacher network" in log[0]["teacher"]
    epoch = log[1]
    assert epoch["event"] == "epoch" and epoch["step"] == 2 and 0 <= epoch["val_top1"] <= 1
    assert all(math.isfinite(epoch[k]) for k in ("val_loss", "val_ce", "val_distill", "distill"))
    saved = torch.load(run / "checkpoint.pt", weights_only=True)
    assert saved["projection"]["weight"].shape == (832, 832)  # student Mixed_4f -> teacher Mixed_4f
    load_weights(build_model("s3dg", 3, 2), load_state(run / "checkpoint.pt"))  # "model" is the network alone


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_ranks_train_on_disjoint_items_and_validate_each_clip_once(targets, tmp_path):
    shards, _ = targets
    run = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
               str(PIPELINES / "train_d3d.py"), *argv("--shards", shards, "--teacher", "flow", "--out", run, "--model", "s3dg",
                                                       *SMALL, "--epochs", 2, "--record-items", "--val-split", "val", "--val-clips", 3)]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [read_jsonl(run / f"items-rank{r}.jsonl") for r in (0, 1)]
    assert [len(lines) for lines in ranks] == [2, 2]  # 4 items, 2 ranks, 2 a step: 1 step an epoch
    for epoch in (0, 1):
        seen = [{i for line in lines if line["epoch"] == epoch for i in line["items"]} for lines in ranks]
        assert seen[0] and seen[1] and not seen[0] & seen[1] and seen[0] | seen[1] == {0, 1, 2, 3}
    log = read_jsonl(run / "log.jsonl")
    assert [e["event"] for e in log] == ["start", "epoch", "epoch", "end"] and log[0]["world_size"] == 2
    assert log[-1]["step"] == 2 and math.isfinite(log[-1]["loss"])
    saved = torch.load(run / "checkpoint.pt", weights_only=True)
    assert saved["world_size"] == 2 and not any(k.startswith("module.") for k in saved["model"])

    # The 3 clips of the one val video over 2 ranks: the sampler pads rank 1 with a repeat of clip 0,
    # which must not count. Recompute the metrics of the final model here, in one process.
    network = build_model("s3dg", 3, 2)
    load_weights(network, load_state(run / "checkpoint.pt"))
    val = ClipDataset(shards, ("rgb",), clip_len=8, crop=112, train=False, split="val", num_clips=3, normalize=False)
    clips = torch.stack([val[i]["rgb"] for i in range(3)]).float().div_(127.5).sub_(1)
    with torch.no_grad():
        logits = sequence_logits(network.eval()(clips))
    label = val[0]["label"]
    ce = F.cross_entropy(logits, torch.tensor([label] * 3), reduction="none")
    assert log[-1]["val_ce"] == pytest.approx(ce.mean().item(), rel=1e-4)
    assert log[-1]["val_top1"] == float(logits.mean(0).argmax().item() == label)


def test_the_training_side_loads_neither_ray_nor_pyav():
    code = "import sys, flowprep.train, flowprep.dataset, flowprep.networks; print(sorted({'ray', 'av'} & set(sys.modules)))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]"


def student(shards, out, *extra) -> list:
    """train_d3d.py's arguments for the tiny student on teacher 'flow' (later options win)."""
    return ["--shards", shards, "--teacher", "flow", "--out", out, "--model", "test_train:tiny", *SMALL, "--epochs", 2, *extra]


def flow_teacher(shards, out, *extra) -> list:
    return ["--shards", shards, "--out", out, "--model", "test_train:tiny", *SMALL, "--epochs", 1, *extra]


@pytest.mark.parametrize("script, option, value", [
    ("teacher", "--lr", "nan"), ("teacher", "--lr", "inf"), ("teacher", "--lr", "-1"), ("teacher", "--lr", "0"),
    ("teacher", "--weight-decay", "nan"), ("teacher", "--num-workers", "-1"), ("teacher", "--seed", "-1"),
    ("teacher", "--epochs", "0"), ("d3d", "--distill-weight", "nan"), ("d3d", "--distill-weight", "-5")])
def test_numeric_options_are_checked_before_anything_runs(targets, tmp_path, capsys, script, option, value):
    shards, _ = targets
    out = tmp_path / "run"
    main, args = (train_teacher.main, flow_teacher(shards, out)) if script == "teacher" else (train_d3d.main, student(shards, out))
    status, err = stopped(capsys, main, *args, option, value)
    assert status == 2 and f"argument {option}: {value!r} is not " in err.splitlines()[-1]
    assert not out.exists()


def poison_targets(shards: Path, output: str = "logits") -> None:
    """Replace every stored ``output`` of teacher 'flow' with NaN (each target shard rewritten whole)."""
    for path in sorted((shards / "teachers" / "flow" / "shards").glob("*.arrow")):
        table = pa.ipc.open_file(path).read_all()
        column = table.schema.get_field_index(output)
        dim = table.schema.field(column).type.list_size
        nan = pa.FixedSizeListArray.from_arrays(pa.array(np.full(table.num_rows * dim, np.nan, np.float16)), dim)
        partial = path.with_suffix(".rewrite")
        with pa.ipc.new_file(partial, table.schema) as writer:
            writer.write_table(table.set_column(column, table.schema.field(column), nan))
        partial.replace(path)


def test_nan_targets_stop_the_student_and_the_last_good_checkpoint_stays(targets, tmp_path, capsys):
    shards = tmp_path / "shards"
    shutil.copytree(targets[0], shards)
    run = tmp_path / "run"
    train_d3d.main(argv(*student(shards, run, "--max-steps", 1)))
    good = (run / "checkpoint.pt").read_bytes()

    poison_targets(shards)
    status, err = stopped(capsys, train_d3d.main, *student(shards, run, "--max-steps", 3))
    assert status == 3
    assert re.fullmatch(r".*: error: step 2: the loss is not finite \(loss nan, ce [0-9.]+, distill nan\): the run stops; "
                        rf"{re.escape(str(run / 'checkpoint.pt'))} keeps step 1\n", err), err
    assert (run / "checkpoint.pt").read_bytes() == good
    log = read_jsonl(run / "log.jsonl")
    assert [e["event"] for e in log] == ["start", "end", "start", "stop"] and log[-1]["checkpoint_step"] == 1

    fresh = tmp_path / "fresh"
    status, err = stopped(capsys, train_d3d.main, *student(shards, fresh))
    assert status == 3 and err.endswith("the run stops; no checkpoint was saved\n")
    assert sorted(p.name for p in fresh.iterdir()) == ["log.jsonl"]
    assert [e["event"] for e in read_jsonl(fresh / "log.jsonl")] == ["start", "stop"]


def test_weights_that_are_not_finite_are_never_saved(targets, tmp_path, capsys):
    shards, _ = targets
    run = tmp_path / "run"
    status, err = stopped(capsys, train_teacher.main, *flow_teacher(shards, run, "--model", "test_train:poisoned"))
    assert status == 3 and "step 2: the weights are not finite (model.scale): the run stops; no checkpoint was saved" in err
    assert not (run / "checkpoint.pt").exists()
    assert read_jsonl(run / "log.jsonl")[-1]["event"] == "stop"


@pytest.fixture(scope="module")
def three_class_teacher(targets, tmp_path_factory) -> Path:
    """A copy of the shards (2 classes) with the logits of a 3-class teacher stored as 'flow'."""
    shards = tmp_path_factory.mktemp("three") / "shards"
    shutil.copytree(targets[0], shards, ignore=shutil.ignore_patterns("teachers"))
    config = TeacherConfig("test_train:tiny", None, ViewGrid(clip_len=8, crop=112, window_stride=8), ("logits",),
                           num_classes=3, batch_size=5, device="cpu")
    # flowprep teacher refuses a teacher of other classes than the shards': made over a 3-class
    # label map, then the shards' own put back.
    dataset = shards / "dataset.json"
    own = dataset.read_text()
    dataset.write_text(json.dumps({**json.loads(own), "label_map": {"a": 0, "b": 1, "c": 2}}))
    assert compute_targets(shards, "flow", config, workers=0, progress=False).written == 5
    dataset.write_text(own)
    return shards


def write_file(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def foreign_checkpoint(out: Path) -> None:
    out.mkdir()
    torch.save({"weight": torch.zeros(2)}, out / "checkpoint.pt")


USAGE = {  # case: (extra arguments, what to put at --out first, what the one line says)
    "no such teacher": (["--teacher", "nosuch"], None, "argument --teacher: .* has no teacher 'nosuch'"),
    "teacher's clip length": (["--clip-len", 16], None, "argument --clip-len: teacher 'flow' stored clip_len 8"),
    "teacher's frame stride": (["--frame-stride", 2], None, "argument --frame-stride: teacher 'flow' stored .*frame_stride 1"),
    "output not stored": (["--distill-output", "Mixed_5c"], None,
                          r"argument --distill-output: teacher 'flow' stored \['Mixed_4f', 'logits'\], not"),
    "split without videos": (["--split", "test"], None, "argument --split: no videos of split 'test'"),
    "unknown device": (["--device", "foo"], None, "--device foo: not a device"),
    "unknown model": (["--model", "nosuch"], None, "argument --model: unknown model 'nosuch'"),
    "out is a file": ([], lambda out: write_file(out, b"notes"), "argument --out: .* is a file, not a run folder"),
    "empty checkpoint": ([], lambda out: write_file(out / "checkpoint.pt", b""),
                         r"argument --out: .*checkpoint.pt: torch.load cannot read it \(EOFError\)"),
    "foreign checkpoint": ([], foreign_checkpoint, "argument --out: .*checkpoint.pt lacks args, epoch"),
    "flip swap of no class": (["--flip-swap", "left:up"], None, "argument --flip-swap: 'up' not a class of .*left, right"),
}


@pytest.mark.parametrize("case", [*USAGE, "teacher of other classes"])
def test_bad_usage_is_one_line_with_status_2_and_touches_nothing(targets, three_class_teacher, tmp_path, capsys, case):
    shards = targets[0]
    if case == "teacher of other classes":
        shards, extra, prepare = three_class_teacher, [], None
        expected = "argument --teacher: teacher 'flow' has 3 classes, the shards 2"
    else:
        extra, prepare, expected = USAGE[case]
    out = tmp_path / "run"
    if prepare:
        prepare(out)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    status, err = stopped(capsys, train_d3d.main, *student(shards, out, *extra))
    assert status == 2 and re.fullmatch(rf"\S+: error: {expected}.*\n", err), err
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before and out.exists() == bool(prepare)


def test_flip_swap_labels_a_mirrored_clip_as_the_other_class_of_its_pair(targets, tmp_path, capsys):
    """left and right swapped by flips: the flow clips a teacher trains on and the stored views a
    student trains on carry the other label exactly when they are mirrored."""
    shards, _ = targets
    common = {"clip_len": 8, "crop": 112, "split": "train", "flip_swap": [("left", "right")]}
    for dataset in (ClipDataset(shards, ("flow",), **common), ClipDataset(shards, ("rgb",), teacher="flow", **common)):
        assert dataset.readers[0].label_map == {"left": 0, "right": 1}
        flips = set()
        for epoch in range(6):
            for index in range(len(dataset)):
                item, own = dataset[(index, epoch)], dataset.meta(index)["label_index"]
                assert item["label"] == (1 - own if item["flip"] else own)
                flips.add(item["flip"])
        assert flips == {False, True}
    with pytest.raises(OptionError, match="'right' in more than one pair"):
        ClipDataset(shards, **{**common, "flip_swap": [("left", "right"), ("right", "left")]})
    status, err = stopped(capsys, train_teacher.main, *flow_teacher(shards, tmp_path / "run", "--flip-swap", "left"))
    assert status == 2 and err.splitlines()[-1].endswith("argument --flip-swap: 'left' is not class pairs A:B, comma-separated")
    assert not (tmp_path / "run").exists()


def test_a_new_run_deletes_no_earlier_log(targets, tmp_path, capsys):
    shards, _ = targets
    run = tmp_path / "run"
    train_teacher.main(argv(*flow_teacher(shards, run)))
    (run / "checkpoint.pt").unlink()  # a finished run whose checkpoint was moved away: its log is all that is left
    log = (run / "log.jsonl").read_text()
    status, err = stopped(capsys, train_teacher.main, *flow_teacher(shards, run))
    assert status == 2 and f"argument --out: {run} holds log.jsonl but no checkpoint.pt" in err
    assert (run / "log.jsonl").read_text() == log

    # What a start that never reached its first checkpoint leaves (its start line) is no run: a new one goes on after it.
    (run / "log.jsonl").write_text(log.splitlines(keepends=True)[0])
    train_teacher.main(argv(*flow_teacher(shards, run)))
    assert [e["event"] for e in read_jsonl(run / "log.jsonl")] == ["start", "start", "epoch", "end"]


@pytest.fixture(scope="module")
def float16_shards(tmp_path_factory) -> Path:
    """Two panning videos extracted with float16 flow (extract --flow-dtype float16)."""
    root = tmp_path_factory.mktemp("float16")
    image = textured_image(64, 96)
    for label, speed in (("left", 1), ("right", -1)):
        write_video(root / "src" / "train" / label / f"pan_{label}.mp4", [np.roll(image, speed * i, axis=1) for i in range(10)])
    config = ExtractConfig(short_side=64, chunk_frames=4, flow_dtype="float16")
    assert extract(root / "src", root / "shards", config, workers=0, progress=False).written == 2
    return root / "shards"


def test_the_flow_teacher_trains_on_float16_flow_shards(float16_shards, tmp_path):
    raw = ClipDataset(float16_shards, ("flow",), clip_len=4, crop=32, train=False, normalize=False)[0]["flow"]
    assert raw.dtype == torch.float32 and raw.abs().max() > 0
    assert torch.equal(raw, ClipDataset(float16_shards, ("flow",), clip_len=4, crop=32, train=False)[0]["flow"])
    assert torch.equal(to_device({"flow": raw}, torch.device("cpu"))["flow"], raw)  # already in [-1, 1]

    run = tmp_path / "run"
    result = train_teacher.main(argv("--shards", float16_shards, "--out", run, "--model", "test_train:tiny", "--epochs", 1,
                                     "--batch-size", 2, "--clip-len", 4, "--crop", 32, "--lr", 0.01, "--num-workers", 0, "--device", "cpu"))
    assert result.end["step"] == 1 and math.isfinite(result.end["loss"]) and result.job.train_set.readers[0].flow_dtype == np.float16
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 1
