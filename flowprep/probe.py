"""The D3D paper's motion probe: flow decoders trained on a frozen network's features.

A decoder maps the features ``[B, C, t, h, w]`` of one layer to flow ``[B, 2, t, size, size]``
(``size = crop / OUTPUT_STRIDE``). Every decoder has temporal kernel size 1, so it cannot compute
motion from the features of several time steps: whatever flow it recovers was already in the
features of one. Three decoders (:data:`DECODERS`):

* ``simple``: one 1x1x1 convolution to 2 channels;
* ``spatial``: three 1x3x3 convolutions (ReLU between), then a 1x1x1 one to 2 channels;
* ``pwc``: PWC-Net's flow decoder with temporal kernel 1 (:class:`PWCDecoder`).

Each works at the layer's resolution and is upsampled (trilinear) to ``[t, size, size]``. Targets
are the clip's stored TV-L1 flow area-averaged to that size (:func:`flow_targets`), in pixels of
the clip per frame; the score is the end-point error (:func:`end_point_error`), beside that of an
all-zeros prediction on the same clips.

``pipelines/probe_motion.py`` is the command line; ``pipelines/probe_figure.py`` draws runs side
by side. PyAV and Ray are not imported.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from flowprep.dataset import ClipDataset, ClipSampler
from flowprep.networks import END_POINTS
from flowprep.train import NonFinite
from flowprep.visualize import flow_panel, side_by_side

OUTPUT_STRIDE = 4  # decoder output = crop / 4 pixels a side
PICTURES = 4  # held-out clips drawn per layer
LAYERS_FILE = "probe_layers.json"


class _Tapped(Exception):
    """Stops the forward once every tapped layer has run: the layers above them never run."""


def layer_features(model: nn.Module, layers: Sequence[str], x: Tensor) -> dict[str, Tensor]:
    """The outputs ``{layer: [B, C, t, h, w]}`` of ``model``'s submodules ``layers`` (dotted names)
    for input ``x``, in the order of ``layers``; the forward stops once all of them have run."""
    outputs: dict[str, Tensor] = {}

    def tap(name: str):
        def record(module, args, output):
            outputs.setdefault(name, output)
            if len(outputs) == len(layers):
                raise _Tapped

        return record

    handles = [model.get_submodule(name).register_forward_hook(tap(name)) for name in layers]
    try:
        model(x)
    except _Tapped:
        pass
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name in layers if name not in outputs]
    if missing:
        raise RuntimeError(f"layer(s) {', '.join(missing)} did not run")
    return {name: outputs[name] for name in layers}


def end_points(model: nn.Module) -> list[str]:
    """The Inception-v1 end points (``Conv3d_1a_7x7`` ... ``Mixed_5c``) ``model`` has, in order."""
    modules = dict(model.named_children())
    return [name for name in END_POINTS if name in modules]


def conv1x3x3(in_channels: int, out_channels: int, dilation: int = 1) -> nn.Conv3d:
    """A spatial 3x3 convolution (temporal kernel 1) that keeps ``[t, h, w]``."""
    return nn.Conv3d(in_channels, out_channels, (1, 3, 3), padding=(0, dilation, dilation), dilation=(1, dilation, dilation))


class PWCDecoder(nn.Module):
    """PWC-Net's flow estimator and context network (Sun et al. 2018; NVlabs/PWC-Net) with every
    kernel 1x3x3, on features ``[B, C, t, h, w]``, to flow ``[B, 2, t, h, w]``.

    Densely connected convolutions: each takes the concatenation of the input and every earlier
    output (``C + 448`` channels after the last); a convolution of those to the flow estimate;
    the context network (dilated convolutions on the same concatenation) adds its output to the
    estimate. LeakyReLU 0.1 after every convolution but the two that output flow; no batch norm."""

    DENSE = (128, 128, 96, 64, 32)
    CONTEXT = ((128, 1), (128, 2), (128, 4), (96, 8), (64, 16), (32, 1))  # (channels, dilation)

    def __init__(self, channels: int):
        super().__init__()
        self.dense = nn.ModuleList()
        for width in self.DENSE:
            self.dense.append(nn.Sequential(conv1x3x3(channels, width), nn.LeakyReLU(0.1)))
            channels += width
        self.flow = conv1x3x3(channels, 2)
        context: list[nn.Module] = []
        for width, dilation in self.CONTEXT:
            context += [conv1x3x3(channels, width, dilation), nn.LeakyReLU(0.1)]
            channels = width
        self.context = nn.Sequential(*context, conv1x3x3(channels, 2))

    def forward(self, x: Tensor) -> Tensor:
        for conv in self.dense:
            x = torch.cat([conv(x), x], dim=1)  # newest first, as PWC-Net concatenates
        return self.flow(x) + self.context(x)


def _spatial(channels: int, width: int = 128) -> nn.Sequential:
    return nn.Sequential(conv1x3x3(channels, width), nn.ReLU(), conv1x3x3(width, width), nn.ReLU(),
                         conv1x3x3(width, width), nn.ReLU(), nn.Conv3d(width, 2, 1))


_HEADS: dict[str, Callable[[int], nn.Module]] = {"simple": lambda channels: nn.Conv3d(channels, 2, 1),
                                                 "spatial": _spatial, "pwc": PWCDecoder}
DECODERS = tuple(_HEADS)


class FlowDecoder(nn.Module):
    """Features ``[B, C, t, h, w] float32`` to flow ``[B, 2, t, size, size] float32`` (pixels of
    the clip per frame): the ``kind`` head (one of :data:`DECODERS`) at the features' resolution,
    upsampled over space."""

    def __init__(self, channels: int, kind: str, size: int):
        super().__init__()
        if kind not in _HEADS:
            raise ValueError(f"decoder must be one of {', '.join(DECODERS)}, not {kind!r}")
        self.layers = _HEADS[kind](channels)
        self.channels, self.size = channels, size

    def forward(self, features: Tensor) -> Tensor:
        out = self.layers(features)
        return F.interpolate(out, size=(out.shape[2], self.size, self.size), mode="trilinear", align_corners=False)


def flow_targets(flow: Tensor, bound: float, shape: tuple[int, int, int]) -> Tensor:
    """ClipDataset flow ``[B, 2, T, crop, crop]`` in [-1, 1] to pixels, area-averaged to ``shape`` ``(t, size, size)``."""
    return F.adaptive_avg_pool3d(flow * bound, shape)


def end_point_error(pred: Tensor, target: Tensor) -> Tensor:
    """Mean over positions of ``|pred - target|_2`` (channel dim 1), pixels."""
    return (pred - target).square().sum(1).sqrt().mean()


@dataclass
class ProbeInputs:
    """What the probe reads and how: the frozen network's input ``modality`` (``"rgb"`` or
    ``"flow"``), the stored flow's ``bound`` (pixels at 1.0), and the loader's options."""

    modality: str
    bound: float
    batch_size: int
    num_workers: int
    device: torch.device

    def batches(self, dataset: ClipDataset, sampler=None) -> DataLoader:
        """``dataset``'s batches, in the ``sampler``'s order (default: item order)."""
        return DataLoader(dataset, self.batch_size, sampler=sampler, num_workers=self.num_workers)

    def features(self, network: nn.Module, layers: Sequence[str], batch: dict) -> dict[str, Tensor]:
        """:func:`layer_features` of ``batch``'s input on the device, without autograd (the network is frozen)."""
        with torch.no_grad():
            return layer_features(network, layers, batch[self.modality].to(self.device))


