"""A small 3D CNN for the miniature D3D (``benchmarks/d3d_mini.py``): what S3D-G is to Kinetics,
at a size that trains in seconds on two CPU cores.

The training jobs, ``flowprep teacher``, the evaluation and the probe build it from the command
line as ``--model mini3d:factory`` (with ``benchmarks/`` on ``PYTHONPATH``). It has what those
need of a network: a forward from ``[B, C, T, H, W] float32`` (C = 2 flow or 3 RGB, in [-1, 1])
to clip logits, named layers the probe can tap (``conv1``, ``conv2``, ``conv3``) and a
``classifier_name`` for the ``embedding`` output.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn


def unit(in_channels: int, out_channels: int, kernel: tuple[int, int, int], stride: tuple[int, int, int]) -> nn.Sequential:
    """Conv3d ("same" padding for odd kernels) + BatchNorm + ReLU."""
    return nn.Sequential(nn.Conv3d(in_channels, out_channels, kernel, stride, padding=tuple(k // 2 for k in kernel), bias=False),
                         nn.BatchNorm3d(out_channels), nn.ReLU(inplace=True))


class Mini3D(nn.Module):
    """Three 3D convolutions, global average pooling, dropout, a 1x1x1 convolution to the classes.

    Shapes for a ``[B, C, T, S, S]`` clip: ``conv1`` ``[B, 32, T, S/2, S/2]`` (a 3x7x7 kernel:
    its receptive field spans a few pixels of motion per frame at full resolution), ``conv2``
    ``[B, 64, T, S/4, S/4]`` (the probe's ``crop / 4`` grid), ``conv3`` ``[B, 128, T/2, S/8, S/8]``,
    then logits ``[B, num_classes]``.
    """

    classifier_name = "logits"

    def __init__(self, in_channels: int, num_classes: int, dropout: float = 0.3):
        super().__init__()
        self.conv1 = unit(in_channels, 32, (3, 7, 7), (1, 2, 2))
        self.conv2 = unit(32, 64, (3, 3, 3), (1, 2, 2))
        self.conv3 = unit(64, 128, (3, 3, 3), (2, 2, 2))
        self.dropout = nn.Dropout(dropout)
        # A 1x1x1 convolution named as I3D's and S3D-G's classifier (logits.conv3d): a checkpoint
        # then tells its class count to flowprep teacher and the probe, as theirs do.
        self.logits = nn.Sequential(OrderedDict(conv3d=nn.Conv3d(128, num_classes, 1)))

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv3(self.conv2(self.conv1(x)))
        return self.logits(self.dropout(x.mean(dim=(2, 3, 4), keepdim=True))).flatten(1)


def factory(in_channels: int, num_classes: int) -> Mini3D:
    """What ``--model mini3d:factory`` calls."""
    return Mini3D(in_channels, num_classes)
