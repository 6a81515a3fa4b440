"""The model zoo: one module per architecture, a plain registry and one factory."""
from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from bloodcells.classes import NUM_CLASSES
from bloodcells.errors import BloodcellsError
from bloodcells.segmenter.models.attention_unet import AttentionUNet
from bloodcells.segmenter.models.r2unet import R2UNet
from bloodcells.segmenter.models.resunet import ResUNet
from bloodcells.segmenter.models.ternausnet import TernausNet
from bloodcells.segmenter.models.unet import UNet
from bloodcells.segmenter.models.unetpp import UNetPlusPlus

# name -> class; each class stores its arguments (with this name as "arch") in `model.config`,
# so `create_model(**model.config)` rebuilds the same architecture from a checkpoint.
ARCHITECTURES: dict[str, type[nn.Module]] = {
    cls.arch: cls for cls in (UNet, R2UNet, AttentionUNet, UNetPlusPlus, TernausNet, ResUNet)
}


def create_model(arch: str, num_classes: int = NUM_CLASSES, in_channels: int = 3, width: int = 32,
                 **kwargs: Any) -> nn.Module:
    """Build architecture `arch` (a key of ARCHITECTURES) with freshly initialised weights."""
    if arch not in ARCHITECTURES:
        raise BloodcellsError(f"unknown architecture {arch!r}; choose one of: {', '.join(ARCHITECTURES)}")
    cls = ARCHITECTURES[arch]
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    extra = sorted(set(kwargs) - accepted)
    if extra:
        own = sorted(accepted - {"num_classes", "in_channels", "width", "instance"})
        raise BloodcellsError(
            f"architecture {arch!r} does not take {', '.join(extra)}; "
            f"its own options are: {', '.join(own) or 'none'}")
    return cls(num_classes=num_classes, in_channels=in_channels, width=width, **kwargs)


__all__ = ["ARCHITECTURES", "create_model", "UNet", "R2UNet", "AttentionUNet", "UNetPlusPlus",
           "TernausNet", "ResUNet"]