def make_decoders(network: nn.Module, layers: Sequence[str], kind: str, clips: ClipDataset, inputs: ProbeInputs,
                  seed: int) -> dict[str, FlowDecoder]:
    """A ``kind`` decoder for each layer, sized by the features of ``clips[0]``; each initialised
    from ``seed`` alone, so a layer's decoder is the same whichever layers are probed with it."""
    sample = {inputs.modality: clips[0][inputs.modality][None]}
    size = clips.crop // OUTPUT_STRIDE
    decoders = {}
    for layer, features in inputs.features(network, layers, sample).items():
        torch.manual_seed(seed)
        decoders[layer] = FlowDecoder(features.shape[1], kind, size).to(inputs.device)
    return decoders


def train_decoders(network: nn.Module, decoders: dict[str, FlowDecoder], clips: ClipDataset, inputs: ProbeInputs, *,
                   lr: float, max_steps: int, seed: int, log: Callable[[dict], None]) -> int:
    """Train every decoder (Adam, ``lr``) on the EPE to ``clips``' flow for ``max_steps`` batches
    of the :class:`ClipSampler` order of ``seed``; returns the steps run. Each decoder sees the
    batches and steps it would see alone: the frozen network runs once a batch for all of them.
    ``log`` gets ``{"step", "epe_train"}`` each step (with several layers ``epe_train`` is a dict
    by layer). A loss that is not finite raises :class:`NonFinite` naming the step."""
    optimizers = {layer: torch.optim.Adam(decoder.parameters(), lr) for layer, decoder in decoders.items()}
    for decoder in decoders.values():
        decoder.train()
    sampler, step, epoch = ClipSampler(clips, num_replicas=1, rank=0, seed=seed), 0, 0
    while step < max_steps:
        sampler.set_epoch(epoch)
        for batch in inputs.batches(clips, sampler):
            features = inputs.features(network, list(decoders), batch)
            flow = batch["flow"].to(inputs.device)
            step += 1
            losses = {}
            for layer, decoder in decoders.items():
                pred = decoder(features[layer])
                loss = end_point_error(pred, flow_targets(flow, inputs.bound, pred.shape[2:]))
                optimizers[layer].zero_grad()
                loss.backward()
                optimizers[layer].step()
                value = loss.item()  # one device sync a decoder and step
                if not math.isfinite(value):
                    name = "decoder" if len(decoders) == 1 else f"{layer} decoder"
                    raise NonFinite(f"step {step}: the {name}'s loss is {value}")
                losses[layer] = round(value, 4)
            log({"step": step, "epe_train": next(iter(losses.values())) if len(losses) == 1 else losses})
            if step == max_steps:
                break
        epoch += 1
    return step


