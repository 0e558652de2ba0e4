"""How much motion a network's features hold: the D3D paper's probe.

Freeze a trained 3D CNN, train a small decoder to predict TV-L1 flow from its features at one
layer, and report the decoder's end-point error (EPE) against the stored flow on held-out clips,
beside an all-zeros prediction on the same clips. The decoders have temporal kernel size 1, so
whatever motion they recover was already in the features.

* ``simple``: one 1x1x1 convolution to 2 channels;
* ``spatial``: three 1x3x3 convolutions (ReLU between), then to 2 channels;

both upsampled (trilinear) from the layer's ``[t, h, w]`` to ``[t, crop / 4, crop / 4]``.

Targets: the clip's stored flow resampled to that output size by area averaging, over space and
over the frames each output step covers. Flow values are **not** rescaled: they stay in pixels of
the clip (crop resolution) per frame, so EPE reads in the same pixels as the shards' flow (in
pixels of the output grid they would be 4x smaller). The network sees RGB when its checkpoint
takes 3 channels, flow when 2.

    python pipelines/probe_motion.py --shards k400/train --checkpoint run/checkpoint.pt --model s3dg \\
        --layer Mixed_4f --decoder simple --out probe-4f --max-steps 2000 --batch-size 8 \\
        --clip-len 64 --crop 224 --device cuda

The last line printed is a JSON object with ``epe`` and ``epe_zeros`` (also ``RUN_DIR/probe.json``).

Exit status: 0 when the probe ran; 2 on bad usage (an option out of range, a layer the network
does not have, a split without videos, a crop larger than the frames, ...: one line naming the
option); 1 when the checkpoint cannot be used (unreadable, no state dict, not the network of
--model); 3 when the decoder's loss or the EPE is not finite (nothing is written).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from flowprep import ClipDataset, ClipSampler, train
from flowprep.devices import resolve_device
from flowprep.errors import OptionError
from flowprep.networks import MODALITY_CHANNELS, CheckpointMismatch, checkpoint_modality, checkpoint_num_classes, load_state, load_weights
from flowprep.process import run_and_exit

OUTPUT_STRIDE = 4  # decoder output = crop / 4 pixels a side
EXIT_CHECKPOINT = 1


class UnusableCheckpoint(ValueError):
    """A ``--checkpoint`` the probe cannot use (exit status 1)."""


class _Features(Exception):
    """Carries the tapped layer's output out of the forward: the layers above it never run."""

    def __init__(self, value: torch.Tensor):
        self.value = value


def layer_features(model: nn.Module, layer: str, x: torch.Tensor) -> torch.Tensor:
    """The output ``[B, C, t, h, w]`` of ``model``'s submodule ``layer`` for input ``x``."""

    def stop(module, args, output):
        raise _Features(output)

    handle = model.get_submodule(layer).register_forward_hook(stop)
    try:
        model(x)
    except _Features as tapped:
        return tapped.value
    finally:
        handle.remove()
    raise RuntimeError(f"layer {layer} did not run")


class FlowDecoder(nn.Module):
    """Features ``[B, C, t, h, w]`` to flow ``[B, 2, t, size, size]`` (pixels of the clip); temporal kernel 1."""

    def __init__(self, channels: int, kind: str, size: int, width: int = 128):
        super().__init__()
        if kind == "simple":
            self.layers = nn.Conv3d(channels, 2, 1)
        elif kind == "spatial":
            conv = lambda cin, cout: nn.Conv3d(cin, cout, (1, 3, 3), padding=(0, 1, 1))  # noqa: E731
            self.layers = nn.Sequential(conv(channels, width), nn.ReLU(), conv(width, width), nn.ReLU(),
                                        conv(width, width), nn.ReLU(), nn.Conv3d(width, 2, 1))
        else:
            raise ValueError(f"decoder must be simple or spatial, not {kind!r}")
        self.size = size

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        out = self.layers(features)
        return F.interpolate(out, size=(out.shape[2], self.size, self.size), mode="trilinear", align_corners=False)


