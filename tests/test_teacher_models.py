"""I3D and S3D-G: shapes, parameter counts, equality with pytorch-i3d, checkpoints and output taps."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from flowprep.networks import (
    END_POINTS,
    MODELS,
    S3DG,
    CheckpointMismatch,
    InceptionI3d,
    OutputTaps,
    build_model,
    checkpoint_num_classes,
    load_state,
    load_weights,
    sequence_logits,
)

# Made once from piergiaj/pytorch-i3d (commit 05783d1, pytorch_i3d.py): the state-dict shapes of
# their InceptionI3d(400, in_channels=2) and its eval output, with seeded_state_dict() loaded, on
# seeded_input(run["input_seed"], run["input_shape"]), squeezed as their forward does.
PYTORCH_I3D = Path(__file__).parent / "data" / "pytorch_i3d_flow.json"

# torchvision's S3D_Weights.KINETICS400_V1 "num_params": S3D without gating, 400 classes, RGB.
TORCHVISION_S3D_PARAMS = 8_320_048

END_POINT_SHAPES_16x224 = {
    "Conv3d_1a_7x7": [64, 8, 112, 112],
    "MaxPool3d_2a_3x3": [64, 8, 56, 56],
    "Conv3d_2c_3x3": [192, 8, 56, 56],
    "MaxPool3d_3a_3x3": [192, 8, 28, 28],
    "Mixed_3c": [480, 8, 28, 28],
    "MaxPool3d_4a_3x3": [480, 4, 14, 14],
    "Mixed_4f": [832, 4, 14, 14],
    "MaxPool3d_5a_2x2": [832, 2, 7, 7],
    "Mixed_5c": [1024, 2, 7, 7],
}

# Outputs gated in S3D-G: Conv3d_2c_3x3, then b0, b1b, b2b, b3b of each block, Mixed_3b to Mixed_5c.
GATED_CHANNELS = [192] + [
    64, 128, 32, 32,
    128, 192, 96, 64,
    192, 208, 48, 64,
    160, 224, 64, 64,
    128, 256, 64, 64,
    112, 288, 64, 64,
    256, 320, 128, 128,
    256, 320, 128, 128,
    384, 384, 128, 128,
]

def seeded_state_dict(shapes: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    """Deterministic weights that keep activations near unit scale: one generator (seed 0) drawn
    in sorted key order; conv weights N(0, 2 / fan_in), BN weight 1 + 0.1 N, biases and running
    means 0.1 N, running variances 1 + 0.1 |N|, batch counters 0."""
    generator = torch.Generator().manual_seed(0)
    state = {}
    for key in sorted(shapes):
        shape = shapes[key]
        if key.endswith("num_batches_tracked"):
            state[key] = torch.zeros(shape, dtype=torch.long)
            continue
        n = torch.randn(shape, generator=generator)
        if key.endswith("running_var"):
            state[key] = 1 + 0.1 * n.abs()
        elif key.endswith("bn.weight"):
            state[key] = 1 + 0.1 * n
        elif key.endswith(("bias", "running_mean")):
            state[key] = 0.1 * n
        else:
            state[key] = n * math.sqrt(2 / math.prod(shape[1:]))
    return state


def seeded_input(seed: int, shape: list[int]) -> torch.Tensor:
    """``shape`` uniform in [-1, 1) from ``torch.Generator().manual_seed(seed)``."""
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def shapes_of(state: dict[str, torch.Tensor]) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in state.items()}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class TinyNet(nn.Module):
    """A user model returning clip logits ``[B, C]``, without ``classifier_name``."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.conv = nn.Conv3d(in_channels, num_classes, 1)

    def forward(self, x):
        return self.conv(x).mean(dim=(2, 3, 4))


TINY_CALLS = []


def tiny_factory(**kwargs):
    TINY_CALLS.append(kwargs)
    return TinyNet(**kwargs)


@pytest.fixture(scope="module")
def pytorch_i3d():
    return json.loads(PYTORCH_I3D.read_text())


def test_i3d_state_dict_is_pytorch_i3d(pytorch_i3d):
    assert shapes_of(InceptionI3d(400, in_channels=2).state_dict()) == pytorch_i3d["state_dict"]


