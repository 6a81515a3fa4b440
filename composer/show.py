"""Pictures of a composed dataset: scenes beside their colour-coded label maps, with a legend."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from bloodcells.classes import colorize
from bloodcells.errors import BloodcellsError
from bloodcells.formats import legend
from bloodcells.imageio import read_gray, read_rgb


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
