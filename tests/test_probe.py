"""pipelines/probe_motion.py: decoders trained on frozen features, scored against zeros;
flowprep/probe.py (the decoders); pipelines/probe_figure.py (runs side by side)."""

from __future__ import annotations

import contextlib
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from flowprep.errors import OptionError
from flowprep.networks import END_POINTS, build_model
from flowprep.probe import DECODERS, FlowDecoder, end_point_error, flow_targets, layer_features

PROBE = Path(__file__).resolve().parents[1] / "pipelines" / "probe_motion.py"
sys.path.insert(0, str(PROBE.parent))

import probe_figure  # noqa: E402
import probe_motion  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_flow_targets_keep_pixels_and_average_over_cells():
    flow = torch.zeros(1, 2, 4, 8, 8)
    flow[:, 0, :, :, :4] = 0.5  # 10 px right on the left half, at bound 20
    target = flow_targets(flow, 20.0, (2, 2, 2))
    assert target.shape == (1, 2, 2, 2, 2)
    assert torch.equal(target[0, 0, :, :, 0], torch.full((2, 2), 10.0)) and torch.equal(target[0, 0, :, :, 1], torch.zeros(2, 2))
    assert end_point_error(torch.zeros_like(target), target).item() == pytest.approx(5.0)


def test_layer_features_stop_once_every_layer_asked_has_run():
    model = build_model("s3dg", 3, 2).eval()
    above = []
    model.Mixed_4b.register_forward_hook(lambda *_: above.append("Mixed_4b"))
    with torch.no_grad():
        features = layer_features(model, ["Mixed_3c", "Mixed_3b"], torch.zeros(1, 3, 8, 112, 112))
    assert list(features) == ["Mixed_3c", "Mixed_3b"]  # in the order asked, not the order run
    assert features["Mixed_3c"].shape == (1, 480, 4, 14, 14) and features["Mixed_3b"].shape == (1, 256, 4, 14, 14)
    assert above == []


@pytest.mark.parametrize("kind", DECODERS)
def test_a_decoder_sees_one_time_step_at_a_time(kind):
    """Temporal kernel 1: features changed at one step change the flow of that step only."""
    torch.manual_seed(0)
    decoder = FlowDecoder(16, kind, size=12).eval()
    features = torch.randn(1, 16, 3, 6, 6)
    changed = features.clone()
    changed[:, :, 1] += 1
    with torch.no_grad():
        flow, flow_changed = decoder(features), decoder(changed)
    assert flow.shape == (1, 2, 3, 12, 12)
    assert torch.allclose(flow[:, :, [0, 2]], flow_changed[:, :, [0, 2]], atol=1e-6)
    assert (flow[:, :, 1] - flow_changed[:, :, 1]).abs().max() > 1e-3


def test_the_pwc_decoder_is_pwc_nets_with_1x3x3_kernels():
    torch.manual_seed(0)
    head = FlowDecoder(16, "pwc", size=8).layers
    convs = [(c.in_channels, c.out_channels, c.kernel_size, c.dilation) for c in head.modules() if isinstance(c, nn.Conv3d)]
    dense = [(16, 128), (144, 128), (272, 96), (368, 64), (432, 32), (464, 2)]  # each on the input and all earlier outputs
    context = [(464, 128, 1), (128, 128, 2), (128, 128, 4), (128, 96, 8), (96, 64, 16), (64, 32, 1), (32, 2, 1)]
    assert convs == [(i, o, (1, 3, 3), (1, 1, 1)) for i, o in dense] + [(i, o, (1, 3, 3), (1, d, d)) for i, o, d in context]
    assert [m.negative_slope for m in head.modules() if isinstance(m, nn.LeakyReLU)] == [0.1] * 11
    # the context network's output is added to the estimate: each alone sums to the whole
    x = torch.randn(1, 16, 2, 5, 5)
    with torch.no_grad():
        whole = head(x)
        last = head.context[-1]
        saved = [last.weight.clone(), last.bias.clone()]
        last.weight.zero_(), last.bias.zero_()
        estimate = head(x)
        last.weight.copy_(saved[0]), last.bias.copy_(saved[1])
        head.flow.weight.zero_(), head.flow.bias.zero_()
        refinement = head(x)
    assert torch.allclose(whole, estimate + refinement, atol=1e-5) and refinement.abs().max() > 0


