"""Cell masks from pixels: pure functions on uint8 RGB arrays.

Three ways, one per kind of source:
- `black_background_mask`: single-cell crops whose outside is black (Kaggle malaria).
- `stained_cell_mask`: a stained cell (WBC or platelet) nearest a point, among RBCs on a
  light background (PBC, LISC crops, WBC boxes of whole smears); the nucleus is the seed
  and a marker watershed grows it over the cytoplasm up to the cell's edge.
- `box_cell_mask`: the component that best fills a box on a whole smear (RBCs).
Every function returns a bool mask and a rejection reason (None when the mask is plausible).
"""
from __future__ import annotations

import cv2
import numpy as np
from scipy import ndimage as ndi
from skimage.segmentation import watershed

_DISK = {r: cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1)) for r in range(1, 16)}


def disk(r: int) -> np.ndarray:
    r = max(1, int(r))
    if r not in _DISK:
        _DISK[r] = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
    return _DISK[r]


def purpleness(rgb: np.ndarray) -> np.ndarray:
    """How strongly a pixel took the basic (purple) stain: (R + B) / 2 - G, as float32."""
    f = rgb.astype(np.float32)
    return (f[..., 0] + f[..., 2]) * 0.5 - f[..., 1]


def fill_holes(mask: np.ndarray) -> np.ndarray:
    return ndi.binary_fill_holes(mask)


def smooth(mask: np.ndarray, sigma: float) -> np.ndarray:
    """Round off jagged edges: blur the mask and cut at one half."""
    if sigma <= 0 or not mask.any():
        return mask
    blurred = cv2.GaussianBlur(mask.astype(np.float32), (0, 0), sigma)
    return blurred > 0.5


def largest_component(mask: np.ndarray) -> np.ndarray:
    n, lab, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    if n <= 1:
        return np.zeros_like(mask, dtype=bool)
    return lab == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))


def border_fraction(mask: np.ndarray) -> float:
    """Share of the image's border pixels that the mask covers."""
    edge = np.concatenate([mask[0], mask[-1], mask[1:-1, 0], mask[1:-1, -1]])
    return float(edge.mean()) if edge.size else 0.0


def _otsu(values: np.ndarray) -> float:
    """Otsu threshold of a 1-D float sample (0..255 range assumed after clipping)."""
    v = np.clip(values, 0, 255).astype(np.uint8).reshape(-1, 1)
    if v.size < 2:
        return 0.0
    t, _ = cv2.threshold(v, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return float(t)


def solidity(mask: np.ndarray) -> float:
    """Mask area over its convex hull's area: low when neighbours are fused on."""
    pts = cv2.findNonZero(mask.astype(np.uint8))
    if pts is None:
        return 0.0
    hull_area = cv2.contourArea(cv2.convexHull(pts))
    return float(min(1.0, mask.sum() / max(hull_area, 1.0)))


def plausibility(mask: np.ndarray, min_frac: float, max_frac: float, max_border: float,
                 min_px: int = 40, min_solidity: float = 0.0) -> str | None:
    """Why a mask is implausible for one cell in its crop, or None."""
    area = int(mask.sum())
    if area == 0:
        return "empty mask"
    frac = area / mask.size
    if area < min_px or frac < min_frac:
        return "mask too small"
    if frac > max_frac:
        return "mask too large"
    if border_fraction(mask) > max_border:
        return "mask touches most of the border"
    if min_solidity and solidity(mask) < min_solidity:
        return "irregular outline (fused with a neighbour?)"
    return None


def finish(mask: np.ndarray, sigma: float = 1.5, open_r: int = 1) -> np.ndarray:
    """Clean a raw mask: drop specks, fill holes, keep the largest part, smooth the edge."""
    if not mask.any():
        return mask.astype(bool)
    m = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_OPEN, disk(open_r)) > 0
    m = fill_holes(largest_component(m))
    return fill_holes(largest_component(smooth(m, sigma)))


