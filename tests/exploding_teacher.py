"""A teacher network for the tests that raises on any clip but the all-zero one flowprep runs to
size its outputs: a model error on every video (``--model exploding_teacher:model``)."""

import torch
from torch import nn


class Exploding(nn.Module):
    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.classifier = nn.Linear(in_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.abs().sum() > 0:
            raise RuntimeError("the model exploded on this clip")
        return self.classifier(x.mean((2, 3, 4)))[..., None]


def model(in_channels: int, num_classes: int) -> nn.Module:
    return Exploding(in_channels, num_classes)
