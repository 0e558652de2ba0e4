"""Train a D3D student: an RGB S3D-G (or I3D) distilled from a flow teacher's stored outputs.

    loss = CE(student logits, label) + λ · MSE(student output, teacher output)

The teacher's outputs were stored once per view by ``flowprep teacher --name NAME``;
``ClipDataset(teacher=NAME)`` serves the RGB clip of a stored view with its target, so the
student reads no flow and runs no teacher network. ``--distill-output logits`` (the paper's
choice) distils the classifier outputs; an embedding or a layer (``embedding``, ``Mixed_4f``,
any stored one) distils that globally pooled output through a learned linear projection from the
student's width to the teacher's, saved in the checkpoint under ``projection`` (``model`` stays
the network alone, which ``flowprep teacher`` and the motion probe load). ``--distill-weight 0``
trains on cross-entropy alone, on the same views.

One process (a CPU smoke run)::

    python pipelines/train_d3d.py --shards k400/out --teacher flow_s3dg --out runs/d3d --model s3dg \\
        --epochs 1 --max-steps 3 --batch-size 2 --clip-len 8 --crop 112 --lr 0.01 --num-workers 0

One process per GPU::

    torchrun --nproc_per_node 8 pipelines/train_d3d.py --shards k400/out --teacher flow_s3dg \\
        --out runs/d3d --model s3dg --epochs 40 --batch-size 8 --clip-len 64 --crop 224 --lr 0.1 \\
        --val-split val

The clips must be the teacher's (--clip-len, --frame-stride, --crop). Rerunning the same command
resumes from RUN_DIR/checkpoint.pt. The loop, the checkpoint and the log are flowprep/train.py's.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowprep import train
from flowprep.dataset import ClipDataset
from flowprep.errors import OptionError
from flowprep.networks import OutputTaps
from flowprep.process import run_and_exit


class Student(nn.Module):
    """The RGB network, and the output it distils: ``output`` is ``logits``, a pooled output that
    :class:`OutputTaps` knows (``embedding``, ``Mixed_4f``, ...) mapped to ``teacher_dim`` by a
    learned ``projection``, or ``None`` (no distillation, nothing tapped)."""

    def __init__(self, network: nn.Module, output: str | None, projection: nn.Linear | None = None):
        super().__init__()
        self.network, self.output, self.projection = network, output, projection

    def forward(self, rgb: Tensor) -> tuple[Tensor, Tensor | None]:
        """``[B, 3, T, H, W]`` float32 -> logits ``[B, C]`` and the distilled output ``[B, D]`` (or None)."""
        names = ("logits",) if self.output in (None, "logits") else ("logits", self.output)
        with OutputTaps(self.network, names) as taps:
            outputs = taps.collect(self.network(rgb))
        if self.output is None:
            return outputs["logits"], None
        distilled = outputs[self.output]
        return outputs["logits"], self.projection(distilled) if self.projection is not None else distilled


def pooled_width(network: nn.Module, name: str, clip_len: int, crop: int) -> int:
    """The width of ``network``'s pooled output ``name``: one forward on a zero clip in eval mode,
    which changes no state (no BatchNorm statistics, no random draw)."""
    network.eval()
    with torch.no_grad(), OutputTaps(network, (name,)) as taps:
        width = taps.collect(network(torch.zeros(1, 3, clip_len, crop, crop)))[name].shape[1]
    network.train()
    return width


def distill_step(net: nn.Module, batch: dict, weight: float, output: str) -> train.StepOutput:
    """``CE + weight * MSE`` per clip, MSE between the student's distilled output and the stored
    ``teacher_<output>`` ``[B, D]``, averaged over D. ``weight == 0``: cross-entropy alone; the
    distillation term is not computed (logged as 0) and the teacher's targets are not read."""
    logits, distilled = net(batch["rgb"])
    ce = train.cross_entropy(logits, batch["label"])
    if weight == 0:
        return train.StepOutput(loss=ce, terms={"ce": ce, "distill": torch.zeros_like(ce)}, logits=logits)
    distill = F.mse_loss(distilled.float(), batch[f"teacher_{output}"], reduction="none").mean(1)
    return train.StepOutput(loss=ce + weight * distill, terms={"ce": ce, "distill": distill}, logits=logits)


def assert_no_flow_read(*datasets: ClipDataset | None) -> None:
    """Raise if a shard reader of ``datasets`` has read a flow column in this process (DataLoader
    workers read in their own processes: with --num-workers 0 this covers every read)."""
    read = [str(r.out) for d in datasets if d is not None for r in d.readers if "flow" in r.columns_read]
    if read:
        raise RuntimeError(f"the student read flow from {', '.join(read)}: it must train on RGB and stored targets only")


def build_job(args: argparse.Namespace, dist: train.Dist) -> train.Job:
    output = args.distill_output
    try:
        train_set, val_set = train.make_datasets(args, ("rgb",), teacher=args.teacher, teacher_outputs=(output,))
    except OptionError as e:
        if e.option != "teacher_outputs":
            raise
        raise OptionError(str(e), "distill_output") from None
    classes = train.num_classes(train_set)
    teacher_dim = train_set.targets[0].outputs[output]
    if output == "logits" and teacher_dim != classes:
        raise OptionError(f"teacher {args.teacher!r} has {teacher_dim} classes, the shards {classes}", "teacher")
    network = train.build_network(args.model, 3, classes)
    projection = None
    if args.distill_weight and output != "logits":
        try:
            width = pooled_width(network, output, args.clip_len, args.crop)
        except ValueError as e:  # an output the student network does not have (OutputTaps)
            raise OptionError(f"the student: {e}", "distill_output") from None
        projection = nn.Linear(width, teacher_dim)
    student = Student(network, output if args.distill_weight else None, projection)
    modules = {"model": network, **({"projection": projection} if projection is not None else {})}
    return train.Job(
        train_set, val_set, trainable=student, modules=modules, num_classes=classes,
        step=lambda net, batch: distill_step(net, batch, args.distill_weight, output),
        start={"reads": list(train_set.modalities), "teacher": f"stored targets {args.teacher} (no flow read, no teacher network)",
               "distill": {"output": output, "weight": args.distill_weight, "projection": projection is not None}},
        check=lambda: assert_no_flow_read(train_set, val_set),
    )


def main(argv=None) -> train.RunResult:
    parser = train.argument_parser(__doc__)
    parser.add_argument("--teacher", required=True, help="the stored targets' name (flowprep teacher --name)")
    parser.add_argument("--distill-weight", type=train.number(float, 0), default=1.0, help="λ (0: cross-entropy alone)")
    parser.add_argument("--distill-output", default="logits",
                        help="the stored output to distil: logits, embedding or a layer such as Mixed_4f (through a projection)")
    return train.launch(parser, argv, build_job)


if __name__ == "__main__":
    run_and_exit(main)
