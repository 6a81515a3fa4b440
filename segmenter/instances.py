"""One object per cell: the learned output that separates touching cells, its targets, its loss, and decoding.

The composed scenes' instance maps give exact per-cell masks, also where cells touch and overlap. Two
formulations of the extra output channel (`models.blocks.INSTANCE_OUTPUTS`) are trained from them:

- `distance`: inside each cell, the distance to its own border divided by the cell's largest such distance
  (1 at its middle, falling to 0 at its border; 0 on background). Decoding: seeds are the connected regions where
  the predicted value exceeds `seed` within one group of the class map (RBC, WBC or platelet); a marker
  watershed on the negated map then gives every cell pixel of that group to one seed (where seeds share a
  connected part, only those holding a peak at least `SEED_H` above the pass to a higher one). Touching cells meet
  at a valley of the map however they touch, so this separates the round, crowded cells of a smear well.
- `boundary`: 1 on every cell pixel next to another cell or to the background (the contour, two pixels wide where
  cells touch, as in DCAN), else 0. Decoding: seeds are the cell pixels off the predicted contour; a watershed on the
  contour probability fills the rest.

Both decode at the model's scale (40x), where cells have their trained sizes. `components` is the fallback for
checkpoints without the output: each connected region of one class is one object.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Mapping

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from skimage.morphology import reconstruction
from skimage.segmentation import watershed

from bloodcells.classes import CLASSES, NUM_CLASSES, index_of

MODES = ("distance", "boundary")
DEFAULT_INSTANCE = "distance"  # what `cli train --instance auto` uses on scenes with instance maps (README: why)
GROUP_OF = np.array([("rbc", "wbc", "platelet").index(c.group) + 1 if c.group != "background" else 0
                     for c in CLASSES], np.int32)  # class index -> 0 background, 1 rbc, 2 wbc, 3 platelet
SEED = {"distance": 0.5, "boundary": 0.5}  # decoding thresholds on the predicted map
# where one part of the class map holds several seeds, a seed counts only if it holds a peak of the distance map
# at least SEED_H above the way to any higher one (an h-maximum): a cell with two cores is one cell. Chosen on composed
# val scenes (red cells miscounted 1.31 -> 1.12 a scene); on BCCD RBC F1 +0.02 (bench/RESULTS.md, bench/decode_sweep.py)
SEED_H = {"distance": 0.2, "boundary": 0.0}
# pieces of one cell are joined when together they are no bigger than MERGE_AREA cells of their class and about as
# convex as a cell (area over convex hull area at least MERGE_SOLIDITY); two whole touching cells are twice as big
MERGE_AREA = 1.4
MERGE_SOLIDITY = 0.8
# two vetoes for red cells, which lie crowded and touching: a piece is never joined to an object already MERGE_WHOLE of
# a cell (a whole cell beside a neighbour's sliver, e.g. one the field's edge cut), nor across a contact where the
# distance map stays under MERGE_PASS all along (a border between two cells, not a dip inside one). Chosen on composed
# val scenes: red cells miscounted 1.13 -> 0.99 a scene, PQ unchanged; test 1.54 -> 1.34 (bench/RESULTS.md)
MERGE_WHOLE = 0.8
MERGE_PASS = 0.2
MERGE = True  # what predict and evaluate do when not told (README: why)
# platelets the model is unsure of are mostly faint patches of plasma or stain: on composed val scenes dropping
# those under 0.8 mean probability raises thrombocyte PQ 0.694 -> 0.721 (bench/RESULTS.md)
MIN_CONFIDENCE = {c.index: 0.8 for c in CLASSES if c.group == "platelet"}
# a red cell is called infected only when the infected class holds at least SURE_INFECTED of its red-cell probability
# (summed over its pixels), else healthy: on composed val scenes 0.6 gives the best PQ of both red-cell classes and
# infected counts without bias (+0.58 cells a scene by majority, +0.03 at 0.6, -1.18 at 0.8) (bench/RESULTS.md)
SURE_INFECTED = 0.6
INFECTED, HEALTHY = index_of("infected_rbc"), index_of("healthy_rbc")
RED_GROUP = int(GROUP_OF[HEALTHY])  # the red cells' number in GROUP_OF


# ---- targets --------------------------------------------------------------------------------------

def borders(inst: np.ndarray) -> np.ndarray:
    """Cell pixels with a 4-neighbour of another instance or of the background (the image edge is no border)."""
    b = np.zeros(inst.shape, bool)
    diff_v = inst[1:] != inst[:-1]
    diff_h = inst[:, 1:] != inst[:, :-1]
    b[1:] |= diff_v
    b[:-1] |= diff_v
    b[:, 1:] |= diff_h
    b[:, :-1] |= diff_h
    return b & (inst > 0)


def distance_target(inst: np.ndarray) -> np.ndarray:
    """Per cell, distance to its own border over its largest such distance; 0 on background. float32 (H, W)."""
    inside = (inst > 0) & ~borders(inst)
    d = cv2.distanceTransform(inside.astype(np.uint8), cv2.DIST_L2, 3)
    n = int(inst.max())
    if n == 0:
        return np.zeros(inst.shape, np.float32)
    top = np.zeros(n + 1, np.float32)
    top[1:] = ndimage.maximum(d, inst, index=np.arange(1, n + 1))
    scale = np.where(top > 0, 1.0 / np.maximum(top, 1e-6), 0.0).astype(np.float32)
    out = d * scale[inst]
    out[(inst > 0) & (top[inst] == 0)] = 1.0  # a cell too thin to have an inside: all of it is its middle
    return out


def instance_target(inst: np.ndarray, mode: str) -> np.ndarray:
    """The training target of the instance output for one instance map: float32 (H, W) in [0, 1]."""
    if mode == "distance":
        return distance_target(inst)
    if mode == "boundary":
        return borders(inst).astype(np.float32)
    raise ValueError(f"unknown instance output {mode!r}")


def instance_loss(aux: torch.Tensor, target: torch.Tensor, mode: str) -> torch.Tensor:
    """Binary cross-entropy of the instance channel's logits (N, 1, H, W) against targets (N, H, W) in [0, 1]."""
    logits = aux[:, 0].float()
    # contours are a small share of the pixels: weigh them up so that the net does not learn to predict none
    weight = 1.0 + 2.0 * target if mode == "boundary" else None
    return F.binary_cross_entropy_with_logits(logits, target.float(), weight=weight)


