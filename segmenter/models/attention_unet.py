"""Attention U-Net (Oktay et al. 2018): additive attention gates filter each skip connection."""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from bloodcells.classes import NUM_CLASSES
from bloodcells.segmenter.models.blocks import EncoderDecoder, Down, TwoConv, UpCat, init_weights, widths


class AttentionGate(nn.Module):
    """Grid attention gate: a coarse gating signal g decides which skip pixels pass.

    As in the paper, the skip x is brought to g's (half) resolution by a strided 2x2
    conv, the attention map alpha = sigmoid(psi(relu(theta(x) + phi(g)))) is resampled
    bilinearly back to x's size, and the gated skip alpha * x goes through a 1x1 conv + BN.
    """

    def __init__(self, skip_channels: int, gating_channels: int, inter_channels: int) -> None:
        super().__init__()
        self.theta = nn.Conv2d(skip_channels, inter_channels, kernel_size=2, stride=2, bias=False)
        self.phi = nn.Conv2d(gating_channels, inter_channels, kernel_size=1)
        self.psi = nn.Conv2d(inter_channels, 1, kernel_size=1)
        self.out = nn.Sequential(nn.Conv2d(skip_channels, skip_channels, kernel_size=1),
                                 nn.BatchNorm2d(skip_channels))

    def attention(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """The (N, 1, H, W) attention coefficients in [0, 1] for skip x."""
        f = F.relu(self.theta(x) + self.phi(g))
        alpha = torch.sigmoid(self.psi(f))
        return F.interpolate(alpha, size=x.shape[-2:], mode="bilinear", align_corners=False)

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Gate skip x (N, Cx, 2h, 2w) with the coarser decoder feature g (N, Cg, h, w)."""
        return self.out(self.attention(x, g) * x)


class AttentionUNet(EncoderDecoder):
    """The U-Net with an attention gate on every skip, gated by the next-coarser decoder feature."""

    arch: ClassVar[str] = "attention_unet"

    def __init__(self, num_classes: int = NUM_CLASSES, in_channels: int = 3, width: int = 32,
                 instance: str | None = None) -> None:
        super().__init__(num_classes, in_channels, width, instance)
        f = widths(width)
        self.encoder = nn.ModuleList(
            [TwoConv(in_channels, f[0])] + [Down(f[i - 1], f[i]) for i in range(1, 5)])
        # bottom-up, like the decoder: gates[0] filters level 3's skip with the bottleneck
        self.gates = nn.ModuleList(
            [AttentionGate(f[i], f[i + 1], max(f[i] // 2, 1)) for i in reversed(range(4))])
        self.decoder = nn.ModuleList([UpCat(f[i + 1], f[i], f[i]) for i in reversed(range(4))])
        self.head = nn.Conv2d(f[0], self.out_channels, kernel_size=1)
        init_weights(self)

    def fuse(self, level: int, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """Gate the skip with the coarser decoder feature before fusing them."""
        return self.decoder[level](x, self.gates[level](skip, g=x))
