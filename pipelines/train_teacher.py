"""Train the D3D teacher: a flow-stream S3D-G (or I3D) on the stored TV-L1 flow, cross-entropy on
its clip logits. ``flowprep teacher --checkpoint RUN_DIR/checkpoint.pt`` then stores its outputs
for every view, and ``train_d3d.py`` distils them into an RGB student.

One process (a CPU smoke run)::

    python pipelines/train_teacher.py --shards k400/out --out runs/flow --model s3dg --epochs 1 \\
        --max-steps 2 --batch-size 2 --clip-len 8 --crop 112 --lr 0.01 --num-workers 0

One process per GPU::

    torchrun --nproc_per_node 8 pipelines/train_teacher.py --shards k400/out --out runs/flow \\
        --model s3dg --epochs 40 --batch-size 8 --clip-len 64 --crop 224 --lr 0.1 --val-split val

Rerunning the same command resumes from RUN_DIR/checkpoint.pt. The loop, the checkpoint and the
log are flowprep/train.py's.
"""

from __future__ import annotations

import argparse

from torch import nn

from flowprep import train
from flowprep.networks import sequence_logits
from flowprep.process import run_and_exit


def flow_step(net: nn.Module, batch: dict) -> train.StepOutput:
    """Cross-entropy of the clip logits of ``flow`` ``[B, 2, T, H, W]`` float32 in [-1, 1] (uint8
    or float16 shards alike); the loss is its one term, logged as ``ce`` (there is no ``distill``
    term, and none is logged)."""
    logits = sequence_logits(net(batch["flow"]))
    ce = train.cross_entropy(logits, batch["label"])
    return train.StepOutput(loss=ce, terms={"ce": ce}, logits=logits)


def build_job(args: argparse.Namespace, dist: train.Dist) -> train.Job:
    train_set, val_set = train.make_datasets(args, ("flow",))
    classes = train.num_classes(train_set)
    network = train.build_network(args.model, 2, classes)
    return train.Job(train_set, val_set, trainable=network, modules={"model": network}, step=flow_step,
                     num_classes=classes, start={"reads": list(train_set.modalities)})


def main(argv=None) -> train.RunResult:
    return train.launch(train.argument_parser(__doc__), argv, build_job)


if __name__ == "__main__":
    run_and_exit(main)
