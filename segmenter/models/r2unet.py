"""R2U-Net (Alom et al. 2018): U-Net whose units are recurrent residual convolutions."""
from __future__ import annotations

from functools import partial
from typing import ClassVar

import torch
from torch import nn

from bloodcells.classes import NUM_CLASSES
from bloodcells.errors import BloodcellsError
from bloodcells.segmenter.models.blocks import EncoderDecoder, ConvBNReLU, Down, UpCat, init_weights, widths


class RecurrentConv(nn.Module):
    """Recurrent conv layer: one conv unrolled t steps, re-fed the input at every step.

    out(0) = conv(x); out(k) = conv(x + out(k-1)) for k = 1..t, with shared weights,
    so t=2 costs three convolutions but has the parameters of one.
    """

    def __init__(self, channels: int, t: int = 2) -> None:
        super().__init__()
        self.t = t
        self.conv = ConvBNReLU(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Unroll the recurrence t steps."""
        out = self.conv(x)
        for _ in range(self.t):
            out = self.conv(x + out)
        return out


class RRCNNBlock(nn.Module):
    """Recurrent residual unit: 1x1 projection, two recurrent conv layers, residual add."""

    def __init__(self, in_channels: int, out_channels: int, t: int = 2) -> None:
        super().__init__()
        self.project = nn.Conv2d(in_channels, out_channels, kernel_size=1)
        self.body = nn.Sequential(RecurrentConv(out_channels, t), RecurrentConv(out_channels, t))
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual over the recurrent stack, on the projected input."""
        x = self.project(x)
        return x + self.body(x)


class R2UNet(EncoderDecoder):
    """The U-Net layout with every TwoConv replaced by an RRCNN block (t recurrent steps)."""

    arch: ClassVar[str] = "r2unet"

    def __init__(self, num_classes: int = NUM_CLASSES, in_channels: int = 3, width: int = 32,
                 t: int = 2, instance: str | None = None) -> None:
        if not isinstance(t, int) or t < 1:
            raise BloodcellsError(f"r2unet: recurrence steps t must be a positive integer; got {t!r}")
        super().__init__(num_classes, in_channels, width, instance, t=t)
        f = widths(width)
        block = partial(RRCNNBlock, t=t)
        self.encoder = nn.ModuleList(
            [block(in_channels, f[0])] + [Down(f[i - 1], f[i], block=block) for i in range(1, 5)])
        self.decoder = nn.ModuleList([UpCat(f[i + 1], f[i], f[i], block=block) for i in reversed(range(4))])
        self.head = nn.Conv2d(f[0], self.out_channels, kernel_size=1)
        init_weights(self)
        # the 1x1 projections feed a residual sum, not a ReLU: a ReLU gain there would double
        # the signal's power in each of the nine blocks and start training with huge logits
        for m in self.modules():
            if isinstance(m, RRCNNBlock):
                nn.init.kaiming_normal_(m.project.weight, nonlinearity="linear")

