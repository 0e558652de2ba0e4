"""pipelines/probe_motion.py: a decoder trained on frozen features, scored against zeros."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flowprep.networks import build_model

PROBE = Path(__file__).resolve().parents[1] / "pipelines" / "probe_motion.py"
sys.path.insert(0, str(PROBE.parent))

import probe_motion  # noqa: E402


def test_flow_targets_keep_pixels_and_average_over_cells():
    flow = torch.zeros(1, 2, 4, 8, 8)
    flow[:, 0, :, :, :4] = 0.5  # 10 px right on the left half, at bound 20
    target = probe_motion.flow_targets(flow, 20.0, (2, 2, 2))
    assert target.shape == (1, 2, 2, 2, 2)
    assert torch.equal(target[0, 0, :, :, 0], torch.full((2, 2), 10.0)) and torch.equal(target[0, 0, :, :, 1], torch.zeros(2, 2))
    assert probe_motion.end_point_error(torch.zeros_like(target), target).item() == pytest.approx(5.0)


def test_layer_features_stop_at_the_layer():
    model = build_model("s3dg", 3, 2).eval()
    with torch.no_grad():
        features = probe_motion.layer_features(model, "Mixed_3c", torch.zeros(1, 3, 8, 112, 112))
    assert features.shape == (1, 480, 4, 14, 14)


def test_probe_trains_a_decoder_and_reports_epe_beside_zeros(small_shards, tmp_path):
    decoder = "spatial"  # the simple one runs in test_train.py's end-to-end test
    torch.manual_seed(0)
    torch.save({"model": build_model("s3dg", 3, 2).state_dict()}, tmp_path / "rgb.pt")
    out = tmp_path / "probe"
    result = subprocess.run([sys.executable, str(PROBE), "--shards", str(small_shards), "--checkpoint", str(tmp_path / "rgb.pt"),
                             "--model", "s3dg", "--layer", "Mixed_3c", "--decoder", decoder, "--out", str(out), "--max-steps", "2",
                             "--batch-size", "2", "--clip-len", "8", "--crop", "112", "--device", "cpu"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    last = json.loads(result.stdout.strip().splitlines()[-1])
    assert last == json.loads((out / "probe.json").read_text())
    assert last["steps"] == 2 and last["clips"] == 1 and last["output_size"] == [4, 28, 28]
    # the held-out video pans 1 px a frame to the left: zeros miss by about that much
    assert 0.5 < last["epe_zeros"] < 1.5 and 0 < last["epe"] < 10
    assert (out / "decoder.pt").is_file()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """An RGB S3D-G of 2 classes (random weights), and a file that is no checkpoint."""
    folder = tmp_path_factory.mktemp("checkpoints")
    torch.manual_seed(0)
    torch.save({"model": build_model("s3dg", 3, 2).state_dict()}, folder / "rgb.pt")
    (folder / "notes.pt").write_text("not a checkpoint\n")
    return {"rgb": folder / "rgb.pt", "notes": folder / "notes.pt"}


def probe_args(shards, checkpoint, out, *extra) -> list[str]:
    """The probe on Mixed_3c, one step; later options win."""
    return [str(a) for a in ("--shards", shards, "--checkpoint", checkpoint, "--model", "s3dg", "--layer", "Mixed_3c", "--out", out,
                             "--max-steps", 1, "--batch-size", 2, "--clip-len", 8, "--crop", 112, "--device", "cpu", *extra)]


@pytest.mark.parametrize("checkpoint, extra, status, expected", [
    pytest.param("rgb", ["--layer", "Mixed_9z"], 2, "argument --layer: S3DG has no layer 'Mixed_9z'; its layers: Conv3d_1a_7x7, .*Mixed_5c",
                 id="unknown layer"),
    pytest.param("rgb", ["--layer", ""], 2, "argument --layer: S3DG has no layer ''", id="empty layer"),
    pytest.param("rgb", ["--batch-size", "0"], 2, "argument --batch-size: '0' is not an integer >= 1", id="batch size 0"),
    pytest.param("rgb", ["--lr", "nan"], 2, "argument --lr: 'nan' is not a finite number > 0", id="lr nan"),
    pytest.param("rgb", ["--crop", "128"], 2, "argument --crop: .*: pan_a is 112x150, smaller than crop 128", id="crop over the frames"),
    pytest.param("rgb", ["--val-split", "test"], 2, "argument --val-split: no videos of split 'test'", id="split without videos"),
    pytest.param("rgb", ["--model", "i3d"], 1, ".*rgb.pt: checkpoint does not fit InceptionI3d", id="another network"),
    pytest.param("notes", [], 1, r".*notes.pt is not a PyTorch checkpoint flowprep can load: \w+: .*", id="not a checkpoint"),
])
def test_probe_errors_are_one_line_with_their_status(small_shards, checkpoints, tmp_path, capsys, checkpoint, extra, status, expected):
    out = tmp_path / "probe"
    with pytest.raises(SystemExit) as stop:
        probe_motion.main(probe_args(small_shards, checkpoints[checkpoint], out, *extra))
    err = capsys.readouterr().err
    assert stop.value.code == status and re.fullmatch(rf"\S+: error: {expected}.*", err.splitlines()[-1]), err
    assert len(err.splitlines()) == 1 or err.startswith("usage:")  # argparse's own refusals show the usage first
    assert not out.exists()


def test_a_diverging_probe_with_dataloader_workers_exits_with_status_3(small_shards, checkpoints, tmp_path):
    """A loss that overflows at step 2, while two DataLoader workers prefetch: one line, status 3,
    nothing written, and the process ends on its own status (no abort from a worker or thread
    left behind)."""
    out = tmp_path / "probe"
    args = probe_args(small_shards, checkpoints["rgb"], out, "--lr", "1e30", "--max-steps", 3, "--batch-size", 1, "--num-workers", 2)
    result = subprocess.run([sys.executable, str(PROBE), *args], capture_output=True, text=True)
    assert result.returncode == 3, result.stderr
    assert result.stderr.splitlines()[-1] == "probe_motion.py: error: step 2: the decoder's loss is inf: nothing written"
    assert not out.exists()