def black_background_mask(rgb: np.ndarray, level: int = 12) -> tuple[np.ndarray, str | None]:
    """The non-black cell of a crop whose outside is pure black."""
    raw = rgb.max(axis=2) > level
    mask = finish(raw, sigma=1.0, open_r=2)
    return mask, plausibility(mask, min_frac=0.15, max_frac=0.995, max_border=0.85)


PARASITE_DARK = 12.0    # L* units darker than the cell's own median
PARASITE_PURPLE = 6.0   # and more purple: bluer (b* lower) plus half as much more magenta (a* higher)


def parasite_share(rgb: np.ndarray, mask: np.ndarray) -> float:
    """Share of a red cell's pixels in its largest parasite-like body: a blob that took the basic stain, darker
    and more purple than the cell's own median colour (opened by 2 px, so that specks do not count).

    A Giemsa-stained malaria parasite (ring, trophozoite, schizont, gametocyte) is such a body; a healthy red cell
    shows none. 0.0 for an empty mask."""
    m = cv2.erode(mask.astype(np.uint8), np.ones((2, 2), np.uint8)) > 0
    if m.sum() < 20:
        return 0.0
    ys, xs = np.nonzero(m)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    m = m[y0:y1, x0:x1]
    lab = cv2.cvtColor(np.ascontiguousarray(rgb[y0:y1, x0:x1]), cv2.COLOR_RGB2LAB).astype(np.float32)
    light, a, b = lab[..., 0] * (100 / 255), lab[..., 1] - 128, lab[..., 2] - 128
    dark = np.median(light[m]) - light
    purple = (np.median(b[m]) - b) + 0.5 * (a - np.median(a[m]))
    body = (m & (dark > PARASITE_DARK) & (purple > PARASITE_PURPLE)).astype(np.uint8)
    body = cv2.morphologyEx(body, cv2.MORPH_OPEN, np.ones((2, 2), np.uint8))
    n, _, stats, _ = cv2.connectedComponentsWithStats(body, connectivity=8)
    return float(stats[1:, cv2.CC_STAT_AREA].max() / m.sum()) if n > 1 else 0.0


def _group_seeds(seeds: np.ndarray, link_r: int) -> tuple[int, np.ndarray]:
    """Label seed pixels so that pieces closer than link_r (e.g. nuclear lobes) share a label."""
    linked = cv2.dilate(seeds.astype(np.uint8), disk(link_r))
    n, lab = cv2.connectedComponents(linked, connectivity=8)
    return n, np.where(seeds, lab, 0)


