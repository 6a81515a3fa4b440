"""One cell cut out of an image: RGBA pixels (alpha = mask) plus what the composer needs."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, eq=False)
class Sprite:
    id: str
    cls: str  # canonical class name from bloodcells.classes
    rgba: np.ndarray  # uint8 (H, W, 4); alpha is the mask (soft edge allowed)
    diameter: float  # native diameter in px: equivalent-circle diameter of alpha > 127
    split: str = "train"
    source: str = "builtin"
    background: tuple[float, float, float] | None = None  # RGB the cell was seen against in its source image


def mask_diameter(alpha: np.ndarray) -> float:
    """Equivalent-circle diameter (px) of the opaque part of an alpha channel."""
    area = float(np.count_nonzero(alpha > 127))
    return float(2.0 * np.sqrt(area / np.pi))