def flow_picture(decoded: Tensor, tvl1: Tensor, crop: int) -> np.ndarray:
    """``[crop, 2 * crop, 3] uint8``: decoded flow ``[2, h, w]`` beside TV-L1's ``[2, h, w]``
    (pixels), each enlarged to ``crop x crop`` (nearest: one block per output cell) in the
    Middlebury colour coding of ``flowprep show``, at one scale: the 99th percentile of TV-L1's
    magnitude (at least 1 px) is full colour."""
    scale = max(1.0, float(torch.quantile(tvl1.norm(dim=0).flatten(), 0.99)))
    enlarged = F.interpolate(torch.stack([decoded, tvl1]).float().cpu(), size=(crop, crop), mode="nearest")
    panels = [flow_panel(flow.permute(1, 2, 0).numpy(), scale) for flow in enlarged]
    return side_by_side(panels, ["decoded", f"TV-L1 {scale:.1f} px"])


def evaluate_decoders(network: nn.Module, decoders: dict[str, FlowDecoder], held_out: ClipDataset, inputs: ProbeInputs,
                      max_clips: int) -> tuple[dict[str, dict], int, dict[str, np.ndarray]]:
    """The held-out EPE of every decoder and of zeros, over ``held_out``'s items in order, batch by
    batch until ``max_clips`` are counted: ``({layer: {"epe", "epe_zeros", "output_size"}}, clips,
    pictures)``. ``pictures`` maps ``<layer>_<video>_<frame>.png`` to a :func:`flow_picture` of
    each of the first :data:`PICTURES` clips at the middle output step, whose flow averages the
    clip's frames from ``frame`` (an index into the video) on."""
    sums = {layer: [0.0, 0.0] for layer in decoders}
    shapes: dict[str, list[int]] = {}
    pictures: dict[str, np.ndarray] = {}
    count = 0
    for decoder in decoders.values():
        decoder.eval()
    with torch.no_grad():
        for batch in inputs.batches(held_out):
            features = inputs.features(network, list(decoders), batch)
            flow = batch["flow"].to(inputs.device)
            for layer, decoder in decoders.items():
                pred = decoder(features[layer])
                target = flow_targets(flow, inputs.bound, pred.shape[2:])
                n, t = len(target), target.shape[2]
                middle = t // 2
                first = middle * flow.shape[2] // t  # the first clip frame that output step averages
                sums[layer][0] += end_point_error(pred, target).item() * n
                sums[layer][1] += end_point_error(torch.zeros_like(target), target).item() * n
                shapes[layer] = list(pred.shape[2:])
                for i in range(min(n, PICTURES - count)):
                    positions = held_out.meta(count + i)["num_frames"] - 1  # frames with a flow: a clip wraps there
                    frame = (int(batch["start"][i]) + first) % positions
                    name = f"{layer}_{batch['video_id'][i]}_{frame}.png"
                    pictures[name] = flow_picture(pred[i, :, middle], target[i, :, middle], held_out.crop)
            count += n
            if count >= max_clips:
                break
    results = {layer: {"epe": epe / count, "epe_zeros": zeros / count, "output_size": shapes[layer]}
               for layer, (epe, zeros) in sums.items()}
    return results, count, pictures