def stained_cell_mask(rgb: np.ndarray, centre: tuple[float, float] | None = None, kind: str = "wbc",
                      valid: np.ndarray | None = None) -> tuple[np.ndarray, str | None]:
    """The stained cell nearest `centre` (x, y), with its cytoplasm (kind 'wbc') or alone ('platelet').

    `valid` marks pixels that are real image (False on black padding)."""
    h, w = rgb.shape[:2]
    scale = min(h, w)
    cx, cy = centre if centre is not None else ((w - 1) / 2, (h - 1) / 2)
    if valid is None:
        valid = rgb.max(axis=2) > 15
    valid = cv2.erode(valid.astype(np.uint8), disk(2)) > 0
    blur = cv2.GaussianBlur(rgb, (0, 0), 1.2)
    purp = purpleness(blur)

    # Seed: the strongly stained pixels (nucleus, granules, platelet body).
    stained = purp[valid & (purp > 18)]
    t = float(np.clip(_otsu(stained), 38, 90)) if stained.size > 50 else 45.0
    seeds = (purp > t) & valid
    seeds = cv2.morphologyEx(seeds.astype(np.uint8), cv2.MORPH_OPEN, disk(1)) > 0
    link = max(2, round(scale * (0.012 if kind == "platelet" else 0.025)))
    n, lab = _group_seeds(seeds, link)
    if n <= 1:
        return np.zeros((h, w), bool), "no stained cell found"
    idx = np.arange(1, n)
    areas = ndi.sum(seeds, lab, idx)
    ys, xs = np.asarray(ndi.mean(np.indices((h, w))[0], lab, idx)), np.asarray(ndi.mean(np.indices((h, w))[1], lab, idx))
    min_area = (0.0004 if kind == "platelet" else 0.004) * h * w
    keep = areas >= min_area
    if not keep.any():
        return np.zeros((h, w), bool), "mask too small"
    dist = np.hypot(xs - cx, ys - cy)
    # nearest to the centre, but a large nucleus slightly further beats a tiny speck
    score = np.where(keep, dist / np.sqrt(np.maximum(areas, 1)) ** 0.5, np.inf)
    order = np.argsort(score)
    best = order[0]
    if len(order) > 1 and np.isfinite(score[order[1]]):
        second = order[1]
        if dist[second] < 1.1 * dist[best] + 0.02 * scale and areas[second] > 0.7 * areas[best]:
            return np.zeros((h, w), bool), "several equal candidates"
    seed = lab == idx[best]

    if kind == "platelet":
        mask = cv2.morphologyEx(seed.astype(np.uint8), cv2.MORPH_CLOSE, disk(max(2, link))) > 0
        mask = finish(mask, sigma=1.0, open_r=1)
        return mask, plausibility(mask, 0.0008, 0.25, 0.05, min_px=12)

    # Cytoplasm: marker watershed from the nucleus hull, against background and RBC markers.
    hull = cv2.fillPoly(np.zeros((h, w), np.uint8), [cv2.convexHull(np.argwhere(seed)[:, ::-1].astype(np.int32))], 1) > 0
    r_nuc = np.sqrt(hull.sum() / np.pi)
    yy, xx = np.indices((h, w))
    ny, nx = np.argwhere(hull).mean(axis=0)
    far = np.hypot(xx - nx, yy - ny) > 2.3 * r_nuc + 3
    near_hull = cv2.dilate(hull.astype(np.uint8), disk(max(2, round(0.15 * r_nuc)))) > 0

    light = blur.astype(np.float32).mean(axis=2)
    sample = valid & ~near_hull
    bright_t = np.percentile(light[sample], 80) if sample.any() else 230.0
    bg_pix = blur[sample & (light >= bright_t) & (purp < t * 0.5)]
    bg = np.median(bg_pix, axis=0) if len(bg_pix) > 20 else np.array([240, 230, 220], np.float32)
    rbc_pix = blur[sample & far & (light < bright_t - 10) & (purp < t)]
    rbc = np.median(rbc_pix, axis=0) if len(rbc_pix) > 20 else bg
    f = blur.astype(np.float32)
    d_bg = np.linalg.norm(f - bg, axis=2)
    d_rbc = np.linalg.norm(f - rbc, axis=2)
    tol = max(10.0, 0.35 * float(np.linalg.norm(bg - rbc)))
    is_bg = d_bg < tol
    # Cytoplasm is often RBC-coloured: only RBC-like blobs that do not touch the nucleus are
    # sure "other"; a blob touching it is split by the watershed at its strongest edge.
    blobs = cv2.morphologyEx((~is_bg & valid).astype(np.uint8), cv2.MORPH_OPEN, disk(2))
    nb, blab = cv2.connectedComponents(blobs, connectivity=8)
    attached = np.zeros(nb, bool)
    attached[np.unique(blab[near_hull])] = True
    attached[0] = False
    other = (is_bg | (blobs > 0) & ~attached[blab] | far | ~valid) & ~near_hull
    other |= _touching_rbcs(blobs.astype(bool) & attached[blab], hull, purp > t)
    other = cv2.erode(other.astype(np.uint8), disk(1)) > 0
    del d_rbc

    markers = np.zeros((h, w), np.int32)
    markers[other] = 2
    markers[cv2.erode(hull.astype(np.uint8), disk(1)) > 0] = 1
    cv2.watershed(np.ascontiguousarray(blur[..., ::-1]), markers)
    cell = (markers == 1) | seed
    cell = cell & ~far
    mask = finish(cell, sigma=max(1.0, scale / 150), open_r=max(1, round(scale / 120)))
    return mask, plausibility(mask, 0.01, 0.6, 0.2, min_solidity=0.85)


