"""Inference on images of any size and magnification: sliding-window tiles, blending, rescaling, RBC-size estimate.

Tiles: the image (padded with its plasma colour to at least one tile) is cut into `tile`-sized windows that
overlap by `overlap`; each window's class probabilities (softmax of the logits) are weighted by a
separable Gaussian window (sigma = tile / 4, so a tile's centre counts about 7x its edge) and the
weighted mean is taken, so seams between tiles vanish.

Scale: the model was trained at 40x, where a healthy RBC is 37 px across. `scale=f` resizes the
input by f before prediction; the class probabilities are resized back to the input's size with
linear interpolation and the argmax is taken there (smoother borders than resizing the label map
with nearest neighbour). `scale="auto"` uses f = 37 / estimate_rbc_diameter(image).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import cv2
import numpy as np
import torch
from skimage.filters import threshold_multiotsu
from torch import nn

from bloodcells.classes import BY_NAME, NAMES, NUM_CLASSES, PLASMA_RGB, cell_classes
from bloodcells.errors import BloodcellsError
from bloodcells.segmenter.count import MIN_FRACTION, count_cells, table_areas
from bloodcells.segmenter.instances import Cells, find_cells, measure, upsample
from bloodcells.segmenter.runtime import Runtime, resolve_precision

RBC_DIAMETER_40X = BY_NAME["healthy_rbc"].diameter_40x  # 37 px: the size the models were trained at


def tile_starts(length: int, tile: int, overlap: float) -> list[int]:
    """Window offsets along one axis: a stride of tile * (1 - overlap), the last window flush with the end."""
    if length <= tile:
        return [0]
    stride = max(1, int(round(tile * (1.0 - overlap))))
    starts = list(range(0, length - tile, stride))
    return starts + [length - tile]


def blend_window(tile: int) -> np.ndarray:
    """The (tile, tile) Gaussian weight of a tile's pixels: 1 at the centre, about 0.14 at the edges."""
    x = np.arange(tile, dtype=np.float64) - (tile - 1) / 2.0
    w = np.exp(-0.5 * (x / (tile / 4.0)) ** 2)
    return np.outer(w, w).astype(np.float32)


def plasma_colour(image: np.ndarray) -> np.ndarray:
    """A smear's background colour: the per-channel median of its brightest 15% of pixels (float32 RGB)."""
    f = image.reshape(-1, 3).astype(np.float32)
    light = f.mean(axis=1)
    return np.median(f[light >= np.percentile(light, 85)], axis=0)


def pad_to_tile(image: np.ndarray, tile: int) -> np.ndarray:
    """Pad the bottom and right edges with the smear's plasma colour so that both sides are at least `tile`.

    Plasma, not a mirror image: mirrored, a cell cut by the edge becomes a doubled cell no training scene
    shows (white cells and platelets were found in such doubles; bench/RESULTS.md)."""
    h, w = image.shape[:2]
    ph, pw = max(0, tile - h), max(0, tile - w)
    if not ph and not pw:
        return image
    out = np.empty((h + ph, w + pw, 3), np.uint8)
    out[:] = np.clip(np.round(plasma_colour(image)), 0, 255).astype(np.uint8)
    out[:h, :w] = image
    return out


def _runtime(model: nn.Module, precision: str, device: str | torch.device | None, channels_last: bool) -> Runtime:
    """The device the model lives on (or `device`) with the precision resolved for it."""
    if device is None:
        p = next(iter(model.parameters()), None)
        dev = p.device if p is not None else torch.device("cpu")
    else:
        dev = torch.device(device)
    return Runtime(dev, resolve_precision(precision, dev), channels_last=channels_last)


def _outputs(model: nn.Module, x: torch.Tensor, rt: Runtime, num_classes: int) -> torch.Tensor:
    """Softmax class probabilities, then the sigmoid of any instance channels: (N, C [+ k], h, w) float32."""
    with torch.inference_mode(), rt.autocast():
        out = model(rt.batch(x))
    if isinstance(out, (list, tuple)):  # deep supervision heads: average them, as in eval mode
        out = torch.stack([o.float() for o in out]).mean(dim=0)
    out = out.float()
    probs = torch.softmax(out[:, :num_classes], dim=1)
    if out.shape[1] == num_classes:
        return probs
    return torch.cat([probs, torch.sigmoid(out[:, num_classes:])], dim=1)