def read_layers(run: Path) -> list[dict]:
    """``run/probe_layers.json``: a list of ``{"layer", "epe", "epe_zeros", ...}``, one per layer
    probed; a ``ValueError`` (one line) for a run without one or a file of another form."""
    path = Path(run) / LAYERS_FILE
    if not path.is_file():
        raise ValueError(f"{run} has no {LAYERS_FILE}: not a folder of pipelines/probe_motion.py")
    try:
        rows = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} cannot be read: {e}") from None

    def valid(row) -> bool:
        return (isinstance(row, dict) and isinstance(row.get("layer"), str)
                and all(isinstance(row.get(key), (int, float)) for key in ("epe", "epe_zeros")))

    if not (isinstance(rows, list) and rows and all(map(valid, rows))):
        raise ValueError(f"{path} is not a list of {{layer, epe, epe_zeros}} objects")
    return rows


def layer_order(curves: Sequence[Sequence[dict]]) -> list[str]:
    """Every layer of ``curves`` once: end points in network order, then other layers (dotted
    paths, a custom network's) in the order they first appear."""
    names = list(dict.fromkeys(row["layer"] for rows in curves for row in rows))
    return sorted(names, key=lambda name: END_POINTS.index(name) if name in END_POINTS else len(END_POINTS))


def shared_zeros(curves: Sequence[tuple[str, Sequence[dict]]]) -> dict[str, float] | None:
    """``{layer: epe_zeros}`` over every layer of ``curves`` when the runs agree on it wherever they
    share a layer (to 0.1%: runs of one architecture on the same held-out clips do), else None."""
    zeros: dict[str, float] = {}
    for _, rows in curves:
        for r in rows:
            if not math.isclose(zeros.setdefault(r["layer"], r["epe_zeros"]), r["epe_zeros"], rel_tol=1e-3):
                return None
    return zeros


def plot_layers(curves: Sequence[tuple[str, Sequence[dict]]], path: Path) -> None:
    """Draw ``path``: EPE per layer of each ``(label, rows)`` (rows as in ``probe_layers.json``),
    one line each, and the all-zeros prediction's EPE dashed: one grey line when the runs share it
    (:func:`shared_zeros`), else one per run in its colour. Needs matplotlib (ImportError)."""
    from matplotlib.figure import Figure

    order = layer_order([rows for _, rows in curves])
    figure = Figure(figsize=(max(5.0, 1.5 + 0.5 * len(order)), 4.2), layout="constrained")
    axes = figure.subplots()

    def draw(values: dict[str, float], **style):
        x = sorted(order.index(layer) for layer in values)
        return axes.plot(x, [values[order[i]] for i in x], **style)[0]

    lines = [draw({r["layer"]: r["epe"] for r in rows}, marker="o", label=label) for label, rows in curves]
    zeros = shared_zeros(curves)
    if zeros is not None:
        draw(zeros, linestyle="--", color="grey", label="zeros")
    else:
        for (label, rows), line in zip(curves, lines):
            draw({r["layer"]: r["epe_zeros"] for r in rows}, linestyle="--", color=line.get_color(), label=f"zeros ({label})")
    highest = max(max(r["epe"], r["epe_zeros"]) for _, rows in curves for r in rows)
    axes.set_xticks(range(len(order)), order, rotation=45, ha="right")
    axes.set_xlim(-0.5, len(order) - 0.5)
    axes.set_ylim(0, 1.1 * highest or 1)  # from 0: the distance to the zeros line reads as a fraction of it
    axes.set_ylabel("EPE, held-out clips (px per frame)")
    axes.legend()
    figure.savefig(path, dpi=150)
