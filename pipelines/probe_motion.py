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
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from flowprep import ClipDataset, ClipSampler
from flowprep.devices import resolve_device
from flowprep.networks import MODALITY_CHANNELS, build_model, checkpoint_modality, checkpoint_num_classes, load_state, load_weights

OUTPUT_STRIDE = 4  # decoder output = crop / 4 pixels a side


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


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", nargs="+", required=True)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--model", required=True, help="s3dg, i3d or package.module:factory")
    parser.add_argument("--num-classes", type=int, help="classes of the network (default: the checkpoint's)")
    parser.add_argument("--layer", required=True, help="an end point, e.g. Mixed_3c, Mixed_4f, Mixed_5c")
    parser.add_argument("--decoder", choices=("simple", "spatial"), default="simple")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--max-steps", type=int, default=2000)
    parser.add_argument("--eval-clips", type=int, default=64, help="held-out clips the EPE is measured on (at most)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--clip-len", type=int, default=64)
    parser.add_argument("--crop", type=int, default=224)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--split", default="train")
    parser.add_argument("--val-split", default="val", help="held-out split (its centre clips)")
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(resolve_device(args.device))
    torch.manual_seed(args.seed)
    state = load_state(args.checkpoint)
    modality = checkpoint_modality(state)
    in_channels = MODALITY_CHANNELS[modality]
    num_classes = args.num_classes or checkpoint_num_classes(state)
    if num_classes is None:
        raise SystemExit("--num-classes is needed: the checkpoint does not tell it")
    network = build_model(args.model, in_channels, num_classes)
    load_weights(network, state)
    network.eval().requires_grad_(False).to(device)
    common = {"modalities": tuple(dict.fromkeys((modality, "flow"))), "clip_len": args.clip_len, "crop": args.crop, "seed": args.seed}
    train = ClipDataset(args.shards, split=args.split, train=True, **common)
    held_out = ClipDataset(args.shards, split=args.val_split, train=False, **common)
    if not len(train) or not len(held_out):
        raise SystemExit(f"no clips in split {args.split!r} or {args.val_split!r}")
    bound = train.readers[0].flow_bound
    size = args.crop // OUTPUT_STRIDE

    def batches(dataset, sampler):
        return DataLoader(dataset, args.batch_size, sampler=sampler, num_workers=args.num_workers)

    with torch.no_grad():
        probe_input = train[0][modality][None].to(device)
        channels = layer_features(network, args.layer, probe_input).shape[1]
    decoder = FlowDecoder(channels, args.decoder, size).to(device)
    optimizer = torch.optim.Adam(decoder.parameters(), args.lr)
    sampler, step, epoch = ClipSampler(train, num_replicas=1, rank=0, seed=args.seed), 0, 0
    while step < args.max_steps:
        sampler.set_epoch(epoch)
        for batch in batches(train, sampler):
            with torch.no_grad():
                features = layer_features(network, args.layer, batch[modality].to(device))
            pred = decoder(features)
            loss = end_point_error(pred, flow_targets(batch["flow"].to(device), bound, pred.shape[2:]))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            print(json.dumps({"step": step, "epe_train": round(loss.item(), 4)}), file=sys.stderr)
            if step == args.max_steps:
                break
        epoch += 1

    errors, zeros, clips = [], [], 0
    decoder.eval()
    with torch.no_grad():
        for batch in batches(held_out, None):
            pred = decoder(layer_features(network, args.layer, batch[modality].to(device)))
            target = flow_targets(batch["flow"].to(device), bound, pred.shape[2:])
            n = len(target)
            errors.append(end_point_error(pred, target).item() * n)
            zeros.append(end_point_error(torch.zeros_like(target), target).item() * n)
            clips += n
            if clips >= args.eval_clips:
                break
    result = {"epe": sum(errors) / clips, "epe_zeros": sum(zeros) / clips, "clips": clips, "steps": step,
              "layer": args.layer, "decoder": args.decoder, "feature_channels": channels, "output_size": [int(s) for s in pred.shape[2:]],
              "units": "pixels of the clip per frame", "checkpoint": str(Path(args.checkpoint).resolve()), "model": args.model}
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save(decoder.state_dict(), args.out / "decoder.pt")
    (args.out / "probe.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