def to_probability(aux: np.ndarray | torch.Tensor):
    """The instance channel's logits -> the predicted map in [0, 1] (sigmoid)."""
    return torch.sigmoid(aux) if isinstance(aux, torch.Tensor) else 1.0 / (1.0 + np.exp(-aux))


# ---- decoding -------------------------------------------------------------------------------------

@dataclass
class Cells:
    """Objects found in one image: an instance map (k = the k-th row, 0 = none) and one row of facts per object."""

    instances: np.ndarray  # int32 (H, W)
    classes: np.ndarray  # (n,) class index of each object (1..9)
    areas: np.ndarray  # (n,) pixels
    confidence: np.ndarray  # (n,) mean probability of its class over its pixels
    boxes: np.ndarray  # (n, 4) x0, y0, x1, y1 (x1, y1 exclusive)
    centres: np.ndarray  # (n, 2) cx, cy (pixel centroid)

    def __len__(self) -> int:
        return len(self.classes)

    def counts(self) -> dict[int, int]:
        """Objects per class index (1..9)."""
        return {c: int((self.classes == c).sum()) for c in range(1, NUM_CLASSES)}


def _facts(inst: np.ndarray, probs: np.ndarray | None, labels: np.ndarray, n: int) -> tuple[np.ndarray, ...]:
    """(classes, areas, confidence) of objects 1..n: the class most of an object's pixels have in the class map, and
    the mean of the top class probability over its pixels (1 without probabilities)."""
    flat = inst.ravel()
    hist = np.bincount(flat * NUM_CLASSES + labels.ravel(), minlength=(n + 1) * NUM_CLASSES)
    hist = hist.reshape(n + 1, NUM_CLASSES)[1:]
    areas = hist.sum(axis=1).astype(np.int64)
    classes = hist[:, 1:].argmax(axis=1) + 1
    if probs is None:
        return classes.astype(np.int64), areas, np.ones(n)
    top = np.bincount(flat, weights=probs.max(axis=0).ravel(), minlength=n + 1)[1:]
    return classes.astype(np.int64), areas, top / np.maximum(areas, 1)


