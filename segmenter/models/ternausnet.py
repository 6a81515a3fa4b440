"""TernausNet (Iglovikov & Shvets 2018): a U-Net whose encoder is VGG11's convolutional stack."""
from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from bloodcells.classes import NUM_CLASSES
from bloodcells.errors import BloodcellsError
from bloodcells.segmenter.models.blocks import SegmentationNet, check_input, init_weights


def vgg11_features(in_channels: int = 3, width: int = 32) -> nn.Sequential:
    """VGG11's conv stack ("config A", no batch norm), indexed exactly like torchvision's
    `vgg11().features` so its `features.N.*` weights load key for key; width=32 gives 64..512."""
    cfg = [2, "M", 4, "M", 8, 8, "M", 16, 16, "M", 16, 16, "M"]
    layers: list[nn.Module] = []
    channels = in_channels
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(2, stride=2))
        else:
            layers += [nn.Conv2d(channels, v * width, 3, padding=1), nn.ReLU(inplace=True)]
            channels = v * width
    return nn.Sequential(*layers)


def load_vgg11_features(encoder: nn.Sequential, path: str | Path) -> None:
    """Load torchvision-style vgg11 weights (keys `features.N.weight/bias`) into the encoder."""
    path = Path(path)
    if not path.is_file():
        raise BloodcellsError(
            f"{path}: VGG11 encoder weights not found; pass the path of a torchvision vgg11 "
            "state dict (.pt/.pth), or leave encoder_weights unset to train from scratch")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a corrupt or foreign file
        raise BloodcellsError(f"{path}: cannot be read as a torch state dict ({e})") from e
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise BloodcellsError(f"{path}: holds a {type(state).__name__}, not a state dict of vgg11 weights")
    # a DDP-saved dict prefixes every key with "module."; the classifier.* keys are not needed
    features = {k.removeprefix("module.").removeprefix("features."): v for k, v in state.items()
                if k.removeprefix("module.").startswith("features.")}
    expected = encoder.state_dict()
    missing, unexpected = sorted(set(expected) - set(features)), sorted(set(features) - set(expected))
    if missing or unexpected:
        raise BloodcellsError(
            f"{path}: keys do not match torchvision's vgg11 (not vgg11_bn) 'features.*' weights "
            f"(missing: {['features.' + k for k in missing[:4]]}, "
            f"unexpected: {['features.' + k for k in unexpected[:4]]})")
    for key, tensor in expected.items():
        if features[key].shape != tensor.shape:
            raise BloodcellsError(
                f"{path}: features.{key} has shape {tuple(features[key].shape)} but this encoder needs "
                f"{tuple(tensor.shape)}; torchvision vgg11 weights fit width=32, in_channels=3")
    encoder.load_state_dict(features)


class ConvReLU(nn.Sequential):
    """3x3 'same' conv + ReLU (TernausNet's decoder has no batch norm)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.ReLU(inplace=True))


class DecoderBlock(nn.Sequential):
    """ConvReLU then a 3x3 stride-2 transposed conv + ReLU that doubles H and W."""

    def __init__(self, in_channels: int, middle_channels: int, out_channels: int) -> None:
        super().__init__(
            ConvReLU(in_channels, middle_channels),
            nn.ConvTranspose2d(middle_channels, out_channels, 3, stride=2, padding=1, output_padding=1),
            nn.ReLU(inplace=True),
        )


class TernausNet(SegmentationNet):
    """TernausNet-11: VGG11 encoder (five pools), transposed-conv decoder, U-Net skips.

    width=32 is the paper's size (encoder 64-128-256-512-512, decoder num_filters=32);
    `width` scales both, so the encoder is 2 * width * (1, 2, 4, 8, 8). The encoder pools
    five times, so inputs whose sides are multiples of 16 but not 32 are zero-padded
    (bottom/right) to the next multiple of 32 and the logits cropped back.

    encoder_weights: optional local torchvision vgg11 state dict to start the encoder
    from (default None: trained from scratch). It is not kept in `config`, since a
    checkpoint already carries the loaded weights and the file need not exist when
    the model is rebuilt; `self.encoder_weights` records where they came from.
    """

    arch: ClassVar[str] = "ternausnet"

    def __init__(self, num_classes: int = NUM_CLASSES, in_channels: int = 3, width: int = 32,
                 encoder_weights: str | Path | None = None, instance: str | None = None) -> None:
        super().__init__(num_classes, in_channels, width, instance, encoder_weights=None)
        w = width
        self.encoder = vgg11_features(in_channels, w)
        self.center = DecoderBlock(16 * w, 16 * w, 8 * w)
        self.decoder = nn.ModuleList([
            DecoderBlock(8 * w + 16 * w, 16 * w, 8 * w),   # with conv5
            DecoderBlock(8 * w + 16 * w, 16 * w, 4 * w),   # with conv4
            DecoderBlock(4 * w + 8 * w, 8 * w, 2 * w),     # with conv3
            DecoderBlock(2 * w + 4 * w, 4 * w, w),         # with conv2
            ConvReLU(w + 2 * w, w),                        # with conv1, at full resolution
        ])
        self.head = nn.Conv2d(w, self.out_channels, kernel_size=1)
        init_weights(self)
        self.encoder_weights = str(encoder_weights) if encoder_weights is not None else None
        if encoder_weights is not None:
            load_vgg11_features(self.encoder, encoder_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in_channels, H, W) -> (N, num_classes, H, W) logits; H, W multiples of 16."""
        check_input(x)
        h, w = x.shape[-2:]
        x = F.pad(x, (0, -w % 32, 0, -h % 32))
        skips = []
        for layer in self.encoder:
            if isinstance(layer, nn.MaxPool2d):
                skips.append(x)  # conv1..conv5: the last ReLU output before each pool
            x = layer(x)
        x = self.center(x)
        for block in self.decoder:
            x = block(torch.cat([x, skips.pop()], dim=1))
        return self.head(x)[..., :h, :w]
