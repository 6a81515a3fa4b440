"""U-Net++ (Zhou et al. 2018): nested, densely connected skip pathways between encoder and decoder."""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from bloodcells.classes import NUM_CLASSES
from bloodcells.segmenter.models.blocks import Down, SegmentationNet, TwoConv, UpCat, check_input, init_weights, widths


class UNetPlusPlus(SegmentationNet):
    """Grid of nodes X[i][j] (level i, column j): X[i][0] is the encoder and
    X[i][j] = TwoConv(cat(X[i][0..j-1], up(X[i+1][j-1]))) for j >= 1.

    Logits come from X[0][4]. With deep_supervision=True every top node X[0][1..4] gets
    a 1x1 head: training returns the list of four logit maps (the losses average them)
    and evaluation returns their mean, the paper's "accurate mode".
    """

    arch: ClassVar[str] = "unetpp"

    def __init__(self, num_classes: int = NUM_CLASSES, in_channels: int = 3, width: int = 32,
                 deep_supervision: bool = False, instance: str | None = None) -> None:
        super().__init__(num_classes, in_channels, width, instance, deep_supervision=bool(deep_supervision))
        self.deep_supervision = bool(deep_supervision)
        f = widths(width)
        self.encoder = nn.ModuleList(
            [TwoConv(in_channels, f[0])] + [Down(f[i - 1], f[i]) for i in range(1, 5)])
        # nodes[f"{i}_{j}"] is X[i][j] for j >= 1: j dense skips of width f[i] plus the upsampled node below
        self.nodes = nn.ModuleDict({
            f"{i}_{j}": UpCat(f[i + 1], j * f[i], f[i])
            for j in range(1, 5) for i in range(5 - j)
        })
        n_heads = 4 if self.deep_supervision else 1
        self.heads = nn.ModuleList([nn.Conv2d(f[0], self.out_channels, kernel_size=1) for _ in range(n_heads)])
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """(N, in_channels, H, W) -> (N, num_classes, H, W) logits (a list when deep-supervised in training)."""
        check_input(x)
        grid: list[list[torch.Tensor]] = []  # grid[i] holds X[i][0], X[i][1], ...
        for block in self.encoder:
            x = block(x)
            grid.append([x])
        # column by column so that X[i+1][j-1] exists when X[i][j] needs it
        for j in range(1, 5):
            for i in range(5 - j):
                grid[i].append(self.nodes[f"{i}_{j}"](grid[i + 1][j - 1], grid[i][:j]))
        if not self.deep_supervision:
            return self.heads[0](grid[0][4])
        outs = [head(node) for head, node in zip(self.heads, grid[0][1:])]
        return outs if self.training else torch.stack(outs).mean(dim=0)