def sure_infected(inst: np.ndarray, probs: np.ndarray, classes: np.ndarray, least: float) -> np.ndarray:
    """Object classes with each red cell called infected turned healthy unless the infected class holds at least
    `least` of its red-cell probability (summed over its pixels)."""
    n = len(classes)
    flat = inst.ravel()
    inf = np.bincount(flat, weights=probs[INFECTED].ravel(), minlength=n + 1)[1:]
    rbc = inf + np.bincount(flat, weights=probs[HEALTHY].ravel(), minlength=n + 1)[1:]
    return np.where((classes == INFECTED) & (inf < least * rbc), HEALTHY, classes)


def _finish(inst: np.ndarray, probs: np.ndarray | None, labels: np.ndarray,
            min_area: Mapping[int, float] | None, min_confidence: Mapping[int, float] | None = None,
            infected: float | None = None) -> Cells:
    """Drop objects below their class's speck size or (with probabilities) below its least confidence, call red
    cells infected only above `infected` (`sure_infected`; None or 0: by majority), renumber 1..n, and measure them."""
    n = int(inst.max())
    classes, areas, conf = _facts(inst, probs, labels, n)
    if infected and probs is not None and n:
        classes = sure_infected(inst, probs, classes, infected)
    drop = np.zeros(n + 1, bool)
    if min_area:
        drop[1:] |= areas < np.array([min_area.get(int(c), 0.0) for c in classes])
    if min_confidence and probs is not None:
        drop[1:] |= conf < np.array([min_confidence.get(int(c), 0.0) for c in classes])
    if drop.any():
        inst = np.where(drop[inst], 0, inst)
    return measure(inst, classes, conf)


def decode(probs: np.ndarray, aux: np.ndarray, mode: str, min_area: Mapping[int, float] | None = None,
           seed: float | None = None, labels: np.ndarray | None = None,
           cell_area: Mapping[int, float] | None = None, min_confidence: Mapping[int, float] | None = None,
           infected: float | None = None, h: float | None = None, merge_area: float = MERGE_AREA,
           whole: float | None = None, least_pass: float | None = None) -> Cells:
    """Cells from class probabilities (C, H, W) and the predicted instance map (H, W) in [0, 1] (labels: their
    argmax, when the caller has it already). cell_area (px per class at the map's scale): join the pieces of one
    cell the map split (`merge_pieces`, up to merge_area cells together; red cells not to an object already `whole`
    of a cell, nor across a contact where the map stays under `least_pass`: None, MERGE_WHOLE and MERGE_PASS); None
    leaves the watershed's objects as they are. min_confidence: per class,
    objects whose mean top probability is lower are dropped (`MIN_CONFIDENCE`). infected: the least share of a red
    cell's probability that calls it infected (`SURE_INFECTED`; None: by majority). h: where a part holds several
    seeds, keep those holding a peak of the map at least h high (`SEED_H`; 0: all; `flood`)."""
    labels = probs.argmax(axis=0).astype(np.uint8) if labels is None else labels
    group = GROUP_OF[labels]
    t = SEED[mode] if seed is None else seed
    h = SEED_H.get(mode, 0.0) if h is None else h
    if mode == "distance":
        seeds, elevation = aux > t, -aux
    elif mode == "boundary":
        seeds, elevation = aux < t, aux
    else:
        raise ValueError(f"unknown instance output {mode!r}")

    def cells_of(mask: np.ndarray) -> tuple[np.ndarray, int]:
        return flood(mask, seeds, elevation, h)

    inst = _per_group(group, cells_of)
    if cell_area:
        lp = MERGE_PASS if least_pass is None else least_pass
        inst = merge_pieces(inst, labels, cell_area, limit=merge_area, whole=MERGE_WHOLE if whole is None else whole,
                            height=aux if mode == "distance" and lp > 0 else None, least_pass=lp)
    return _finish(inst, probs, labels, min_area, min_confidence, infected)


