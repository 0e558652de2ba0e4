"""The teacher network on one device: :class:`TeacherModel` turns the stored flow of work items
(:class:`~flowprep.teacher.items.FlowWindows`) into each view's outputs, building every input on
the device exactly as :class:`~flowprep.dataset.ClipDataset` builds that view's flow clip."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from flowprep.clips import float_flow, flow_lookup_tables
from flowprep.networks import OutputTaps, build_model, load_weights
from flowprep.teacher.items import FlowWindows, Segment
from flowprep.teacher.views import View, ViewGrid

STORED = ("float16; logits: the model's output averaged over time; embedding: the classifier's input, globally "
          "average-pooled; an end point: its output, globally average-pooled")
FLOW_INPUT = "flow as ClipDataset gives it: uint8 q -> q / 127.5 - 1 (float16 shards: pixels / bound, clipped to [-1, 1]), flipped clips mirrored with x negated; [B, 2, T, crop, crop]"


@dataclass(frozen=True)
class TeacherConfig:
    """What the targets depend on. ``model``: ``i3d``, ``s3dg`` or ``package.module:factory``;
    ``checkpoint``: a state-dict file (``None`` only for a factory that loads its own weights);
    ``outputs``: ``logits``, ``embedding`` and/or end-point names."""

    model: str
    checkpoint: str | None
    grid: ViewGrid = ViewGrid()
    outputs: tuple[str, ...] = ("logits",)
    num_classes: int | None = None
    batch_size: int = 8
    device: str = "auto"


@dataclass
class SegmentOutputs:
    """A segment's outputs, name -> ``[V, dim]`` float16; or ``error`` and the ``stage`` it came
    from: ``read`` (its stored flow), ``model`` (the model raised), ``worker`` (lost with its
    worker on every attempt: never settled, a rerun computes it)."""

    segment: Segment
    outputs: dict[str, np.ndarray] | None
    error: str | None = None
    stage: str | None = None


class TeacherModel:
    """A teacher network in eval mode on one device, run over :class:`FlowWindows` in batches.

    Inputs are built on the device from the stored flow: crop, mirror, and the lookup tables of
    :class:`ClipDataset`, so a stored target is the model's output on ClipDataset's clip of that view.
    """

    def __init__(self, config: TeacherConfig, state: dict | None, num_classes: int, flow_bound: float,
                 device: str = "cpu", threads: int | None = None):
        if threads:
            torch.set_num_threads(threads)
        self.config, self.device, self.flow_bound = config, torch.device(device), flow_bound
        self.model = build_model(config.model, 2, num_classes)
        if state is not None:
            load_weights(self.model, state)
        self.model.eval().to(self.device)
        self.luts = {flip: torch.from_numpy(t).to(self.device) for flip, t in flow_lookup_tables().items()}

    def output_dims(self) -> dict[str, int]:
        """Each output's size, from one forward on a zero clip."""
        grid = self.config.grid
        zeros = torch.zeros(1, 2, grid.clip_len, grid.crop, grid.crop, device=self.device)
        return {name: value.shape[1] for name, value in self.forward(zeros).items()}

    def forward(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """``[B, 2, T, crop, crop]`` float32 -> name -> ``[B, dim]`` float32."""
        with torch.inference_mode(), torch.autocast("cuda", torch.float16, enabled=self.device.type == "cuda"):
            with OutputTaps(self.model, self.config.outputs) as taps:
                return {k: v.float() for k, v in taps.collect(self.model(batch)).items()}

    def clip(self, frames: torch.Tensor, rows: np.ndarray, view: View) -> torch.Tensor:
        """One view's input ``[2, T, crop, crop]`` float32 from a segment's ``[F, H, W, 2]`` frames."""
        crop = self.config.grid.crop
        x = frames[torch.tensor(rows, device=self.device), view.top : view.top + crop, view.left : view.left + crop]
        if view.flip:
            x = x.flip(2)
        x = x.permute(3, 0, 1, 2)
        if x.dtype == torch.uint8:
            lut = self.luts[view.flip]
            return torch.stack([lut[0][x[0].long()], lut[1][x[1].long()]])
        return float_flow(x, self.flow_bound, view.flip)

    def run(self, windows: list[FlowWindows]) -> list[SegmentOutputs]:
        """Outputs of every view of ``windows``, batches of ``batch_size`` across segments."""
        good = [w for w in windows if w.error is None]
        # Copied: windows from Ray's object store are read-only.
        frames = [torch.from_numpy(w.frames.copy()).to(self.device) for w in good]
        todo = [(i, v) for i, w in enumerate(good) for v in range(len(w.segment.views))]
        results: list[dict[str, torch.Tensor]] = []
        for b in range(0, len(todo), self.config.batch_size):
            batch = torch.stack([self.clip(frames[i], good[i].rows[v], good[i].segment.views[v]) for i, v in todo[b : b + self.config.batch_size]])
            results.append(self.forward(batch))
        merged = {k: torch.cat([r[k] for r in results]).half().cpu().numpy() for k in results[0]} if results else {}
        out, row = [], 0
        for w in windows:
            if w.error is not None:
                out.append(SegmentOutputs(w.segment, None, w.error, "read"))
                continue
            n = len(w.segment.views)
            values = {k: v[row : row + n] for k, v in merged.items()}
            row += n
            bad = sorted(k for k, v in values.items() if not np.isfinite(v).all())
            if bad:  # a broken model, or beyond float16's range: never a stored target
                out.append(SegmentOutputs(w.segment, None, f"the model's {', '.join(bad)} are not finite (NaN or beyond float16)", "model"))
            else:
                out.append(SegmentOutputs(w.segment, values))
        return out
