"""Named building blocks shared by the U-Net family (MONAI basic_unet style)."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from bloodcells.errors import BloodcellsError

# A block factory builds "(in_channels, out_channels) -> module"; Down/UpCat take one so
# the recurrent and residual U-Nets reuse the same encoder/decoder wiring as the plain U-Net.
BlockFactory = Callable[[int, int], nn.Module]


def widths(width: int) -> tuple[int, int, int, int, int]:
    """Feature widths of the five levels: width * (1, 2, 4, 8, 16)."""
    return tuple(width * m for m in (1, 2, 4, 8, 16))  # type: ignore[return-value]


class ConvBNReLU(nn.Sequential):
    """k x k 'same' convolution (3x3 by default), batch norm, ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3) -> None:
        super().__init__(
            # no conv bias: the batch norm right after it has its own shift
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )
        self.out_channels = out_channels


class TwoConv(nn.Sequential):
    """Two ConvBNReLU in a row: the U-Net's basic unit."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(ConvBNReLU(in_channels, out_channels), ConvBNReLU(out_channels, out_channels))
        self.out_channels = out_channels


class Down(nn.Sequential):
    """2x2 max-pool then a block: one encoder step that halves H and W."""

    def __init__(self, in_channels: int, out_channels: int, block: BlockFactory = TwoConv) -> None:
        super().__init__(nn.MaxPool2d(2), block(in_channels, out_channels))
        self.out_channels = out_channels


class UpCat(nn.Module):
    """2x2 transposed conv (halving channels), concatenate skip(s), then a block."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int,
                 block: BlockFactory = TwoConv) -> None:
        super().__init__()
        up_channels = in_channels // 2
        self.up = nn.ConvTranspose2d(in_channels, up_channels, kernel_size=2, stride=2)
        self.conv = block(skip_channels + up_channels, out_channels)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor, skip: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """Upsample x to the skip's size and fuse; U-Net++ passes several skips."""
        skips = [skip] if isinstance(skip, torch.Tensor) else list(skip)
        return self.conv(torch.cat([*skips, self.up(x)], dim=1))


def check_input(x: torch.Tensor, multiple: int = 16) -> None:
    """Fail clearly (not deep inside a torch.cat) when H or W is not a multiple of 16."""
    if x.dim() != 4:
        raise BloodcellsError(f"model input must be (N, C, H, W); got shape {tuple(x.shape)}")
    h, w = x.shape[-2:]
    if h % multiple or w % multiple:
        raise BloodcellsError(
            f"model input is {h}x{w}; both sides must be multiples of {multiple} "
            "(pad or crop the image, or tile it)")


def init_weights(model: nn.Module) -> None:
    """He-normal weights (variance-preserving through ReLUs) and unit batch norms."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
        elif isinstance(m, nn.ConvTranspose2d):
            # each output pixel sees in_channels * k*k / stride^2 inputs, not torch's default fan
            fan_in = m.in_channels * m.kernel_size[0] * m.kernel_size[1] / (m.stride[0] * m.stride[1])
            nn.init.normal_(m.weight, std=(2.0 / fan_in) ** 0.5)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) and m.bias is not None:
            nn.init.zeros_(m.bias)


def check_sizes(num_classes: int, in_channels: int, width: int) -> None:
    """Validate the arguments every architecture shares, at construction time."""
    for name, value in (("num_classes", num_classes), ("in_channels", in_channels), ("width", width)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise BloodcellsError(f"{name} must be a positive integer; got {value!r}")


# Learned outputs that separate touching cells, beside the class logits (segmenter/instances.py decodes them):
# name -> number of extra output channels.
INSTANCE_OUTPUTS = {"distance": 1, "boundary": 1}


class SegmentationNet(nn.Module):
    """What every architecture shares: its arguments (`config`, enough to rebuild it) and its output layout.

    The output has `out_channels` = num_classes class logits, then the channels of the instance output, if any
    (`instance`: a key of INSTANCE_OUTPUTS, or None for class logits only, as in checkpoints made before it
    existed). Each architecture's final 1x1 head produces `out_channels`; `split` separates the two parts."""

    arch: str = ""

    def __init__(self, num_classes: int, in_channels: int, width: int, instance: str | None = None, **extra) -> None:
        super().__init__()
        check_sizes(num_classes, in_channels, width)
        if instance is not None and instance not in INSTANCE_OUTPUTS:
            raise BloodcellsError(f"unknown instance output {instance!r}; choose one of: "
                                  f"{', '.join(INSTANCE_OUTPUTS)} (or none)")
        self.num_classes, self.instance = num_classes, instance
        self.out_channels = num_classes + (INSTANCE_OUTPUTS[instance] if instance else 0)
        self.config = {"arch": self.arch, "num_classes": num_classes, "in_channels": in_channels,
                       "width": width, **extra, "instance": instance}


class EncoderDecoder(SegmentationNet):
    """A U-shaped net: `encoder` levels, a bottom-up `decoder` fusing skips, a 1x1 `head`.

    Subclasses build those three parts; `fuse` is where one decoder level meets its skip."""

    def fuse(self, level: int, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.decoder[level](x, skip)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in_channels, H, W) -> (N, out_channels, H, W) logits; H, W multiples of 16."""
        check_input(x)
        skips = []
        for block in self.encoder:
            x = block(x)
            skips.append(x)
        x = skips.pop()
        for level in range(len(self.decoder)):
            x = self.fuse(level, x, skips.pop())
        return self.head(x)
