"""pipelines/probe_motion.py: a decoder trained on frozen features, scored against zeros."""

from __future__ import annotations

import json
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