@pytest.mark.parametrize("run", [0, 1], ids=["224x16", "256x24"])
def test_i3d_computes_what_pytorch_i3d_computes(pytorch_i3d, run):
    run = pytorch_i3d["runs"][run]
    model = InceptionI3d(400, in_channels=2).eval()
    load_weights(model, seeded_state_dict(pytorch_i3d["state_dict"]))
    with torch.no_grad():
        ours = model(seeded_input(run["input_seed"], run["input_shape"]))
    theirs = torch.tensor(run["output"]).reshape(run["output_shape"])
    if theirs.dim() == 5:  # crops over 224 leave them [B, C, T', h, w]; we average the positions
        theirs = theirs.mean(dim=(3, 4))
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4 * theirs.abs().max().item())


@pytest.mark.parametrize("name, in_channels", [("i3d", 2), ("s3dg", 3)])
def test_output_and_end_point_shapes_at_224(name, in_channels):
    model = build_model(name, in_channels, num_classes=400).eval()
    seen = {}
    for end_point in END_POINT_SHAPES_16x224:
        model.get_submodule(end_point).register_forward_hook(
            lambda _m, _a, out, end_point=end_point: seen.__setitem__(end_point, list(out.shape[1:])))
    with torch.no_grad():
        out = model(seeded_input(0, [1, in_channels, 16, 224, 224]))
    assert out.shape == (1, 400, 1)
    assert seen == END_POINT_SHAPES_16x224


@pytest.mark.parametrize("name, in_channels, shape, t_out", [
    ("i3d", 2, [2, 8, 112, 112], 1),
    ("i3d", 3, [1, 32, 112, 112], 3),
    ("i3d", 3, [1, 9, 130, 130], 1),
    ("s3dg", 3, [2, 8, 112, 112], 1),
    ("s3dg", 2, [1, 32, 112, 112], 3),
    ("s3dg", 2, [1, 9, 130, 130], 1),
])
def test_small_clips(name, in_channels, shape, t_out):
    model = build_model(name, in_channels, num_classes=10).eval()
    batch, *rest = shape
    with torch.no_grad():
        out = model(seeded_input(0, [batch, in_channels, *rest]))
    assert out.shape == (batch, 10, t_out)
    assert torch.isfinite(out).all()


def test_end_points_and_classifier_are_named_like_pytorch_i3d():
    for model in (build_model(name, in_channels=3, num_classes=400) for name in MODELS):
        assert [n for n, _ in model.named_children() if n in END_POINTS] == list(END_POINTS)
        assert model.classifier_name == "logits" and model.logits.conv3d.bias is not None


def test_i3d_parameter_count(pytorch_i3d):
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    theirs = sum(math.prod(s) for k, s in pytorch_i3d["state_dict"].items() if not k.endswith(buffers))
    assert n_params(InceptionI3d(400, in_channels=2)) == theirs == 12_675_312
    assert n_params(InceptionI3d(400, in_channels=3)) == 12_697_264


def test_s3d_parameter_count_matches_torchvision():
    # torchvision's S3D also makes the stem separable (1x7x7 conv 3->64 + BN, 7x1x1 conv 64->64 + BN);
    # TF-slim's and ours is one full 7x7x7 conv 3->64 + BN. Everything else has the same layout
    # (BN after both halves of each separable conv, 1024->400 classifier with bias).
    ours_stem = 3 * 64 * 7 * 7 * 7 + 2 * 64
    torchvision_stem = 3 * 64 * 1 * 7 * 7 + 2 * 64 + 64 * 64 * 7 + 2 * 64
    s3d = S3DG(400, in_channels=3, gating=False, first_temporal_kernel=7)
    assert n_params(s3d) == TORCHVISION_S3D_PARAMS + ours_stem - torchvision_stem == 8_347_696


def test_gating_parameters():
    for in_channels, first_temporal_kernel in ((2, 3), (3, 7)):
        plain = S3DG(400, in_channels, gating=False, first_temporal_kernel=first_temporal_kernel)
        gated = S3DG(400, in_channels, gating=True, first_temporal_kernel=first_temporal_kernel)
        assert n_params(gated) - n_params(plain) == sum(c * c + c for c in GATED_CHANNELS)