def test_layer_names_all_and_lists():
    network = build_model("s3dg", 3, 2)
    assert probe_motion.probed_layers(network, "all") == list(END_POINTS)
    assert probe_motion.probed_layers(network, "Mixed_4f, Mixed_3c") == ["Mixed_4f", "Mixed_3c"]
    with pytest.raises(OptionError, match="Sequential has none of the end points Conv3d_1a_7x7 ... Mixed_5c"):
        probe_motion.probed_layers(nn.Sequential(nn.Conv3d(3, 4, 1)), "all")


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


@pytest.fixture(scope="module")
def single_run(small_shards, checkpoints, tmp_path_factory) -> tuple[dict, Path]:
    """The spatial decoder on Mixed_3c, two steps, as a command: its last line and its folder (the
    simple decoder runs in test_train.py's end-to-end test)."""
    out = tmp_path_factory.mktemp("single") / "probe"
    args = probe_args(small_shards, checkpoints["rgb"], out, "--decoder", "spatial", "--max-steps", 2)
    result = subprocess.run([sys.executable, str(PROBE), *args], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1]), out


@pytest.fixture(scope="module")
def layers_run(small_shards, checkpoints, tmp_path_factory) -> tuple[dict, dict, Path]:
    """The same on Mixed_3b and Mixed_3c: what main returns, its last line printed, its folder."""
    out = tmp_path_factory.mktemp("layers") / "probe"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(io.StringIO()):
        result = probe_motion.main(probe_args(small_shards, checkpoints["rgb"], out, "--decoder", "spatial", "--max-steps", 2,
                                              "--layer", "Mixed_3b,Mixed_3c"))
    return result, json.loads(printed.getvalue().strip().splitlines()[-1]), out


