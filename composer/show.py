"""Pictures of a composed dataset: scenes beside their colour-coded label maps, with a legend."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from bloodcells.classes import NAMES, PALETTE, colorize
from bloodcells.errors import BloodcellsError
from bloodcells.imageio import read_gray, read_rgb


def legend(classes: list[int], width: int, row_h: int = 22) -> np.ndarray:
    """A white strip with a colour swatch and name for each class index given."""
    per_row = max(1, width // 170)
    rows = -(-len(classes) // per_row)
    img = np.full((rows * row_h + 6, width, 3), 255, np.uint8)
    for k, c in enumerate(classes):
        x, y = 8 + (k % per_row) * 170, 4 + (k // per_row) * row_h
        cv2.rectangle(img, (x, y + 3), (x + 14, y + 17), PALETTE[c].tolist(), -1)
        cv2.rectangle(img, (x, y + 3), (x + 14, y + 17), (0, 0, 0), 1)
        cv2.putText(img, NAMES[c], (x + 20, y + 15), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    return img


def grid(data: Path, split: str = "train", n: int = 16, cols: int = 4, seed: int = 0) -> np.ndarray:
    """n scenes of a split (a seeded sample), each image beside its colour map, legend below."""
    folder = Path(data) / split / "images"
    if not folder.is_dir():
        raise BloodcellsError(f"{folder}: no such split folder; compose a dataset first ('cli compose')")
    ids = sorted(p.stem for p in folder.glob("*.png"))
    if not ids:
        raise BloodcellsError(f"{folder}: no scenes yet; run 'cli compose' first")
    rng = np.random.default_rng(seed)
    pick = sorted(rng.choice(len(ids), size=min(n, len(ids)), replace=False))
    tiles, present = [], set()
    for i in pick:
        img = read_rgb(folder / f"{ids[i]}.png")
        lab = read_gray(Path(data) / split / "labels" / f"{ids[i]}.png")
        present |= set(np.unique(lab).tolist())
        pair = np.hstack([img, np.full((img.shape[0], 4, 3), 255, np.uint8), colorize(lab)])
        tiles.append(np.pad(pair, ((4, 4), (4, 4), (0, 0)), constant_values=255))
    while len(tiles) % cols:
        tiles.append(np.full_like(tiles[0], 255))
    rows = [np.hstack(tiles[r:r + cols]) for r in range(0, len(tiles), cols)]
    body = np.vstack(rows)
    return np.vstack([body, legend(sorted(present), body.shape[1])])
