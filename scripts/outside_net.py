"""A small CNN written outside bdsafety, for `scripts/outside_model_audit.py`.

bdsafety loads it with `--model-factory outside_net:build` (run with `PYTHONPATH=scripts`). Plain PyTorch
only: nothing here imports bdsafety.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class OutsideNet(nn.Module):
    """Three 3x3 conv + BatchNorm + ReLU blocks, each followed by a 2x2 max-pool, then one linear layer.

    Takes float [0, 1] images [N, C, H, W] and normalises them itself with the dataset's per-channel mean/std.
    On 1x28x28 inputs: 28 -> 14 -> 7 -> 3 pixels, about 104k parameters.
    """

    def __init__(self, in_channels: int, num_classes: int, mean, std, width: int = 32):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        channels = [in_channels, width, 2 * width, 4 * width]
        blocks = []
        for c_in, c_out in zip(channels[:-1], channels[1:]):
            blocks += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                       nn.ReLU(inplace=True), nn.MaxPool2d(2)]
        self.features = nn.Sequential(*blocks)
        self.head = nn.Linear(channels[-1] * 3 * 3, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = (x - self.mean) / self.std
        return self.head(self.features(x).flatten(1))


def build(in_channels: int, num_classes: int, mean, std) -> nn.Module:
    """The factory bdsafety calls: `build(in_channels, num_classes, mean, std)` -> an nn.Module on [0, 1] images."""
    return OutsideNet(in_channels, num_classes, mean, std)