def find_cells(probs: np.ndarray, aux: np.ndarray | None, mode: str | None, min_area: Mapping[int, float],
               cell_area: Mapping[int, float], labels: np.ndarray | None = None, merge: bool | None = None,
               min_confidence: Mapping[int, float] | None = None,
               infected: float | None = None) -> tuple[Cells, str]:
    """Cells as predict and evaluate find them, and how: decoded from the instance map `aux` (H, W) of a model with
    an instance output (`mode`), the pieces of one cell joined (merge; None: MERGE), unsure objects dropped
    (min_confidence; None: MIN_CONFIDENCE, {}: none) and red cells called infected only when sure (infected: the
    least share, None: SURE_INFECTED, 0: by majority); without an instance output, each region of a group is an
    object ('area')."""
    labels = probs.argmax(axis=0).astype(np.uint8) if labels is None else labels
    sure = MIN_CONFIDENCE if min_confidence is None else min_confidence
    least = SURE_INFECTED if infected is None else infected
    if mode and aux is not None:
        join = MERGE if merge is None else merge
        return decode(probs, aux, mode, min_area, labels=labels, cell_area=cell_area if join else None,
                      min_confidence=sure, infected=least), mode
    return components(labels, min_area, probs, sure, least), "area"


def _solidity(area: float, hull: np.ndarray) -> float:
    """Pixel area over the area of a convex hull of pixel centres grown by half a pixel all round (pixels as
    squares)."""
    return area / (cv2.contourArea(hull) + cv2.arcLength(hull, True) / 2.0 + 1.0)


