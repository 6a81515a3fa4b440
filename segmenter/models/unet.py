"""U-Net (Ronneberger et al. 2015) as the original work modified it: half widths, same padding."""
from __future__ import annotations

from typing import ClassVar

from torch import nn

from bloodcells.classes import NUM_CLASSES
from bloodcells.segmenter.models.blocks import EncoderDecoder, Down, TwoConv, UpCat, init_weights, widths


class UNet(EncoderDecoder):
    """Four-step encoder/decoder of TwoConv blocks; returns per-pixel class logits.

    width=32 gives features 32-64-128-256-512, half of the paper's 64..1024. 'Same'
    padding keeps the output at the input's H, W (the paper's valid convs crop it).
    """

    arch: ClassVar[str] = "unet"

    def __init__(self, num_classes: int = NUM_CLASSES, in_channels: int = 3, width: int = 32,
                 instance: str | None = None) -> None:
        super().__init__(num_classes, in_channels, width, instance)
        f = widths(width)
        self.encoder = nn.ModuleList(
            [TwoConv(in_channels, f[0])] + [Down(f[i - 1], f[i]) for i in range(1, 5)])
        # decoder runs bottom-up: decoder[0] fuses level 3's skip with the bottleneck
        self.decoder = nn.ModuleList([UpCat(f[i + 1], f[i], f[i]) for i in reversed(range(4))])
        self.head = nn.Conv2d(f[0], self.out_channels, kernel_size=1)
        init_weights(self)

