"""Cut sprites out of one source image: the work each import worker does."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import cv2
import numpy as np

from bloodcells.classes import RBC, WBC
from bloodcells.errors import BloodcellsError
from bloodcells.imageio import encode_png, read_gray, read_rgb

from .masks import black_background_mask, box_cell_mask, finish, parasite_share, plausibility, stained_cell_mask
from .sources import Item
from .sprite import mask_diameter

MASK_METHOD = {"black": "threshold", "stained": "threshold", "given": "given", "boxes": "box+threshold"}
# `cli sprites import --min-parasite S` rejects an infected red cell whose largest parasite-like body covers less of
# it than S: such a crop looks healthy, yet a scene would label it infected. 0.002 is about 2 px at the scenes'
# red-cell size (~37 px across), too little to see. Off by default: measured in bench/RESULTS.md ("Infected sprites
# must show a parasite"), it cut parasitised cells called healthy on composed scenes but raised false malaria on
# parasite-free real smears.
MIN_PARASITE = 0.0
SUGGESTED_MIN_PARASITE = 0.002
NO_PARASITE = "infected cell without a visible parasite"


@dataclass
class Cut:
    """One outcome: a sprite (png set) or a rejection (reason set)."""
    index: int
    cls: str | None
    label: str
    box: tuple[int, int, int, int] | None
    mask: str
    reason: str | None = None
    png: bytes | None = None
    diameter: float = 0.0
    background: tuple[float, float, float] | None = None  # the plasma colour the cell was seen against


def sprite_id(key: str, index: int) -> str:
    return hashlib.sha1(f"{key}#{index}".encode()).hexdigest()[:16]


def to_rgba(rgb: np.ndarray, mask: np.ndarray, pad: int = 2) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Crop to the mask's bounding box (+pad) and attach a soft-edged alpha; RGB is zeroed where alpha is 0."""
    ys, xs = np.nonzero(mask)
    h, w = mask.shape
    x0, y0 = max(0, xs.min() - pad), max(0, ys.min() - pad)
    x1, y1 = min(w, xs.max() + 1 + pad), min(h, ys.max() + 1 + pad)
    m = mask[y0:y1, x0:x1].astype(np.float32)
    alpha = np.clip(cv2.GaussianBlur(m, (0, 0), 0.7) * 255 + 0.5, 0, 255).astype(np.uint8)
    alpha[m > 0] = np.maximum(alpha[m > 0], 128)  # the mask itself stays opaque enough to count
    rgba = np.dstack([rgb[y0:y1, x0:x1], alpha])
    rgba[alpha == 0, :3] = 0
    return rgba, (int(x0), int(y0), int(x1), int(y1))


def _auto_method(rgb: np.ndarray) -> tuple[str, np.ndarray]:
    """Black-background crop, or stained cell among RBCs (with any black padding marked invalid)."""
    black = rgb.max(axis=2) < 15
    light = rgb.mean(axis=2)
    if black.mean() > 0.05 and (~black).any() and light[~black].mean() < 195:
        return "black", ~black
    return "stained", ~black


def _single(rgb: np.ndarray, item: Item) -> tuple[np.ndarray, str | None, str, np.ndarray | None]:
    """(mask, rejection reason, mask method, valid pixels or None when the cell lies on black)."""
    method = item.method
    valid = None
    if method == "auto":
        method, valid = _auto_method(rgb)
    if method == "black":
        m, r = black_background_mask(rgb)
        return m, r, "threshold", None
    if method == "given":
        mask = read_gray(item.mask_path)
        if mask.shape != rgb.shape[:2]:
            return (np.zeros(rgb.shape[:2], bool),
                    f"mask size {mask.shape[1]}x{mask.shape[0]} differs from image {rgb.shape[1]}x{rgb.shape[0]}",
                    "given", None)
        m = finish(mask > 0, sigma=0.0, open_r=1)
        return m, plausibility(m, 0.01, 0.9, 0.3), "given", np.ones(rgb.shape[:2], bool)
    kind = "platelet" if item.cls == "thrombocyte" else "wbc"
    m, r = stained_cell_mask(rgb, kind=kind, valid=valid)
    return m, r, "threshold", (valid if valid is not None else np.ones(rgb.shape[:2], bool))