def merge_pieces(inst: np.ndarray, labels: np.ndarray, cell_area: Mapping[int, float],
                 limit: float = MERGE_AREA, solidity: float = MERGE_SOLIDITY, whole: float = 0.0,
                 height: np.ndarray | None = None, least_pass: float = 0.0) -> np.ndarray:
    """Join touching objects of one group that are pieces of one cell: together no bigger than `limit` expected
    cells of their class (that of the bigger piece; `cell_area`: px per class) and about as convex as a cell
    (area / convex hull area >= `solidity`). Red cells only: not when the bigger one alone is already `whole`
    expected cells, nor (given the distance map `height`) when the map stays under `least_pass` all along their
    contact. Pairs are tried longest shared border first, and a joined object is tried again with its other
    neighbours. Ids of joined objects are left unused (`measure` renumbers)."""
    n = int(inst.max())
    if n < 2:
        return inst
    classes, areas, _ = _facts(inst, None, labels, n)
    group = GROUP_OF[classes]
    pairs, passes = [], []
    for a, b in ((np.s_[:, :-1], np.s_[:, 1:]), (np.s_[:-1], np.s_[1:])):  # right and lower neighbours
        touch = (inst[a] != inst[b]) & (inst[a] > 0) & (inst[b] > 0)
        pairs.append(np.stack([inst[a][touch], inst[b][touch]], axis=1))
        if height is not None:
            passes.append(np.minimum(height[a][touch], height[b][touch]))
    p = np.sort(np.concatenate(pairs), axis=1)
    if not len(p):
        return inst
    p, pair_of, contact = np.unique(p, axis=0, return_inverse=True, return_counts=True)
    same = group[p[:, 0] - 1] == group[p[:, 1] - 1]
    if height is not None:  # the highest the map stays between two red objects: a cut through one cell stays up
        top_pass = np.full(len(p), -np.inf)
        np.maximum.at(top_pass, pair_of.ravel(), np.concatenate(passes).astype(np.float64))
        same &= (top_pass >= least_pass) | (group[p[:, 0] - 1] != RED_GROUP)
    p, contact = p[same], contact[same]
    if not len(p):
        return inst
    root = np.arange(n + 1)
    area = np.concatenate([[0], areas]).astype(np.float64)
    biggest = np.arange(n + 1)  # the largest piece of each joined object, whose class names its size
    boxes = [None, *ndimage.find_objects(inst, max_label=n)]

    hulls: dict[int, np.ndarray] = {}  # convex hull (image coordinates) of each object tried so far

    def find(x: int) -> int:
        while root[x] != x:
            root[x] = root[root[x]]
            x = root[x]
        return x

    def hull(r: int) -> np.ndarray:
        # the hull of a joined object is the hull of its pieces' hulls, so no pixel is looked at twice
        if r not in hulls:
            ys, xs = boxes[r]
            pts = cv2.findNonZero((inst[boxes[r]] == r).astype(np.uint8))
            hulls[r] = cv2.convexHull(pts + np.array([xs.start, ys.start], np.int32))
        return hulls[r]

    for i in np.argsort(-contact, kind="stable"):
        ra, rb = find(int(p[i, 0])), find(int(p[i, 1]))
        if ra == rb:
            continue
        big = biggest[ra] if areas[biggest[ra] - 1] >= areas[biggest[rb] - 1] else biggest[rb]
        expected = cell_area.get(int(classes[big - 1]), 0.0)
        total = area[ra] + area[rb]
        if expected <= 0 or total > limit * expected:
            continue
        if whole and group[big - 1] == RED_GROUP and max(area[ra], area[rb]) >= whole * expected:
            continue
        joined = cv2.convexHull(np.concatenate([hull(ra), hull(rb)]))
        if _solidity(total, joined) < solidity:
            continue
        root[rb] = ra
        area[ra], biggest[ra], hulls[ra] = total, big, joined
    lut = np.array([find(k) for k in range(n + 1)], np.int32)
    return lut[inst]


def flood(mask: np.ndarray, seeds: np.ndarray, elevation: np.ndarray, h: float = 0.0) -> tuple[np.ndarray, int]:
    """Objects of one group (ids 1..n within mask, n): each seed region grown over its part of the mask by a marker
    watershed on `elevation`; parts no seed reaches become objects of their own.

    The same as one watershed over the whole mask, but run only where it decides something: a connected part of
    the mask with one seed is that seed's object as it is, and a part with several seeds is flooded within its own
    bounding box (a smear's cells mostly lie apart, so this costs a fraction of flooding the whole image). h > 0:
    in a part with several seeds, only the seeds holding an h-maximum of -elevation (a peak at least h above the
    lowest pass to any higher peak, within the part) seed it; if one seed is left, the part is one object."""
    n_parts, parts = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8, ltype=cv2.CV_32S)
    # seeds of this group only, so cells of different groups never share a seed or flood into each other
    n_seeds, markers = cv2.connectedComponents((seeds & mask).astype(np.uint8), connectivity=8, ltype=cv2.CV_32S)
    seed_part = np.zeros(n_seeds, np.int64)  # the part each seed lies in
    where = markers > 0
    seed_part[markers[where]] = parts[where]
    per_part = np.bincount(seed_part[1:], minlength=n_parts)
    doubtful = np.zeros(n_parts, bool)  # parts where some seed might not hold a peak h high
    if h > 0 and (per_part >= 2).any():
        # every way from one seed to another leaves the seeds, so its pass is at most the highest non-seed pixel of
        # the part: a seed whose peak stands h above that is kept, and so is each part's highest seed
        height = -elevation
        # per-label maxima over the labelled pixels only (scipy sorts what it is given: the rest of the image is waste)
        peak = ndimage.maximum(height[where], markers[where], np.arange(1, n_seeds)) if n_seeds > 1 else np.zeros(0)
        off = (parts > 0) & ~where
        off_seed = ndimage.maximum(height[off], parts[off], np.arange(n_parts))
        top = np.full(n_parts, -np.inf)
        np.maximum.at(top, seed_part[1:], peak)
        low = (peak - off_seed[seed_part[1:]] < h) & (peak < top[seed_part[1:]])
        doubtful[seed_part[1:][low]] = True
    out = np.zeros(mask.shape, np.int32)
    next_id = 1
    for k, sl in enumerate(ndimage.find_objects(parts), start=1):
        if sl is None:
            continue
        part = parts[sl] == k
        marks = markers[sl] * part
        n_kept = per_part[k]
        if n_kept >= 2 and doubtful[k]:  # keep only the seeds that hold a peak of the map at least h high
            marks = _drop_shallow(marks, np.where(part, -elevation[sl], -np.inf), peak, h)
            n_kept = len(np.unique(marks[marks > 0]))
        if n_kept >= 2:
            region = watershed(elevation[sl], marks, mask=part)
            ids = np.unique(region[region > 0])
            lut = np.zeros(int(region.max()) + 1, np.int32)
            lut[ids] = np.arange(next_id, next_id + len(ids), dtype=np.int32)
            out[sl][part] = lut[region[part]]
            next_id += len(ids)
        else:  # one seed (or none: a small or faint cell no seed reached): the part is one object
            out[sl][part] = next_id
            next_id += 1
    return out, next_id - 1