def assert_png(path: Path, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """The RGB image of a PNG file (checked: signature, decodable, of ``shape`` if given)."""
    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    image = cv2.imread(str(path))
    assert image is not None and (shape is None or image.shape == shape), (path, None if image is None else image.shape)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def test_probe_trains_a_decoder_and_reports_epe_beside_zeros(single_run):
    last, out = single_run
    assert last == json.loads((out / "probe.json").read_text())
    assert last["steps"] == 2 and last["clips"] == 1 and last["output_size"] == [4, 28, 28] and "layers" not in last
    # the held-out video pans 1 px a frame to the left: zeros miss by about that much
    assert 0.5 < last["epe_zeros"] < 1.5 and 0 < last["epe"] < 10
    assert (out / "decoder.pt").is_file()
    assert json.loads((out / "probe_layers.json").read_text()) == [last]
    assert_png(out / "probe_layers.png")


def test_several_layers_each_get_the_decoder_a_run_alone_trains(layers_run, single_run):
    result, last, out = layers_run
    rows = json.loads((out / "probe_layers.json").read_text())
    assert [r["layer"] for r in rows] == ["Mixed_3b", "Mixed_3c"] and [r["feature_channels"] for r in rows] == [256, 480]
    assert last == result == json.loads((out / "probe.json").read_text()) and last["layers"] == rows
    best = min(rows, key=lambda r: r["epe"])
    assert last["layer"] == best["layer"] and (last["epe"], last["epe_zeros"]) == (best["epe"], best["epe_zeros"])
    alone, _ = single_run  # same seed, batches and steps: the Mixed_3c decoder is the one trained alone
    assert rows[1]["epe"] == pytest.approx(alone["epe"], rel=1e-4) and rows[1]["epe_zeros"] == pytest.approx(alone["epe_zeros"], rel=1e-6)
    assert sorted(p.name for p in (out / "decoders").iterdir()) == ["Mixed_3b.pt", "Mixed_3c.pt"] and not (out / "decoder.pt").exists()
    assert_png(out / "probe_layers.png")


def test_pictures_show_decoded_flow_beside_tvl1s(layers_run):
    _, _, out = layers_run
    # one held-out clip (pan_d, 17 flows, centre clip of 8 from frame 4); its middle output step
    # of 4 averages frames 8 and 9
    assert sorted(p.name for p in (out / "pictures").iterdir()) == ["Mixed_3b_pan_d_8.png", "Mixed_3c_pan_d_8.png"]
    for picture in (out / "pictures").iterdir():
        image = assert_png(picture, (112, 2 * 112, 3))
        r, g, b = np.median(image[:, 112:].reshape(-1, 3), axis=0)
        assert r < 64 and g > 128 and b > 128, (r, g, b)  # TV-L1 half: motion to the left is cyan


def test_the_pwc_decoder_probes_a_layer(small_shards, checkpoints, tmp_path, capsys):
    out = tmp_path / "probe"
    result = probe_motion.main(probe_args(small_shards, checkpoints["rgb"], out, "--decoder", "pwc"))
    assert result["decoder"] == "pwc" and result["steps"] == 1 and 0 < result["epe"] < 10 and 0.5 < result["epe_zeros"] < 1.5
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
    state = torch.load(out / "decoder.pt", weights_only=True)
    assert state["layers.context.12.weight"].shape == (2, 32, 1, 3, 3)  # the context network's last convolution


def test_without_matplotlib_the_run_keeps_all_but_its_figure(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    rows = [{"layer": "Mixed_3c", "epe": 0.5, "epe_zeros": 1.0}]
    probe_motion.write_run(tmp_path / "run", rows[0], rows, {"Mixed_3c": FlowDecoder(4, "simple", 8)}, {})
    assert json.loads((tmp_path / "run" / "probe_layers.json").read_text()) == rows
    assert not (tmp_path / "run" / "probe_layers.png").exists()
    assert 'needs matplotlib (pip install "flowprep[plots]")' in capsys.readouterr().err


def test_probe_figure_draws_runs_side_by_side(layers_run, single_run, tmp_path, capsys):
    (_, _, a), (alone, b) = layers_run, single_run
    figure = tmp_path / "figures" / "probe.png"
    probe_figure.main([str(a), str(b), "--labels", "s3dg,d3d", "--out", str(figure)])
    image = assert_png(figure)
    assert image.shape[1] > image.shape[0] > 300
    table = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    assert table[0] == ["layer", "s3dg", "d3d", "zeros"]  # the runs share the zeros: one column
    rows = json.loads((a / "probe_layers.json").read_text())
    assert table[1] == ["Mixed_3b", f"{rows[0]['epe']:.3f}", "-", f"{rows[0]['epe_zeros']:.3f}"]
    assert table[2] == ["Mixed_3c", f"{rows[1]['epe']:.3f}", f"{alone['epe']:.3f}", f"{alone['epe_zeros']:.3f}"]


@pytest.mark.parametrize("case, expected", [
    pytest.param("empty", r".*empty has no probe_layers.json: not a folder of pipelines/probe_motion.py", id="no probe_layers.json"),
    pytest.param("labels", r"argument --labels: 1 labels for 2 runs", id="labels"),
    pytest.param("matplotlib", r'the figure needs matplotlib: pip install "flowprep\[plots\]"', id="no matplotlib"),
])
def test_probe_figure_refusals_are_one_line_with_status_2(layers_run, tmp_path, monkeypatch, capsys, case, expected):
    (tmp_path / "empty").mkdir()
    second = tmp_path / "empty" if case == "empty" else layers_run[2]
    extra = ["--labels", "one"] if case == "labels" else []
    if case == "matplotlib":
        monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(SystemExit) as stop:
        probe_figure.main([str(layers_run[2]), str(second), *extra, "--out", str(tmp_path / "fig.png")])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and len(err.splitlines()) == 1 and re.fullmatch(rf"\S+: error: {expected}\n", err), err
    assert not (tmp_path / "fig.png").exists()


@pytest.mark.parametrize("checkpoint, extra, status, expected", [
    pytest.param("rgb", ["--layer", "Mixed_9z"], 2, "argument --layer: S3DG has no layer 'Mixed_9z'; its layers: Conv3d_1a_7x7, .*Mixed_5c",
                 id="unknown layer"),
    pytest.param("rgb", ["--layer", ""], 2, "argument --layer: S3DG has no layer ''", id="empty layer"),
    pytest.param("rgb", ["--layer", "Mixed_3c,Mixed_9z"], 2, "argument --layer: S3DG has no layer 'Mixed_9z'", id="unknown layer of two"),
    pytest.param("rgb", ["--layer", "Mixed_3c,Mixed_4b,Mixed_3c"], 2, "argument --layer: Mixed_3c named more than once",
                 id="a layer twice"),
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


def test_a_diverging_decoder_among_several_is_named(small_shards, checkpoints, tmp_path, capsys):
    out = tmp_path / "probe"
    with pytest.raises(SystemExit) as stop:
        probe_motion.main(probe_args(small_shards, checkpoints["rgb"], out, "--layer", "Mixed_3b,Mixed_3c", "--lr", "1e30",
                                     "--max-steps", 3, "--batch-size", 1))
    assert stop.value.code == 3
    last = capsys.readouterr().err.splitlines()[-1]
    assert re.fullmatch(r"\S+: error: step 2: the Mixed_3b decoder's loss is inf: nothing written", last), last
    assert not out.exists()