def _background_colour(rgb: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """The plasma colour of a smear or crop: the median of its lightest 15% of (valid) pixels."""
    px = rgb[valid] if valid is not None and valid.any() else rgb.reshape(-1, 3)
    light = px.mean(axis=1)
    return np.median(px[light >= np.percentile(light, 85)], axis=0)


FIELD_SIDE = 96  # px on the long side of a stored background field: it is smooth, and is resized to canvases


def background_field(rgb: np.ndarray, bg: np.ndarray, valid: np.ndarray | None = None,
                     min_share: float = 0.12) -> np.ndarray | None:
    """The plasma of a smear without its cells: colour and illumination of the cell-free pixels, filled in under
    the cells by normalised convolution; (h, w, 3) uint8 at FIELD_SIDE px, or None when too little is cell-free.

    Cell-free: pixels close to the plasma colour (Lab distance), away from any cell (eroded)."""
    lab = cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB).astype(np.float32)
    ref = cv2.cvtColor(np.uint8(np.clip(bg, 0, 255)).reshape(1, 1, 3), cv2.COLOR_RGB2LAB).astype(np.float32)[0, 0]
    dist = np.linalg.norm((lab - ref) * np.array([0.5, 1.0, 1.0], np.float32), axis=2)
    free = dist < 10.0
    if valid is not None:
        free &= valid
    free = cv2.erode(free.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
    if free.mean() < min_share:
        return None
    h, w = free.shape
    k = FIELD_SIDE / max(h, w)
    size = (max(8, round(w * k)), max(8, round(h * k)))
    weight = cv2.resize(free.astype(np.float32), size, interpolation=cv2.INTER_AREA)
    colour = cv2.resize(rgb.astype(np.float32) * free[..., None], size, interpolation=cv2.INTER_AREA)
    sigma = 0.08 * FIELD_SIDE
    wb = cv2.GaussianBlur(weight, (0, 0), sigma)
    cb = cv2.GaussianBlur(colour, (0, 0), sigma)
    field = np.where(wb[..., None] > 1e-3, cb / np.maximum(wb, 1e-3)[..., None], bg.astype(np.float32))
    return np.clip(field + 0.5, 0, 255).astype(np.uint8)


def _field_cuts(rgb: np.ndarray, bg: np.ndarray, valid: np.ndarray | None = None) -> list[Cut]:
    """The smear's plasma field as a bank record (none when too little of it is cell-free: not a rejection)."""
    field = background_field(rgb, bg, valid)
    if field is None:
        return []
    rgba = np.dstack([field, np.full(field.shape[:2], 255, np.uint8)])
    h, w = rgb.shape[:2]
    return [Cut(BACKGROUND_INDEX, "background", "", (0, 0, w, h), "background", png=encode_png(rgba, level=3),
                background=tuple(round(float(v), 1) for v in bg))]


BACKGROUND_INDEX = -1  # a source image's plasma field is stored as its own record in the bank


def _boxes(rgb: np.ndarray, item: Item, fields: bool, min_parasite: float) -> list[Cut]:
    h, w = rgb.shape[:2]
    bg = _background_colour(rgb)
    cuts = _field_cuts(rgb, bg) if fields else []
    for i, b in enumerate(item.boxes):
        if b.skip:
            cuts.append(Cut(i, b.cls, b.label, b.xyxy, "box+threshold", reason=b.skip))
            continue
        x0, y0, x1, y1 = b.xyxy
        x0, y0, x1, y1 = max(0, x0), max(0, y0), min(w, x1), min(h, y1)
        if x1 - x0 < 4 or y1 - y0 < 4:
            cuts.append(Cut(i, b.cls, b.label, b.xyxy, "box+threshold", reason="box empty or outside the image"))
            continue
        if b.xyxy[0] <= 1 or b.xyxy[1] <= 1 or b.xyxy[2] >= w - 1 or b.xyxy[3] >= h - 1:
            cuts.append(Cut(i, b.cls, b.label, b.xyxy, "box+threshold", reason="cell cut by the image edge"))
            continue
        mx, my = int(0.25 * (x1 - x0)) + 4, int(0.25 * (y1 - y0)) + 4
        cx0, cy0, cx1, cy1 = max(0, x0 - mx), max(0, y0 - my), min(w, x1 + mx), min(h, y1 + my)
        crop = rgb[cy0:cy1, cx0:cx1]
        inner = (x0 - cx0, y0 - cy0, x1 - cx0, y1 - cy0)
        if b.cls in RBC:
            m, r = box_cell_mask(crop, inner, bg)
        else:
            kind = "platelet" if b.cls == "thrombocyte" else "wbc"
            centre = ((inner[0] + inner[2]) / 2, (inner[1] + inner[3]) / 2)
            m, r = stained_cell_mask(crop, centre=centre, kind=kind)
            if r is None and b.cls in WBC:
                # the cell must lie mostly inside its box
                ys, xs = np.nonzero(m)
                inside = ((xs >= inner[0] - 4) & (xs < inner[2] + 4) & (ys >= inner[1] - 4) & (ys < inner[3] + 4)).mean()
                if inside < 0.85:
                    r = "mask leaves its box"
        cuts.append(_cut(i, b.cls, b.label, crop, m, r, "box+threshold", offset=(cx0, cy0), background=bg,
                         min_parasite=min_parasite))
    return cuts


def _cut(i: int, cls: str | None, label: str, rgb: np.ndarray, m: np.ndarray, reason: str | None,
         method: str, offset: tuple[int, int] = (0, 0), background: np.ndarray | None = None,
         min_parasite: float = 0.0) -> Cut:
    if reason is None and m.any() and cls == "infected_rbc" and min_parasite > 0 and \
            parasite_share(rgb, m) < min_parasite:
        reason = NO_PARASITE
    if reason is not None or not m.any():
        return Cut(i, cls, label, None, method, reason=reason or "empty mask")
    rgba, (x0, y0, x1, y1) = to_rgba(rgb, m)
    box = (x0 + offset[0], y0 + offset[1], x1 + offset[0], y1 + offset[1])
    bg = None if background is None else tuple(round(float(v), 1) for v in background)
    return Cut(i, cls, label, box, method, png=encode_png(rgba, level=3), diameter=round(mask_diameter(rgba[..., 3]), 2),
               background=bg)


def cut_item(item: Item, fields: bool = True, min_parasite: float = MIN_PARASITE) -> list[Cut]:
    """All sprites and rejections of one source image, and (fields) its plasma field. Never raises for bad input:
    it rejects. An infected red cell whose largest parasite-like body covers less than `min_parasite` of it is
    rejected (`NO_PARASITE`)."""
    if item.skip:
        return [Cut(0, item.cls, "", None, MASK_METHOD.get(item.method, "threshold"), reason=item.skip)]
    try:
        rgb = read_rgb(item.path)
        if item.method == "boxes":
            return _boxes(rgb, item, fields, min_parasite)
        m, reason, method, valid = _single(rgb, item)
        if valid is None:  # a cell cut out on black: no plasma to measure
            return [_cut(0, item.cls, "", rgb, m, reason, method, min_parasite=min_parasite)]
        bg = _background_colour(rgb, valid)
        cuts = [_cut(0, item.cls, "", rgb, m, reason, method, background=bg, min_parasite=min_parasite)]
        if fields and cuts[0].reason is None:
            cuts += _field_cuts(rgb, bg, valid & ~cv2.dilate(m.astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool))
        return cuts
    except BloodcellsError as e:
        msg = str(e)
        reason = "unreadable image" if "readable" in msg or "no such file" in msg else msg.split(": ", 1)[-1]
        if item.mask_path and str(item.mask_path) in msg:
            reason = "unreadable mask"
        return [Cut(0, item.cls, "", None, MASK_METHOD.get(item.method, "threshold"), reason=reason)]
