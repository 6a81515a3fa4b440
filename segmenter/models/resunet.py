"""ResUNet (Zhang, Liu & Wang 2018, "Road extraction by deep residual U-Net")."""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from bloodcells.classes import NUM_CLASSES
from bloodcells.segmenter.models.blocks import EncoderDecoder, UpCat, init_weights, widths


class PointwiseDown(nn.Conv2d):
    """A 1x1 convolution with a stride, computed as subsampling then a stride-1 1x1 convolution.

    Same weights and result as nn.Conv2d(in, out, 1, stride=s), but the strided 1x1 weight gradient in
    channels_last, which crashes this CPU build of torch (heap corruption) for small channel counts, is
    never run.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, bias: bool = False) -> None:
        super().__init__(in_channels, out_channels, 1, bias=bias)
        self.step = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Keep every step-th pixel, then mix channels."""
        if self.step > 1:
            x = x[:, :, ::self.step, ::self.step]
        return F.conv2d(x, self.weight, self.bias)


class ResidualUnit(nn.Module):
    """Pre-activation residual unit: (BN-ReLU-conv3x3) x2 plus a 1x1 conv + BN shortcut.

    stride=2 in the first conv (and the shortcut) downsamples, replacing the U-Net's
    max-pool. preactivate=False drops the leading BN-ReLU, as the paper's first unit
    does on the raw image.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1,
                 preactivate: bool = True) -> None:
        super().__init__()
        pre = [nn.BatchNorm2d(in_channels), nn.ReLU(inplace=True)] if preactivate else []
        self.body = nn.Sequential(
            *pre,
            nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
        )
        self.shortcut = nn.Sequential(
            PointwiseDown(in_channels, out_channels, stride),
            nn.BatchNorm2d(out_channels),
        )
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Identity-mapped sum of the residual branch and the projected input."""
        return self.body(x) + self.shortcut(x)


class ResUNet(EncoderDecoder):
    """U-Net layout built from residual units; strided convs downsample, UpCat upsamples."""

    arch: ClassVar[str] = "resunet"

    def __init__(self, num_classes: int = NUM_CLASSES, in_channels: int = 3, width: int = 32,
                 instance: str | None = None) -> None:
        super().__init__(num_classes, in_channels, width, instance)
        f = widths(width)
        self.encoder = nn.ModuleList(
            [ResidualUnit(in_channels, f[0], preactivate=False)]
            + [ResidualUnit(f[i - 1], f[i], stride=2) for i in range(1, 5)])  # the last one is the bridge
        self.decoder = nn.ModuleList([UpCat(f[i + 1], f[i], f[i], block=ResidualUnit) for i in reversed(range(4))])
        # the units end on a raw sum (pre-activation design), so normalise before the classifier
        self.head = nn.Sequential(nn.BatchNorm2d(f[0]), nn.ReLU(inplace=True), nn.Conv2d(f[0], self.out_channels, 1))
        init_weights(self)

