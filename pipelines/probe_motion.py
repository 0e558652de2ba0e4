"""How much motion a network's features hold: the D3D paper's probe.

Freeze a trained 3D CNN, train a small decoder to predict TV-L1 flow from its features at a
layer, and report the decoder's end-point error (EPE) against the stored flow on held-out clips,
beside an all-zeros prediction on the same clips. The decoders (flowprep/probe.py) have temporal
kernel size 1, so whatever motion they recover was already in the features:

* ``simple``: one 1x1x1 convolution to 2 channels;
* ``spatial``: three 1x3x3 convolutions (ReLU between), then to 2 channels;
* ``pwc``: PWC-Net's flow decoder with 1x3x3 kernels: densely connected convolutions of 128, 128,
  96, 64 and 32 channels (each on the input and every earlier output), a convolution to the flow,
  and the context network (dilations 1, 2, 4, 8, 16, 1; 128, 128, 128, 96, 64, 32 channels)
  whose output is added to it; LeakyReLU 0.1;

all upsampled (trilinear) from the layer's ``[t, h, w]`` to ``[t, crop / 4, crop / 4]``.

Targets: the clip's stored flow resampled to that output size by area averaging, over space and
over the frames each output step covers. Flow values are **not** rescaled: they stay in pixels of
the clip (crop resolution) per frame, so EPE reads in the same pixels as the shards' flow (in
pixels of the output grid they would be 4x smaller). The network sees RGB when its checkpoint
takes 3 channels, flow when 2.

``--layer`` names a layer (an end point such as ``Mixed_4f``, or a dotted path into one), several
joined by commas (``Mixed_3c,Mixed_4f``), or ``all``: the network's end points in order
(``Conv3d_1a_7x7`` ... ``Mixed_5c``). Each layer has its own decoder, trained as a run on that
layer alone trains it (same seed, batches and steps); the frozen network runs once a batch for all.

    python pipelines/probe_motion.py --shards k400/train --checkpoint run/checkpoint.pt --model s3dg \\
        --layer Mixed_4f --decoder simple --out probe-4f --max-steps 2000 --batch-size 8 \\
        --clip-len 64 --crop 224 --device cuda

The last line printed is a JSON object with ``epe`` and ``epe_zeros`` (also ``RUN_DIR/probe.json``):
with one layer, that layer's result (``layer``, ``decoder``, ``clips``, ``steps``,
``feature_channels``, ``output_size``, ...); with several, the result of the layer with the lowest
``epe`` (named by ``layer``) and ``layers``, every layer's result in ``--layer`` order. Also written
in RUN_DIR:

* ``probe_layers.json``: every layer's result, in order (a list, one entry for one layer);
* ``probe_layers.png``: EPE per layer and the zeros line. It needs matplotlib (``pip install
  "flowprep[plots]"``); without it a line on stderr says so, and ``pipelines/probe_figure.py
  RUN_DIR --out RUN_DIR/probe_layers.png`` draws it later;
* ``decoder.pt`` (one layer) or ``decoders/<layer>.pt`` (several): the decoders' state dicts;
* ``pictures/<layer>_<video>_<frame>.png``: the first 4 held-out clips' decoded flow at the middle
  output step beside TV-L1's (the target), each ``crop x crop`` (one block per output cell), in
  the Middlebury colours of ``flowprep show``; ``frame`` is the first frame that step averages.

Exit status: 0 when the probe ran; 2 on bad usage (an option out of range, a layer the network
does not have, a split without videos, a crop larger than the frames, ...: one line naming the
option); 1 when the checkpoint cannot be used (unreadable, no state dict, not the network of
--model); 3 when a decoder's loss or an EPE is not finite (nothing is written).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from torch import nn

from flowprep import ClipDataset, train
from flowprep.devices import resolve_device
from flowprep.errors import OptionError
from flowprep.networks import (END_POINTS, MODALITY_CHANNELS, CheckpointMismatch, checkpoint_modality, checkpoint_num_classes,
                               load_state, load_weights)
from flowprep.probe import (DECODERS, LAYERS_FILE, FlowDecoder, ProbeInputs, end_points, evaluate_decoders, make_decoders,
                            plot_layers, train_decoders)
from flowprep.process import run_and_exit
from flowprep.visualize import write_png

EXIT_CHECKPOINT = 1


class UnusableCheckpoint(ValueError):
    """A ``--checkpoint`` the probe cannot use (exit status 1)."""


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    positive = train.number(int, 1)
    parser.add_argument("--shards", nargs="+", required=True)
    parser.add_argument("--checkpoint", required=True, type=Path)
    parser.add_argument("--model", required=True, help="s3dg, i3d or package.module:factory")
    parser.add_argument("--num-classes", type=positive, help="classes of the network (default: the checkpoint's)")
    parser.add_argument("--layer", required=True, help="an end point (e.g. Mixed_3c, Mixed_4f, Mixed_5c) or a dotted path into one; "
                        "several joined by commas; all: every end point of the network")
    parser.add_argument("--decoder", choices=DECODERS, default="simple")
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
    a checkpoint that cannot be used is an :class:`UnusableCheckpoint`."""
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
    return network, modality