# Up to this many seeds in a part, each is asked on its own (a connected-components pass over the part each:
# cheapest for the two or three cores of a folded cell, and still for the few dozen of a crowded BCCD field, where
# one reconstruction costs about 15 ms); beyond it one reconstruction answers all at once.
SHALLOW_EACH_MAX = 64


def _drop_shallow(marks: np.ndarray, height: np.ndarray, peak: np.ndarray, h: float,
                  each_max: int | None = None) -> np.ndarray:
    """Seeds (ids in marks, peak[id - 1] their highest value of height; -inf outside the part) without a peak h
    high: a seed whose peak p is joined to a higher pixel by pixels all above p - h (an h-maximum's definition) is
    cleared from marks; the highest seeds are kept.

    Many seeds (a weak model's or a strange smear's speckle: thousands in one part) are answered by one grey-level
    reconstruction by dilation of height - h under height: at a seed's top pixel it rises above p - h exactly
    when such a path exists (its value there is the best, over higher pixels y joined to the top, of
    min(height(y) - h, the lowest pixel of the path)). Asking each seed on its own costs seeds x part area:
    minutes a smear for such a model."""
    ids = np.unique(marks[marks > 0])
    tops = peak[ids - 1]
    if len(ids) < 2:
        return marks
    if len(ids) <= (SHALLOW_EACH_MAX if each_max is None else each_max):
        drop = []
        for sid, p in zip(ids, tops):
            if p >= tops.max():
                continue
            _, comp = cv2.connectedComponents((height > p - h).view(np.uint8), connectivity=8, ltype=cv2.CV_32S)
            at = np.argmax(np.where(marks == sid, height, -np.inf))
            joined = comp == comp.flat[at]
            if (height[joined] > p).any():
                drop.append(sid)
        drop = np.array(drop, ids.dtype)
    else:
        inside = np.isfinite(height)
        f = np.where(inside, height, height[inside].min() - 2 * h - 1).astype(np.float64)  # outside: below any pass
        rec = reconstruction(f - h, f, method="dilation")
        at = ndimage.maximum_position(f, marks, ids)
        raised = np.array([rec[yx] > f[yx] - h for yx in at])
        drop = ids[raised & (tops < tops.max())]
    return np.where(np.isin(marks, drop), 0, marks) if len(drop) else marks


def _per_group(group: np.ndarray, cells_of) -> np.ndarray:
    """One instance map from objects found group by group (`cells_of(mask)` -> (ids 1..n within mask, n))."""
    inst = np.zeros(group.shape, np.int32)
    offset = 0
    for g in (1, 2, 3):
        mask = group == g
        if mask.any():
            region, n = cells_of(mask)
            inst = np.where(mask, region + offset * (region > 0), inst)
            offset += n
    return inst