def flow_targets(flow: torch.Tensor, bound: float, shape: tuple[int, int, int]) -> torch.Tensor:
    """ClipDataset flow ``[B, 2, T, crop, crop]`` in [-1, 1] to pixels, area-averaged to ``shape`` ``(t, size, size)``."""
    return F.adaptive_avg_pool3d(flow * bound, shape)


def end_point_error(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over positions of ``|pred - target|_2`` (channel dim 1), pixels."""
    return (pred - target).square().sum(1).sqrt().mean()


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    positive = train.number(int, 1)
    parser.add_argument("--shards", nargs="+", required=True)
    parser.add_argument("--checkpoint", required=True, type=Path)
    parser.add_argument("--model", required=True, help="s3dg, i3d or package.module:factory")
    parser.add_argument("--num-classes", type=positive, help="classes of the network (default: the checkpoint's)")
    parser.add_argument("--layer", required=True, help="an end point, e.g. Mixed_3c, Mixed_4f, Mixed_5c")
    parser.add_argument("--decoder", choices=("simple", "spatial"), default="simple")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--max-steps", type=positive, default=2000)
    parser.add_argument("--eval-clips", type=positive, default=64, help="held-out clips the EPE is measured on (at most)")
    parser.add_argument("--batch-size", type=positive, default=8)
    parser.add_argument("--clip-len", type=positive, default=64)
    parser.add_argument("--crop", type=positive, default=224)
    parser.add_argument("--lr", type=train.number(float, 0, above=True), default=1e-3)
    parser.add_argument("--split", default="train")
    parser.add_argument("--val-split", default="val", help="held-out split (its centre clips)")
    parser.add_argument("--num-workers", type=train.number(int, 0), default=0)
    parser.add_argument("--device", default="auto", help="auto (cuda when there is one), cpu, cuda or cuda:N")
    parser.add_argument("--seed", type=train.number(int, 0, maximum=train.MAX_SEED), default=0)
    return parser


def frozen_network(args: argparse.Namespace) -> tuple[nn.Module, str]:
    """The network of ``--checkpoint`` (built as ``--model``) and the modality it takes, checked:
    a checkpoint that cannot be used is an :class:`UnusableCheckpoint`, ``--layer`` that the
    network does not have an :class:`OptionError`."""
    if not args.checkpoint.is_file():
        raise OptionError(f"{args.checkpoint} is not a file", "checkpoint")
    try:
        with train.torch_file(args.checkpoint):
            state = load_state(args.checkpoint)
    except ValueError as e:
        raise UnusableCheckpoint(str(e)) from None
    try:
        modality = checkpoint_modality(state)
    except ValueError as e:
        raise UnusableCheckpoint(f"{args.checkpoint}: {e}") from None
    in_channels = MODALITY_CHANNELS[modality]
    num_classes = args.num_classes or checkpoint_num_classes(state)
    if num_classes is None:
        raise OptionError("the checkpoint does not tell the network's classes: give them", "num_classes")
    network = train.build_network(args.model, in_channels, num_classes)
    try:
        load_weights(network, state)
    except CheckpointMismatch as e:
        raise UnusableCheckpoint(f"{args.checkpoint}: {e}") from None
    layers = [name for name, _ in network.named_modules() if name]
    if args.layer not in layers:
        raise OptionError(f"{type(network).__name__} has no layer {args.layer!r}; its layers: "
                          f"{', '.join(name for name, _ in network.named_children())}, or a dotted path into one", "layer")
    return network, modality


def probe(args: argparse.Namespace, device: torch.device) -> dict:
    """Train the decoder, measure it and write ``decoder.pt`` and ``probe.json`` (only when
    every value is finite); returns the result."""
    if args.out.exists() and not args.out.is_dir():
        raise OptionError(f"{args.out} is a file, not a folder", "out")
    torch.manual_seed(args.seed)
    network, modality = frozen_network(args)
    network.eval().requires_grad_(False).to(device)
    common = {"modalities": tuple(dict.fromkeys((modality, "flow"))), "clip_len": args.clip_len, "crop": args.crop, "seed": args.seed}
    with train.dataset_options():
        clips = ClipDataset(args.shards, split=args.split, train=True, **common)
        held_out = ClipDataset(args.shards, split=args.val_split, train=False, **common)
    train.require_videos(args, split=clips, val_split=held_out)
    bound = clips.readers[0].flow_bound
    size = args.crop // OUTPUT_STRIDE

    def batches(dataset, sampler):
        return DataLoader(dataset, args.batch_size, sampler=sampler, num_workers=args.num_workers)

    with torch.no_grad():
        probe_input = clips[0][modality][None].to(device)
        channels = layer_features(network, args.layer, probe_input).shape[1]
    decoder = FlowDecoder(channels, args.decoder, size).to(device)
    optimizer = torch.optim.Adam(decoder.parameters(), args.lr)
    sampler, step, epoch = ClipSampler(clips, num_replicas=1, rank=0, seed=args.seed), 0, 0
    while step < args.max_steps:
        sampler.set_epoch(epoch)
        for batch in batches(clips, sampler):
            with torch.no_grad():
                features = layer_features(network, args.layer, batch[modality].to(device))
            pred = decoder(features)
            loss = end_point_error(pred, flow_targets(batch["flow"].to(device), bound, pred.shape[2:]))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            if not math.isfinite(loss.item()):
                raise train.NonFinite(f"step {step}: the decoder's loss is {loss.item()}")
            print(json.dumps({"step": step, "epe_train": round(loss.item(), 4)}), file=sys.stderr)
            if step == args.max_steps:
                break
        epoch += 1

    errors, zeros, count = [], [], 0
    decoder.eval()
    with torch.no_grad():
        for batch in batches(held_out, None):
            pred = decoder(layer_features(network, args.layer, batch[modality].to(device)))
            target = flow_targets(batch["flow"].to(device), bound, pred.shape[2:])
            n = len(target)
            errors.append(end_point_error(pred, target).item() * n)
            zeros.append(end_point_error(torch.zeros_like(target), target).item() * n)
            count += n
            if count >= args.eval_clips:
                break
    result = {"epe": sum(errors) / count, "epe_zeros": sum(zeros) / count, "clips": count, "steps": step,
              "layer": args.layer, "decoder": args.decoder, "feature_channels": channels, "output_size": [int(s) for s in pred.shape[2:]],
              "units": "pixels of the clip per frame", "checkpoint": str(args.checkpoint.resolve()), "model": args.model}
    if not (math.isfinite(result["epe"]) and math.isfinite(result["epe_zeros"])):
        raise train.NonFinite(f"the held-out EPE is not finite (epe {result['epe']}, epe_zeros {result['epe_zeros']})")
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save(decoder.state_dict(), args.out / "decoder.pt")
    (args.out / "probe.json").write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")
    return result


def main(argv=None) -> dict:
    """Run the probe; bad usage exits with status 2, an unusable checkpoint with 1, a loss or EPE
    that is not finite with 3, each with one line on stderr."""
    parser = argument_parser()
    args = parser.parse_args(argv)
    try:
        device = torch.device(resolve_device(args.device))
    except ValueError as e:  # named by resolve_device's message
        parser.exit(train.EXIT_USAGE, f"{parser.prog}: error: {e}\n")
    try:
        result = probe(args, device)
    except OptionError as e:
        status, message = train.EXIT_USAGE, train.usage_message(parser, e)
    except UnusableCheckpoint as e:
        status, message = EXIT_CHECKPOINT, f"{parser.prog}: error: {e}\n"
    except train.NonFinite as e:
        status, message = train.EXIT_NON_FINITE, f"{parser.prog}: error: {e}: nothing written\n"
    else:
        print(json.dumps(result))
        return result
    # Exit outside the except clauses: the failed probe's frames, and with them its DataLoaders and
    # their worker processes, are released here, before the interpreter shuts down.
    parser.exit(status, message)


if __name__ == "__main__":
    run_and_exit(main)