def _forward(model: nn.Module, x: torch.Tensor, rt: Runtime, num_classes: int, tta: bool = False) -> torch.Tensor:
    """Model outputs as probabilities for one batch; with tta, averaged over the 8 flips and quarter turns (each
    turned back), which every output here is indifferent to."""
    if not tta:
        return _outputs(model, x, rt, num_classes)
    acc = None
    for code in range(8):
        t = x.flip(-1) if code & 1 else x
        t = t.rot90(code >> 1, (-2, -1))
        y = _outputs(model, t, rt, num_classes).rot90(-(code >> 1), (-2, -1))
        y = y.flip(-1) if code & 1 else y
        acc = y if acc is None else acc + y
    return acc / 8.0


def tta_logits(model: nn.Module, x: torch.Tensor, rt: Runtime, num_classes: int) -> torch.Tensor:
    """Test-time augmentation for a batch (N, 3, h, w) as logits: the log of the class probabilities averaged over
    the 8 flips and quarter turns, and the logit of the averaged instance map, so that softmax and sigmoid give
    back the averages (what `cli evaluate --tta` scores)."""
    p = _forward(model, x, rt, num_classes, tta=True).clamp(1e-7, 1 - 1e-7)
    out = torch.log(p[:, :num_classes])
    if p.shape[1] > num_classes:
        out = torch.cat([out, torch.logit(p[:, num_classes:])], dim=1)
    return out


def predict_logits(model: nn.Module, meta: Mapping[str, Any], image: np.ndarray, tile: int = 224,
                   overlap: float = 0.25, batch: int = 8, precision: str = "auto",
                   device: str | torch.device | None = None, channels_last: bool = True, tta: bool = False) -> np.ndarray:
    """Class probabilities (C, H, W) float32 of a uint8 RGB image of any size, blended over overlapping tiles; for
    models with an instance output its map in [0, 1] follows as channel C (and on).

    With channels_last (the default; with bf16 the fastest CPU setting) the model is converted in place.
    tta: average each tile over its 8 flips and quarter turns (8x the compute).
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 RGB image (H, W, 3), got {image.dtype} {image.shape}")
    if not 0.0 <= overlap < 1.0:
        raise BloodcellsError(f"--overlap {overlap}: must be at least 0 and below 1, e.g. 0.25")
    if tile < 1 or batch < 1:
        raise BloodcellsError(f"tile {tile} and batch {batch} must be positive")
    model.eval()
    rt = _runtime(model, precision, device, channels_last)
    model = rt.model(model) if channels_last else model
    num_classes = int(meta.get("config", {}).get("num_classes", NUM_CLASSES))
    h, w = image.shape[:2]
    padded = pad_to_tile(image, tile)
    ph, pw = padded.shape[:2]
    mean = torch.tensor(meta["mean"], dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(meta["std"], dtype=torch.float32).view(1, 3, 1, 1)
    window = torch.from_numpy(blend_window(tile))
    boxes = [(y, x) for y in tile_starts(ph, tile, overlap) for x in tile_starts(pw, tile, overlap)]
    acc: torch.Tensor | None = None
    weight = torch.zeros(ph, pw, dtype=torch.float32)
    src = torch.from_numpy(np.ascontiguousarray(padded))
    for i in range(0, len(boxes), batch):
        part = boxes[i:i + batch]
        x = torch.stack([src[y:y + tile, x0:x0 + tile] for y, x0 in part]).permute(0, 3, 1, 2).float()
        x = (x / 255.0 - mean) / std
        probs = _forward(model, x, rt, num_classes, tta).cpu()
        if acc is None:
            acc = torch.zeros(probs.shape[1], ph, pw, dtype=torch.float32)
        for (y, x0), p in zip(part, probs):
            acc[:, y:y + tile, x0:x0 + tile] += p * window
            weight[y:y + tile, x0:x0 + tile] += window
    assert acc is not None
    acc /= weight
    return acc[:, :h, :w].contiguous().numpy()


def parse_absent(value: str | Sequence[str] | None) -> tuple[int, ...]:
    """Class indices from names ('infected_rbc' or 'a,b' or a list): classes a user's smears are known not to hold."""
    out = sorted(NAMES.index(n) for n in cell_classes(value, "--absent"))
    if len(out) >= NUM_CLASSES - 1:
        raise BloodcellsError("--absent: at least one cell class must stay possible")
    return tuple(out)