def _touching_rbcs(blob: np.ndarray, hull: np.ndarray, stained: np.ndarray) -> np.ndarray:
    """Pixels of round, unstained bodies (RBCs) fused to the cell: split the fused blob at its
    necks (watershed on the distance transform) and keep the parts that hold no stain."""
    if not blob.any():
        return blob
    dist = cv2.distanceTransform(blob.astype(np.uint8), cv2.DIST_L2, 5)
    r = max(3, int(0.5 * np.percentile(dist[blob], 95)))
    peaks = (dist == cv2.dilate(dist, disk(min(r, 15)))) & (dist > 2)
    n, markers = cv2.connectedComponents(peaks.astype(np.uint8), connectivity=8)
    if n <= 2:
        return np.zeros_like(blob)
    parts = watershed(-dist, markers, mask=blob)
    idx = np.arange(1, n)
    size = np.maximum(ndi.sum(blob, parts, idx), 1)
    stain = ndi.sum(stained, parts, idx) / size
    on_hull = ndi.sum(hull, parts, idx) > 0
    rbc_like = (~on_hull) & (stain < 0.03)
    lut = np.concatenate([[False], rbc_like])
    return cv2.erode((lut[parts] & blob).astype(np.uint8), disk(2)) > 0


def box_cell_mask(rgb: np.ndarray, box: tuple[int, int, int, int], background: np.ndarray,
                  ) -> tuple[np.ndarray, str | None]:
    """The component that best fills `box` (x0, y0, x1, y1, within rgb), for unstained-looking cells (RBCs).

    `background` is the smear's background colour (RGB)."""
    h, w = rgb.shape[:2]
    x0, y0, x1, y1 = box
    blur = cv2.GaussianBlur(rgb, (0, 0), 1.0).astype(np.float32)
    d = np.linalg.norm(blur - background.astype(np.float32), axis=2)
    t = _otsu(d)
    fg = d > max(t, 12.0)
    fg = fill_holes(cv2.morphologyEx(fg.astype(np.uint8), cv2.MORPH_OPEN, disk(2)) > 0)
    # split touching cells at their waist, then score each part against the box's ellipse
    dist = cv2.distanceTransform(fg.astype(np.uint8), cv2.DIST_L2, 5)
    ell = cv2.ellipse(np.zeros((h, w), np.uint8), ((x0 + x1) // 2, (y0 + y1) // 2),
                      (max(1, (x1 - x0) // 2), max(1, (y1 - y0) // 2)), 0, 0, 360, 1, -1) > 0
    n, lab = cv2.connectedComponents(fg.astype(np.uint8), connectivity=8)
    if n <= 1:
        return np.zeros((h, w), bool), "no cell in box"
    ious = []
    for i in range(1, n):
        comp = lab == i
        inter = np.count_nonzero(comp & ell)
        ious.append(inter / max(1, np.count_nonzero(comp | ell)))
    ious = np.array(ious)
    order = np.argsort(-ious)
    best = ious[order[0]]
    comp = lab == order[0] + 1
    if best < 0.55:
        # merged with neighbours: keep the part inside the box ellipse grown a little
        comp = comp & (cv2.dilate(ell.astype(np.uint8), disk(3)) > 0)
        inter = np.count_nonzero(comp & ell)
        best = inter / max(1, np.count_nonzero(comp | ell))
        if best < 0.55:
            return np.zeros((h, w), bool), "box not filled by one cell"
    del dist
    mask = finish(comp, sigma=1.2, open_r=1)
    return mask, plausibility(mask, 0.05, 0.95, 0.6, min_solidity=0.92)
