"""Contact sheets: how a person judges a sprite bank at a glance."""
from __future__ import annotations

import cv2
import numpy as np

from bloodcells.classes import NAMES, PALETTE

from .sprite import Sprite


def sprite_tile(s: Sprite, size: int, outline: bool = True) -> np.ndarray:
    """The sprite on grey, fitted into size x size, with its mask outline in its class colour."""
    rgba = s.rgba
    h, w = rgba.shape[:2]
    k = (size - 6) / max(h, w)
    nh, nw = max(1, round(h * k)), max(1, round(w * k))
    a = rgba[..., 3:4].astype(np.float32) / 255
    pm = np.concatenate([rgba[..., :3] * a, a], axis=2)  # premultiplied: no dark fringe when shrinking
    small = cv2.resize(pm, (nw, nh), interpolation=cv2.INTER_AREA if k < 1 else cv2.INTER_LINEAR)
    tile = np.full((size, size, 3), 200, np.uint8)
    y0, x0 = (size - nh) // 2, (size - nw) // 2
    region = tile[y0:y0 + nh, x0:x0 + nw]
    region[:] = np.clip(small[..., :3] + region * (1 - small[..., 3:4]), 0, 255).astype(np.uint8)
    small = (small[..., 3] * 255).astype(np.uint8)[..., None]
    if outline:
        cs, _ = cv2.findContours((small[..., 0] > 127).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        col = PALETTE[NAMES.index(s.cls)].tolist()
        if s.cls in ("background",) or sum(col) < 100:
            col = [0, 90, 255]
        cv2.drawContours(region, cs, -1, [int(c) for c in col], 1)
    return tile


def contact_sheet(sprites: list[Sprite], per_class: int = 12, tile: int = 72, seed: int = 0) -> np.ndarray:
    """One row per class present: a label and up to `per_class` sprites (a seeded sample), RGB."""
    rng = np.random.default_rng(seed)
    label_w = 170
    rows = []
    for cls in NAMES[1:] + ("background",):  # background: plasma fields cut from real smears
        group = [s for s in sprites if s.cls == cls]
        if not group:
            continue
        pick = sorted(rng.choice(len(group), size=min(per_class, len(group)), replace=False))
        tiles = [sprite_tile(group[i], tile) for i in pick]
        tiles += [np.full((tile, tile, 3), 235, np.uint8)] * (per_class - len(tiles))
        label = np.full((tile, label_w, 3), 255, np.uint8)
        cv2.rectangle(label, (6, tile // 2 - 8), (20, tile // 2 + 6), PALETTE[NAMES.index(cls)].tolist(), -1)
        cv2.rectangle(label, (6, tile // 2 - 8), (20, tile // 2 + 6), (0, 0, 0), 1)
        cv2.putText(label, cls, (26, tile // 2 + 1), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
        diam = np.median([s.diameter for s in group])
        cv2.putText(label, f"n={len(group)}  d~{diam:.0f}px", (26, tile // 2 + 18), cv2.FONT_HERSHEY_SIMPLEX, 0.38,
                    (80, 80, 80), 1, cv2.LINE_AA)
        rows.append(np.hstack([label] + tiles))
    if not rows:
        return np.full((tile, label_w + per_class * tile, 3), 255, np.uint8)
    sep = np.full((2, rows[0].shape[1], 3), 255, np.uint8)
    return np.vstack([x for r in rows for x in (r, sep)][:-1])