def drop_classes(probs: np.ndarray, absent: Sequence[int]) -> np.ndarray:
    """Class probabilities (C, h, w) with the `absent` classes' probability given to the others in proportion to
    theirs: a class a smear cannot hold is never predicted, and nothing else changes where the model was sure."""
    if not absent:
        return probs
    p = probs.copy()
    p[list(absent)] = 0.0
    total = p.sum(axis=0, keepdims=True)
    np.divide(p, np.maximum(total, np.float32(1e-12)), out=p)
    return p


def resize_image(image: np.ndarray, factor: float) -> np.ndarray:
    """Resize by `factor` (area averaging when shrinking, linear when enlarging); at least 1x1."""
    if factor == 1.0:
        return image
    h, w = image.shape[:2]
    size = (max(1, int(round(w * factor))), max(1, int(round(h * factor))))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR)


def labels_at(probs: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Argmax class map (uint8) of probabilities (C, h, w) resized linearly to size (H, W), one class at a time."""
    h, w = size
    if probs.shape[1:] == (h, w):
        return probs.argmax(axis=0).astype(np.uint8)
    best = np.full((h, w), -1.0, np.float32)
    label = np.zeros((h, w), np.uint8)
    for c in range(probs.shape[0]):
        p = cv2.resize(probs[c], (w, h), interpolation=cv2.INTER_LINEAR)
        better = p > best
        best[better] = p[better]
        label[better] = c
    return label


@dataclass
class Prediction:
    """One image's prediction: labels and cells at the input's size, labels at model scale, the factor used."""

    labels: np.ndarray  # uint8 (H, W) at the input's own size; each cell's pixels take its class
    model_labels: np.ndarray  # uint8 at model scale (input resized by `scale`): cell areas there match 40x
    scale: float
    rbc_diameter: float | None = None  # the estimate behind scale='auto'
    cells: Cells | None = None  # one object per cell, at the input's size (instances, class, area, box, ...)
    counts: dict[str, int] | None = None  # cells per class name
    method: str = ""  # how cells were separated: the instance output's name, or 'area' (class regions, area rule)


def parse_scale(value: str | float) -> float | None:
    """'auto' -> None (estimate per image); a positive number -> that factor."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return None
    try:
        f = float(value)
    except ValueError:
        raise BloodcellsError(f"--scale {value!r}: give 'auto' or a positive factor such as 0.36") from None
    if not math.isfinite(f) or f <= 0 or f > 20:
        raise BloodcellsError(f"--scale {value!r}: the factor must be above 0 and at most 20, e.g. 0.36 or auto")
    return f


def auto_scale(image: np.ndarray) -> tuple[float, float]:
    """(factor, estimated RBC diameter px) that brings the image's RBCs to the 40x size of 37 px."""
    d = estimate_rbc_diameter(image)
    return RBC_DIAMETER_40X / d, d


# A smear whose background lies farther than this from the scenes' plasma colour (log-chromaticity distance,
# `plasma_tint`) is tinted beyond anything the scenes were composed on: the smears of BCCD, PBC and LISC, whose
# plasma fields the scenes use, lie 0.05-0.12 from it, Tecom's yellow ground 0.12-0.45 (bench/plasma_tint.py,
# bench/RESULTS.md). predict names such smears and suggests --balance.
TINT_LIMIT = 0.15


def plasma_tint(image: np.ndarray) -> float:
    """How far the smear's background colour lies from the composed scenes' plasma: the distance between their
    log-chromaticities (log RGB less its mean, so brightness does not count); 0 for the same hue."""
    a, b = np.log(np.maximum(plasma_colour(image), 1.0)), np.log(np.asarray(PLASMA_RGB, np.float64))
    return float(np.linalg.norm((a - a.mean()) - (b - b.mean())))


def balance_background(image: np.ndarray) -> np.ndarray:
    """Scale each channel so the smear's background (its brightest 15%) takes the plasma colour of composed scenes."""
    bg = plasma_colour(image)
    return np.clip(image.astype(np.float32) * (np.asarray(PLASMA_RGB, np.float32) / np.maximum(bg, 1.0)) + 0.5,
                   0, 255).astype(np.uint8)


def predict(model: nn.Module, meta: Mapping[str, Any], image: np.ndarray, scale: float | str | None = 1.0,
            tile: int = 224, overlap: float = 0.25, batch: int = 8, precision: str = "auto",
            device: str | torch.device | None = None, balance: bool = False, tta: bool = False,
            cell_area: Mapping[int, float] | None = None, min_fraction: float = MIN_FRACTION,
            absent: Sequence[int] = (), merge: bool | None = None,
            min_confidence: Mapping[int, float] | None = None, sure_infected: float | None = None) -> Prediction:
    """Predict an image at `scale` (a factor; 'auto' or None: estimated); labels and cells come back at the input's size.

    balance: white-balance the background to the training scenes' plasma colour first. tta: average over flips and
    quarter turns. Cells: with an instance output, decoded from it (segmenter/instances.py); without one, each
    connected region of a class is one object and counts split regions by the expected cell area (`cell_area`,
    px at 40x; the class table's discs by default). Objects below `min_fraction` of their class's expected area are
    specks and dropped. absent: class indices the image cannot hold (e.g. infected RBCs in a smear known to be free
    of malaria); their probability goes to the other classes (`drop_classes`). merge: join pieces of one cell that
    the instance output split (`instances.merge_pieces`; None: `instances.MERGE`). min_confidence: per class index,
    cells whose mean top probability is lower are dropped (None: `instances.MIN_CONFIDENCE`, platelets under 0.8;
    {}: none). sure_infected: a red cell is called infected only when the infected class holds at least this share of its
    red-cell probability (None: `instances.SURE_INFECTED`; 0: by majority)."""
    factor = None if scale is None else float(scale) if isinstance(scale, (int, float)) else parse_scale(scale)
    diameter = None
    if factor is None:
        factor, diameter = auto_scale(image)
    small = resize_image(balance_background(image) if balance else image, factor)
    out = predict_logits(model, meta, small, tile=tile, overlap=overlap, batch=batch, precision=precision,
                         device=device, tta=tta)
    num_classes = int(meta.get("config", {}).get("num_classes", NUM_CLASSES))
    probs, aux = drop_classes(out[:num_classes], absent), out[num_classes:]
    areas = table_areas()
    areas.update({int(k): float(v) for k, v in (cell_area or {}).items()})
    min_area = {c: min_fraction * a for c, a in areas.items()}
    model_labels = probs.argmax(axis=0).astype(np.uint8)
    mode = meta.get("config", {}).get("instance")
    cells, mode = find_cells(probs, aux[0] if len(aux) else None, mode, min_area, areas, model_labels, merge,
                             min_confidence, sure_infected)
    labels = model_labels if small.shape[:2] == image.shape[:2] else labels_at(probs, image.shape[:2])
    inst = upsample(cells, labels)
    final = measure(inst, cells.classes, cells.confidence)
    labels = np.zeros(labels.shape, np.uint8)
    labels[final.instances > 0] = final.classes[final.instances[final.instances > 0] - 1]
    counts = count_cells(model_labels, areas, min_fraction) if mode == "area" else \
        {NAMES[c]: n for c, n in cells.counts().items()}
    return Prediction(labels, model_labels, factor, diameter, final, {"background": 0, **counts}, mode)


def predict_labels(model: nn.Module, meta: Mapping[str, Any], image: np.ndarray, scale: float | str | None = 1.0,
                   **kwargs: Any) -> np.ndarray:
    """uint8 class-index map (H, W) at the input's own size (see `predict` for the options)."""
    return predict(model, meta, image, scale, **kwargs).labels


# --- RBC size estimate ---------------------------------------------------------------------------

def cell_signal(image: np.ndarray) -> np.ndarray:
    """0..1 'how much cell' per pixel: Lab distance from the background colour, 0 on background, 1 inside cells.

    The background is the light colour of the brightest 10% of pixels; a three-class Otsu of the distance
    splits background / cells / dark stained parts, and the ramp from 0.3x to 1x the background-cell threshold
    makes RBC bodies (pale centres included) flat 1 so that only cell outlines have gradients; stained
    nuclei and parasites, above the ramp, vanish too.
    """
    lab = cv2.cvtColor(image, cv2.COLOR_RGB2LAB).astype(np.float32)
    light = lab[..., 0] >= np.percentile(lab[..., 0], 90)
    bg = np.median(lab[light], axis=0)
    d = np.linalg.norm((lab - bg) * np.array([0.5, 1.0, 1.0], np.float32), axis=2)
    try:
        t0 = float(threshold_multiotsu(d, classes=3)[0])
    except ValueError:  # a flat image: no cells to measure
        t0 = 0.0
    if t0 <= 0:
        return np.zeros(d.shape, np.float32)
    return np.clip((d - 0.3 * t0) / (0.7 * t0), 0.0, 1.0).astype(np.float32)


def symmetry_scores(signal: np.ndarray, radii: np.ndarray, spread: float = 0.12) -> np.ndarray:
    """Radial-symmetry score per candidate radius: how sharply the outlines' inward votes at that distance meet.

    Every outline pixel votes, with its gradient magnitude, for the point `r` px inside along its gradient; for
    round cells of radius r the votes meet at the centres. The vote map is blurred by sigma = spread * r and
    scored as sum(B^4) / sigma^2 with B = blurred * sigma^2 / r: a fully exposed circle then scores the same
    at every size, so a rescaled image gives the same curve shifted by the scale factor.
    """
    h, w = signal.shape
    f = cv2.GaussianBlur(signal, (0, 0), 1.0)
    gx = cv2.Sobel(f, cv2.CV_32F, 1, 0, ksize=3) / 8.0
    gy = cv2.Sobel(f, cv2.CV_32F, 0, 1, ksize=3) / 8.0
    mag = np.hypot(gx, gy)
    top = float(np.percentile(mag, 99))
    if top <= 0:
        return np.zeros(len(radii))
    ys, xs = np.nonzero(mag > 0.1 * top)
    m = mag[ys, xs]
    ux, uy = gx[ys, xs] / m, gy[ys, xs] / m
    scores = np.zeros(len(radii))
    for i, r in enumerate(radii):
        tx = np.rint(xs + r * ux).astype(np.int64)
        ty = np.rint(ys + r * uy).astype(np.int64)
        ok = (tx >= 0) & (tx < w) & (ty >= 0) & (ty < h)
        votes = np.bincount(ty[ok] * w + tx[ok], weights=m[ok], minlength=h * w).astype(np.float32)
        sigma = max(0.8, spread * r)
        b = cv2.GaussianBlur(votes.reshape(h, w), (0, 0), sigma)
        b *= b
        scores[i] = float(np.dot(b.ravel(), b.ravel())) * (sigma * sigma / r) ** 4 / (sigma * sigma)
    return scores


# The estimate looks at reduced copies: about FIRST_LOOK_PIXELS (250x250) first, which resolves the RBCs of
# common smears (BCCD's 90 px cells become 40 px there) at a small fraction of a prediction's cost; closer only
# where the cells are small.
FIRST_LOOK_PIXELS = 62_500
RESOLVED_PX = 16.0  # cells this wide (working px) are measured well; smaller ones are looked at closer
SHARP_PX = 32.0  # a cell seen smaller than this is measured again where it is about this wide
RADIUS_STEP = 1.05  # candidate radii are 5% apart, in the end
COARSE_STEP = 1.10  # and 10% apart in the first look over all sizes
BAND = 1.3  # a closer look covers radii within this factor of the sizes in question
# an image with room for fewer cells of the measured size than this shows no red cells to measure: the outline
# found is most likely one white cell filling a crop (Tecom's 120 px crops: room for 2-3; PBC's, LISC's crops
# and BCCD's smears: 6 and more)
MIN_ROOM = 5.0


@dataclass
class _Look:
    """The radial-symmetry scores of one working size, summed up (diameters in that size's px)."""

    diameter: float  # at the best score, refined between grid points
    at_smallest: bool  # whether the best score is at the smallest radius looked at
    best_peak: float | None  # the best local maximum inside the range of radii, if any


def _refined_radius(scores: np.ndarray, radii: np.ndarray, k: int) -> float:
    """radii[k], moved between grid points by a parabola through the log scores around it (a proper maximum)."""
    offset = 0.0
    if 0 < k < len(radii) - 1 and np.all(scores[k - 1:k + 2] > 0):
        y0, y1, y2 = np.log(scores[k - 1:k + 2])
        den = y0 - 2 * y1 + y2
        if den < 0:
            offset = float(np.clip(0.5 * (y0 - y2) / den, -0.5, 0.5))
    step = math.log(radii[1] / radii[0])
    return math.exp(math.log(radii[k]) + offset * step)


def _look(signal: np.ndarray, lo: float, hi: float, step: float = RADIUS_STEP) -> _Look | None:
    """Score radii lo..hi (working px, at most a third of the short side) `step` apart on a cell signal."""
    hi = min(hi, min(signal.shape) / 3.0)
    if hi <= lo * step:
        return None
    radii = np.geomspace(lo, hi, max(8, int(math.log(hi / lo) / math.log(step)) + 1))
    # each radius's score is weighted by r: an object's weight grows with its size, so specks and noise do not
    # win by numbers; the weight is a power of r, so the peak still moves exactly with a rescale
    scores = symmetry_scores(signal, radii) * radii
    if not np.any(scores > 0):
        return None
    k = int(np.argmax(scores))
    peaks = [i for i in range(1, len(radii) - 1)
             if scores[i] > 0 and scores[i] >= scores[i - 1] and scores[i] >= scores[i + 1]]
    best = max(peaks, key=lambda i: scores[i]) if peaks else None
    return _Look(2.0 * _refined_radius(scores, radii, k), k == 0,
                 None if best is None else 2.0 * _refined_radius(scores, radii, best))


def estimate_rbc_diameter(image: np.ndarray) -> float:
    """Typical RBC diameter in px: the radius at which cell outlines are most circular (radial-symmetry votes).

    Touching and overlapping cells keep their exposed arcs, which still vote for their own centres, so the
    estimate holds on dense smears where thresholding and watershed splitting merge cells. The scores are
    scale-free, so the image is measured reduced to about FIRST_LOOK_PIXELS and the result scaled back; when
    the best score there is at the smallest radius (cells too small to see, or specks), the sizes below the
    best peak are looked at 2.5x closer, and a cell seen under SHARP_PX wide is measured again, near that
    size, where it is about SHARP_PX wide. Raises BloodcellsError when no cell outline is found, or when the
    image has room for fewer than MIN_ROOM cells of the size found (a crop around one cell shows no red cells).
    """
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an RGB image (H, W, 3), got {image.shape}")
    h, w = image.shape[:2]
    shrink = min(1.0, math.sqrt(FIRST_LOOK_PIXELS / float(h * w)))
    if min(h, w) * shrink / 3.0 <= 3.0:
        raise BloodcellsError(f"image of {w}x{h} px is too small to estimate the cell size; pass --scale FACTOR")
    signals: dict[float, np.ndarray] = {}

    def signal(at: float) -> np.ndarray:
        if at not in signals:
            signals[at] = cell_signal(resize_image(image, at) if at < 1 else image)
        return signals[at]

    first = _look(signal(shrink), 3.0, math.inf, COARSE_STEP)
    if first is None:
        raise BloodcellsError("found no cell outlines to estimate the RBC size (blank image?); pass --scale FACTOR")
    diameter, at = first.diameter, shrink
    if first.at_smallest and shrink < 1:
        closer = min(1.0, 2.5 * shrink)
        reach = max(RESOLVED_PX, first.best_peak or 0.0) / 2.0 * BAND * closer / shrink
        second = _look(signal(closer), 3.0, reach)
        if second is not None and (not second.at_smallest or first.best_peak is None):
            diameter, at = second.diameter, closer
        elif second is not None:  # specks at every size: the cells are the best peak of the first look
            diameter = first.best_peak  # type: ignore[assignment]
    diameter /= at
    # measure finely near that size: where the cells are about SHARP_PX wide if they were seen smaller
    sharp = min(1.0, SHARP_PX / diameter)
    sharp = sharp if sharp > 1.25 * at else at
    radius = diameter * sharp / 2.0
    fine = _look(signal(sharp), radius / BAND, radius * BAND)
    if fine is not None and not fine.at_smallest:
        diameter = fine.diameter / sharp
    if h * w < MIN_ROOM * diameter ** 2:
        raise BloodcellsError(f"image of {w}x{h} px: the cells it shows are {diameter:.0f} px across, room for fewer "
                              f"than {MIN_ROOM:.0f}, too few to tell red cells from one white cell (a crop around one "
                              "cell?); pass --scale FACTOR (1 for cells imaged at about 40x, a red cell 37 px)")
    return diameter