def test_load_weights_names_every_mismatch():
    model = InceptionI3d(10, in_channels=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = InceptionI3d(400, in_channels=2).state_dict()
    for key in ("Mixed_3b.b0.conv3d.weight", "Mixed_3b.b0.bn.bias", "Conv3d_1a_7x7.bn.running_var"):
        del state[key]
    state["extra.weight"] = torch.zeros(1)
    state["Mixed_3b.b9.conv3d.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointMismatch) as err:
        load_weights(model, state)
    message = str(err.value)
    assert "3 missing keys (" in message and "Conv3d_1a_7x7.bn.running_var" in message
    assert "2 unexpected keys (" in message and "extra.weight" in message
    assert "2 shape mismatches (" in message and "logits.conv3d.bias: checkpoint [400], model [10]" in message
    assert "logits.conv3d.weight: checkpoint [400, 1024, 1, 1, 1], model [10, 1024, 1, 1, 1]" in message
    assert isinstance(err.value, ValueError)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing loaded


def test_load_weights_takes_checkpoints_without_batch_counters():
    source, model = S3DG(10, 2), S3DG(10, 2)
    state = {k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    load_weights(model, state)
    assert torch.equal(model.logits.conv3d.weight, source.logits.conv3d.weight)
    state["Conv3d_2b_1x1.bn.num_batches_tracked"] = torch.tensor(0)  # now the others are missing
    with pytest.raises(CheckpointMismatch, match="missing keys"):
        load_weights(model, state)


def test_load_state_unwraps(tmp_path):
    state = InceptionI3d(7, in_channels=2).state_dict()
    wrapped = {
        "plain.pt": state,
        "lightning.ckpt": {"state_dict": state, "epoch": 3},
        "ddp.pth": {"model": {f"module.{k}": v for k, v in state.items()}, "optimizer": {}},
    }
    for name, content in wrapped.items():
        torch.save(content, tmp_path / name)
        loaded = load_state(tmp_path / name)
        assert list(loaded) == list(state) and all(torch.equal(loaded[k], state[k]) for k in state)
        assert checkpoint_num_classes(loaded) == 7
    assert checkpoint_num_classes({"logits.conv3d.weight": torch.zeros(5, 1024, 1, 1, 1)}) == 5
    assert checkpoint_num_classes({"fc.weight": torch.zeros(5, 3)}) is None
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="no state dict"):
        load_state(tmp_path / "list.pt")


@pytest.mark.parametrize("name, in_channels", [("i3d", 2), ("s3dg", 3)])
def test_output_taps(name, in_channels):
    model = build_model(name, in_channels, num_classes=10).eval()
    with torch.no_grad():
        with OutputTaps(model, ("logits", "embedding", "Mixed_4f")) as taps:
            out = model(seeded_input(0, [2, in_channels, 8, 112, 112]))
            values = taps.collect(out)
        assert list(values) == ["logits", "embedding", "Mixed_4f"]
        assert [list(v.shape) for v in values.values()] == [[2, 10], [2, 1024], [2, 832]]
        assert torch.equal(values["logits"], sequence_logits(out))
        # the classifier is linear, so it commutes with the mean over positions and time
        by_hand = model.logits(values["embedding"][:, :, None, None, None]).flatten(1)
    torch.testing.assert_close(by_hand, values["logits"], rtol=1e-5, atol=1e-5)
    assert not model.logits._forward_pre_hooks and not model.Mixed_4f._forward_hooks


def test_output_taps_refuses_unknown_names():
    model = S3DG(10, 2)
    with pytest.raises(ValueError, match="valid: logits, embedding, Conv3d_1a_7x7, .*Mixed_5c"):
        OutputTaps(model, ("logits", "Mixed_9z"))
    with pytest.raises(ValueError, match="classifier_name"):
        OutputTaps(TinyNet(2, 4), ("embedding",))


def test_build_model_from_a_factory():
    TINY_CALLS.clear()
    model = build_model(f"{__name__}:tiny_factory", in_channels=2, num_classes=4)
    assert isinstance(model, TinyNet) and TINY_CALLS == [{"in_channels": 2, "num_classes": 4}]
    x = seeded_input(0, [3, 2, 8, 112, 112])
    with OutputTaps(model, ("logits",)) as taps:
        out = model(x)
        assert list(taps.collect(out)["logits"].shape) == [3, 4]
    assert torch.equal(sequence_logits(out), out)


@pytest.mark.parametrize("spec, match", [
    ("resnet", "unknown model 'resnet'"),
    ("no_such_module_xyz:make", "cannot import no_such_module_xyz"),
    (f"{__name__}:no_such_factory", "no callable 'no_such_factory'"),
    (f"{__name__}:", "unknown model"),
])
def test_build_model_refuses_bad_specs(spec, match):
    with pytest.raises(ValueError, match=match):
        build_model(spec, in_channels=2, num_classes=4)