def probed_layers(network: nn.Module, text: str) -> list[str]:
    """The layers ``--layer`` names: ``all`` (the network's end points, in order) or names joined
    by commas, each a submodule of ``network``; an :class:`OptionError` otherwise."""
    if text == "all":
        layers = end_points(network)
        if not layers:
            raise OptionError(f"{type(network).__name__} has none of the end points {END_POINTS[0]} ... {END_POINTS[-1]} "
                              "that 'all' probes: name its layers", "layer")
        return layers
    layers = [name.strip() for name in text.split(",")]
    modules = {name for name, _ in network.named_modules() if name}
    for name in layers:
        if name not in modules:
            raise OptionError(f"{type(network).__name__} has no layer {name!r}; its layers: "
                              f"{', '.join(name for name, _ in network.named_children())}, or a dotted path into one", "layer")
    repeated = sorted({name for name in layers if layers.count(name) > 1})
    if repeated:
        raise OptionError(f"{', '.join(repeated)} named more than once", "layer")
    return layers


def probe(args: argparse.Namespace, device: torch.device) -> dict:
    """Train a decoder per layer, measure them and write the run folder (only when every value is
    finite); returns the result printed last."""
    if args.out.exists() and not args.out.is_dir():
        raise OptionError(f"{args.out} is a file, not a folder", "out")
    network, modality = frozen_network(args)
    layers = probed_layers(network, args.layer)
    network.eval().requires_grad_(False).to(device)
    common = {"modalities": tuple(dict.fromkeys((modality, "flow"))), "clip_len": args.clip_len, "crop": args.crop, "seed": args.seed}
    with train.dataset_options():
        clips = ClipDataset(args.shards, split=args.split, train=True, **common)
        held_out = ClipDataset(args.shards, split=args.val_split, train=False, **common)
    train.require_videos(args, split=clips, val_split=held_out)
    inputs = ProbeInputs(modality, clips.readers[0].flow_bound, args.batch_size, args.num_workers, device)
    decoders = make_decoders(network, layers, args.decoder, clips, inputs, args.seed)
    steps = train_decoders(network, decoders, clips, inputs, lr=args.lr, max_steps=args.max_steps, seed=args.seed,
                           log=lambda record: print(json.dumps(record), file=sys.stderr))
    scores, count, pictures = evaluate_decoders(network, decoders, held_out, inputs, args.eval_clips)
    results = []
    for layer, score in scores.items():
        if not (math.isfinite(score["epe"]) and math.isfinite(score["epe_zeros"])):
            where = "" if len(scores) == 1 else f" of {layer}"
            raise train.NonFinite(f"the held-out EPE{where} is not finite (epe {score['epe']}, epe_zeros {score['epe_zeros']})")
        results.append({"epe": score["epe"], "epe_zeros": score["epe_zeros"], "clips": count, "steps": steps, "layer": layer,
                        "decoder": args.decoder, "feature_channels": decoders[layer].channels, "output_size": score["output_size"],
                        "units": "pixels of the clip per frame", "checkpoint": str(args.checkpoint.resolve()), "model": args.model})
    summary = results[0] if len(results) == 1 else {**min(results, key=lambda r: r["epe"]), "layers": results}
    write_run(args.out, summary, results, decoders, pictures)
    return summary


def write_run(out: Path, summary: dict, results: list[dict], decoders: dict[str, FlowDecoder], pictures: dict) -> None:
    """The run folder's files (module docstring); without matplotlib, all but ``probe_layers.png``."""
    out.mkdir(parents=True, exist_ok=True)
    if len(decoders) == 1:
        torch.save(next(iter(decoders.values())).state_dict(), out / "decoder.pt")
    else:
        (out / "decoders").mkdir(exist_ok=True)
        for layer, decoder in decoders.items():
            torch.save(decoder.state_dict(), out / "decoders" / f"{layer}.pt")
    for name, value in (("probe.json", summary), (LAYERS_FILE, results)):
        (out / name).write_text(json.dumps(value, indent=2, allow_nan=False) + "\n")
    (out / "pictures").mkdir(exist_ok=True)
    for name, image in pictures.items():
        write_png(out / "pictures" / name, image)
    try:
        plot_layers([(out.resolve().name, results)], out / "probe_layers.png")
    except ImportError:
        print(f"probe_layers.png not drawn: it needs matplotlib (pip install \"flowprep[plots]\"); then "
              f"python pipelines/probe_figure.py {out} --out {out / 'probe_layers.png'}", file=sys.stderr)


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
