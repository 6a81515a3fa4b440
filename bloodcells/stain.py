"""Stain maths shared by the composer and the segmenter's augmentation: haematoxylin-eosin-DAB unmixing."""
from __future__ import annotations

import numpy as np

# Ruifrok & Johnston's haematoxylin, eosin and DAB optical-density vectors (rows), as in skimage.color
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29],
                         [0.07, 0.99, 0.11],
                         [0.27, 0.57, 0.78]])
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)


def hed_affine(scale: np.ndarray, shift: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The optical-density map of scaling and shifting the three stain concentrations (c' = c * scale + shift),
    as row vectors: od' = od @ map + offset. Returns (map (3, 3), offset (3,))."""
    od_map = (HED_FROM_RGB * np.asarray(scale, np.float64)[None, :]) @ RGB_FROM_HED
    return od_map, np.asarray(shift, np.float64) @ RGB_FROM_HED