def components(labels: np.ndarray, min_area: Mapping[int, float] | None = None,
               probs: np.ndarray | None = None, min_confidence: Mapping[int, float] | None = None,
               infected: float | None = None) -> Cells:
    """Cells as the 8-connected regions of each group of the class map (RBC, WBC, platelet), each of its majority
    class: what models without an instance output give (touching cells of a group stay one object)."""
    def regions(mask: np.ndarray) -> tuple[np.ndarray, int]:
        n, cc = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8, ltype=cv2.CV_32S)
        return cc, n - 1

    return _finish(_per_group(GROUP_OF[labels], regions), probs, labels, min_area, min_confidence, infected)


@lru_cache(maxsize=4)
def _grid(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Flat row and column coordinates of an image shape (kept: a video's frames share one shape)."""
    ys, xs = np.indices(shape, dtype=np.float64)
    return ys.ravel(), xs.ravel()


def measure(inst: np.ndarray, classes: np.ndarray, confidence: np.ndarray) -> Cells:
    """Cells of an instance map whose objects' classes and confidences are known (e.g. after resizing the map):
    objects that vanished are dropped and the rest renumbered 1..n."""
    n = len(classes)
    areas = np.bincount(inst.ravel(), minlength=n + 1)[1:n + 1]
    keep = areas > 0
    lut = np.zeros(n + 1, np.int32)
    lut[1:][keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    inst = lut[inst]
    m = int(keep.sum())
    boxes = np.zeros((m, 4), np.int64)
    for k, sl in enumerate(ndimage.find_objects(inst, max_label=m)):
        if sl is not None:
            boxes[k] = (sl[1].start, sl[0].start, sl[1].stop, sl[0].stop)
    areas = areas[keep]
    if m:
        ys, xs = _grid(inst.shape)
        flat = inst.ravel()
        centres = np.stack([np.bincount(flat, weights=xs, minlength=m + 1)[1:] / areas,
                            np.bincount(flat, weights=ys, minlength=m + 1)[1:] / areas], axis=1)
    else:
        centres = np.zeros((0, 2))
    return Cells(inst, np.asarray(classes)[keep], areas.astype(np.int64), np.asarray(confidence)[keep], boxes, centres)


def upsample(cells: Cells, labels: np.ndarray) -> np.ndarray:
    """The instance map resized (nearest) to a label map of another size, kept only where that map shows a cell."""
    h, w = labels.shape
    inst = cells.instances
    if inst.shape != (h, w):
        inst = cv2.resize(inst, (w, h), interpolation=cv2.INTER_NEAREST)
    return np.where(labels > 0, inst, 0).astype(np.int32)


CELL_COLUMNS = ("id", "class", "area_px", "cx", "cy", "x0", "y0", "x1", "y1", "confidence")


def cell_rows(cells: Cells) -> list[dict]:
    """One row per object, as in `<stem>_cells.csv`: id (its number in the instance map), class name, area in
    pixels, centroid, box (x1, y1 exclusive) and confidence."""
    from bloodcells.classes import NAMES

    return [{"id": k + 1, "class": NAMES[int(c)], "area_px": int(a), "cx": round(float(x), 1), "cy": round(float(y), 1),
             "x0": int(b[0]), "y0": int(b[1]), "x1": int(b[2]), "y1": int(b[3]), "confidence": round(float(p), 4)}
            for k, (c, a, (x, y), b, p) in enumerate(zip(cells.classes, cells.areas, cells.centres, cells.boxes,
                                                         cells.confidence))]


def rbc_summary(counts: Mapping[str, int]) -> dict[str, float | int | None]:
    """Red cells in all and the share infected (parasitaemia, %; None without red cells)."""
    infected, healthy = int(counts.get("infected_rbc", 0)), int(counts.get("healthy_rbc", 0))
    total = infected + healthy
    return {"rbc_total": total, "parasitemia_pct": round(100.0 * infected / total, 2) if total else None}
