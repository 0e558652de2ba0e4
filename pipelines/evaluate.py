"""Evaluate a trained network on whole videos, or fuse saved evaluations (two-stream).

A checkpoint (``RUN_DIR/checkpoint.pt`` of a training job, or any state dict ``--model`` fits)
takes RGB or flow: its first convolution's input channels tell which (3: RGB, 2: flow). Each
video of ``--split`` is scored by the mean of the network's logits over ``--clips`` clips spread
evenly in time (first at the start, last at the end; 1: the centre clip) times ``--crops`` crop
positions (1: the centre; 3: both ends and the centre of the long side, centred on the short)::

    python pipelines/evaluate.py --shards k400/val --checkpoint runs/d3d/checkpoint.pt --model s3dg \\
        --split val --clips 10 --crops 3 --clip-len 64 --crop 224 --batch-size 16 --device cuda --out evals/d3d

``--fuse`` combines saved evaluations of the same videos: per video, the weighted mean (``--weights``,
default equal) of each one's softmax, the two-stream I3D convention::

    python pipelines/evaluate.py --fuse evals/rgb evals/flow --weights 1,1 --out evals/two-stream

EVAL_DIR gets ``predictions.parquet`` (``video_id``, ``label_index``, ``logits``: a fused folder
stores the log of the fused probabilities) and ``metrics.json`` (``top1``, ``top5``,
``mean_class_accuracy``, ``videos``, ``per_class``, ``labels``, and the ``args``, ``source``
(checkpoint path and sha256, or the fused folders) and library ``versions`` that reproduce it).
The last line printed is a JSON object with ``top1``, ``top5``, ``mean_class_accuracy`` and
``videos``. Exit status 2: bad usage, including prediction sets over different videos.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from flowprep.dataset import ClipDataset
from flowprep.devices import resolve_device
from flowprep.evaluate import PREDICTIONS, SUMMARY, Predictions, fuse, label_names, read_eval, video_logits, write_eval
from flowprep.networks import MODALITY_CHANNELS, build_model, checkpoint_modality, load_state, load_weights
from flowprep.process import run_and_exit
from flowprep.provenance import file_sha256, versions
from flowprep.train import positive_int


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--shards", nargs="+", help="output folders of flowprep extract: evaluate --checkpoint on them")
    source.add_argument("--fuse", nargs="+", metavar="EVAL_DIR", help="fuse these evaluation folders (two or more)")
    add("--out", required=True, type=Path, help="EVAL_DIR: predictions.parquet, metrics.json")
    add("--checkpoint", help="a training run's checkpoint.pt or a state dict file")
    add("--model", help="s3dg, i3d or package.module:factory (called with in_channels=, num_classes=)")
    add("--split", default="val", help="the videos to evaluate")
    add("--clips", type=positive_int, default=1, help="clips per video, spread evenly in time (1: the centre clip)")
    add("--crops", type=positive_int, default=1, help="crops per clip along the long side (1: centre; 3: both ends and centre)")
    add("--clip-len", type=positive_int, default=64, help="frames per clip")
    add("--crop", type=positive_int, default=224, help="side of the square crop")
    add("--frame-stride", type=positive_int, default=1, help="step between clip frames")
    add("--batch-size", type=positive_int, default=8, help="clips per forward")
    add("--device", default="auto", help="auto (cuda when there is one), cpu or cuda")
    add("--num-workers", type=int, default=4, help="DataLoader workers")
    add("--progress", action=argparse.BooleanOptionalAction, help="progress bar (default: when stderr is a terminal)")
    add("--weights", help="with --fuse: positive weights, one per folder, comma-separated (default: equal)")
    return parser


def parse_weights(text: str | None, count: int) -> list[float]:
    if text is None:
        return [1.0] * count
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        raise ValueError(f"--weights {text!r}: comma-separated numbers, one per --fuse folder") from None
    if len(weights) != count:
        raise ValueError(f"--weights {text!r} gives {len(weights)} weights for {count} --fuse folders")
    return weights


def fused_evaluation(args: argparse.Namespace) -> tuple[Predictions, list[str], dict]:
    """The fusion of the ``--fuse`` folders, their class names and what made it."""
    if len(args.fuse) < 2:
        raise ValueError("--fuse takes two or more evaluation folders")
    weights = parse_weights(args.weights, len(args.fuse))
    loaded = [read_eval(folder) for folder in args.fuse]
    names = loaded[0][1]["labels"]
    for folder, (_, metrics) in zip(args.fuse[1:], loaded[1:]):
        if metrics["labels"] != names:
            raise ValueError(f"{folder} has another label map than {args.fuse[0]}")
    fused = fuse([p for p, _ in loaded], weights, args.fuse)
    source = {"fused": [{"eval_dir": str(Path(folder).resolve()), "weight": w,
                         "predictions_sha256": file_sha256(Path(folder) / PREDICTIONS), "source": metrics.get("source")}
                        for folder, w, (_, metrics) in zip(args.fuse, weights, loaded)],
              "rule": "log of the weighted mean of softmax(logits), weights normalised to sum 1"}
    return fused, names, source


def checkpoint_evaluation(args: argparse.Namespace, parser: argparse.ArgumentParser) -> tuple[Predictions, list[str], dict]:
    """The evaluation of ``--checkpoint`` on ``--split`` of ``--shards``, the class names and what made it."""
    if args.checkpoint is None or args.model is None:
        parser.error("evaluating --shards needs --checkpoint and --model")
    try:
        device = torch.device(resolve_device(args.device))
        state = load_state(args.checkpoint)
        modality = checkpoint_modality(state)
        dataset = ClipDataset(args.shards, (modality,), clip_len=args.clip_len, frame_stride=args.frame_stride,
                              crop=args.crop, train=False, split=args.split, num_clips=args.clips,
                              num_crops=args.crops, normalize=False)
        if not len(dataset):
            raise ValueError(f"no videos of split {args.split!r} in {', '.join(args.shards)}")
        if any(dataset.readers[r].meta(v)["label_index"] < 0 for r, v in dataset.videos):
            raise ValueError(f"split {args.split!r} has unlabelled videos: evaluation needs labels")
        if len({v for _, v in dataset.videos}) != len(dataset.videos):
            raise ValueError("the --shards folders hold a video id more than once: predictions are per video id")
        names = label_names(dataset)
        network = build_model(args.model, MODALITY_CHANNELS[modality], len(names))
        load_weights(network, state)
    except (ValueError, FileNotFoundError) as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    predictions = video_logits(network.to(device), dataset, modality, args.batch_size, device, args.num_workers, args.progress)
    source = {"checkpoint": str(Path(args.checkpoint).resolve()), "checkpoint_sha256": file_sha256(args.checkpoint),
              "model": args.model, "modality": modality, "shards": args.shards, "split": args.split,
              "views_per_video": dataset.views_per_video}
    return predictions, names, source


def main(argv=None) -> dict:
    parser = argument_parser()
    args = parser.parse_args(argv)
    if args.fuse and (args.checkpoint or args.model):
        parser.error("--fuse combines saved evaluations: --checkpoint and --model are for --shards")
    if args.weights and not args.fuse:
        parser.error("--weights goes with --fuse")
    if args.shards:
        args.shards = [str(Path(s).resolve()) for s in args.shards]
        predictions, names, source = checkpoint_evaluation(args, parser)
    else:
        try:
            predictions, names, source = fused_evaluation(args)
        except ValueError as e:
            parser.exit(2, f"{parser.prog}: error: {e}\n")
    record = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "source": source,
              "versions": versions()}
    metrics = write_eval(args.out, predictions, names, record)
    print(json.dumps({k: metrics[k] for k in SUMMARY}))
    return metrics


if __name__ == "__main__":
    run_and_exit(main)
