"""Charts drawn with OpenCV (no matplotlib): training curves and a confusion heatmap, as RGB arrays."""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import cv2
import numpy as np

FONT = cv2.FONT_HERSHEY_SIMPLEX
INK = (40, 40, 40)
GRID = (225, 225, 225)
# a colour-blind-safe cycle (Okabe-Ito), RGB
COLORS = [(0, 114, 178), (213, 94, 0), (0, 158, 115), (204, 121, 167), (230, 159, 0), (86, 180, 233), (0, 0, 0)]


def nice_ticks(lo: float, hi: float, target: int = 5) -> list[float]:
    """About `target` round tick values (1, 2, 5 x 10^k steps) covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return [0.0, 1.0]
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    raw = (hi - lo) / max(target, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.floor(lo / step + 1e-9) * step
    count = int(math.ceil((hi - first) / step - 1e-9)) + 1
    return [round(first + i * step, 12) for i in range(count)]


def _fmt(v: float) -> str:
    return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.1e}"


def _text(img: np.ndarray, s: str, org: tuple[int, int], scale: float = 0.4, color=INK, anchor: str = "left") -> None:
    """Put text with its baseline at org; anchor left, right or centre."""
    (w, _), _ = cv2.getTextSize(s, FONT, scale, 1)
    x = org[0] - (w if anchor == "right" else w // 2 if anchor == "center" else 0)
    cv2.putText(img, s, (int(x), int(org[1])), FONT, scale, color, 1, cv2.LINE_AA)


def _vertical_text(img: np.ndarray, s: str, centre: tuple[int, int], scale: float = 0.45) -> None:
    """Put text rotated 90 degrees counter-clockwise, centred on `centre`."""
    (w, h), base = cv2.getTextSize(s, FONT, scale, 1)
    strip = np.full((h + base + 4, w + 4, 3), 255, np.uint8)
    cv2.putText(strip, s, (2, h + 2), FONT, scale, INK, 1, cv2.LINE_AA)
    strip = cv2.rotate(strip, cv2.ROTATE_90_COUNTERCLOCKWISE)
    sh, sw = strip.shape[:2]
    y0, x0 = max(centre[1] - sh // 2, 0), max(centre[0] - sw // 2, 0)
    region = img[y0:y0 + sh, x0:x0 + sw]
    np.minimum(region, strip[:region.shape[0], :region.shape[1]], out=region)


def line_panel(x: Sequence[float], series: Mapping[str, Sequence[float]], title: str, xlabel: str, ylabel: str,
               size: tuple[int, int] = (480, 360), y_range: tuple[float, float] | None = None,
               log_y: bool = False, legend: str = "upper right") -> np.ndarray:
    """One line chart (RGB, size = (width, height)) with axes, ticks, labels, title and legend; NaNs break lines."""
    width, height = size
    img = np.full((height, width, 3), 255, np.uint8)
    left, right, top, bottom = 62, 14, 30, 44
    x0, x1, y0, y1 = left, width - right, top, height - bottom  # plot area in pixels
    xs = np.asarray(x, dtype=np.float64)
    values = [np.asarray(v, dtype=np.float64) for v in series.values()]
    if log_y:
        with np.errstate(divide="ignore", invalid="ignore"):
            values = [np.where(v > 0, np.log10(np.where(v > 0, v, 1.0)), np.nan) for v in values]
    finite = np.concatenate([v[np.isfinite(v)] for v in values]) if values else np.zeros(0)
    if y_range is not None:
        ylo, yhi = y_range
    elif finite.size:
        ylo, yhi = float(finite.min()), float(finite.max())
    else:
        ylo, yhi = 0.0, 1.0
    if log_y:
        yt = [float(e) for e in range(math.floor(ylo), math.ceil(yhi) + 1)] if math.isfinite(ylo + yhi) else [0.0, 1.0]
    else:
        yt = nice_ticks(ylo, yhi)
    ylo, yhi = (min(ylo, yt[0]), max(yhi, yt[-1])) if y_range is None else (ylo, yhi)
    xlo, xhi = (float(xs.min()), float(xs.max())) if xs.size else (0.0, 1.0)
    if xhi <= xlo:
        xlo, xhi = xlo - 1, xhi + 1
    xt = [t for t in nice_ticks(xlo, xhi, 6) if xlo - 1e-9 <= t <= xhi + 1e-9]
    if xs.size and np.all(xs == np.round(xs)):  # epochs: whole-number ticks only
        xt = [t for t in xt if t == round(t)]

    def px(u: np.ndarray) -> np.ndarray:
        return x0 + (u - xlo) / (xhi - xlo) * (x1 - x0)

    def py(v: np.ndarray) -> np.ndarray:
        return y1 - (v - ylo) / ((yhi - ylo) or 1.0) * (y1 - y0)

    for t in yt:
        if ylo - 1e-9 <= t <= yhi + 1e-9:
            yy = int(round(float(py(np.float64(t)))))
            cv2.line(img, (x0, yy), (x1, yy), GRID, 1)
            cv2.line(img, (x0 - 4, yy), (x0, yy), INK, 1)
            _text(img, _fmt(10 ** t if log_y else t), (x0 - 7, yy + 4), anchor="right")
    for t in xt:
        xx = int(round(float(px(np.float64(t)))))
        cv2.line(img, (xx, y1), (xx, y1 + 4), INK, 1)
        _text(img, _fmt(t), (xx, y1 + 17), anchor="center")
    cv2.rectangle(img, (x0, y0), (x1, y1), INK, 1)
    _text(img, title, (width // 2, 20), scale=0.5, anchor="center")
    _text(img, xlabel, ((x0 + x1) // 2, height - 8), scale=0.45, anchor="center")
    _vertical_text(img, ylabel, (12, (y0 + y1) // 2))

    for i, v in enumerate(values):
        color = COLORS[i % len(COLORS)]
        ok = np.isfinite(v) & np.isfinite(xs[:len(v)])
        pts = np.stack([px(xs[:len(v)]), py(np.clip(v, ylo, yhi))], axis=1)
        # draw each run of finite values as one polyline
        runs = np.split(np.arange(len(v)), np.flatnonzero(np.diff(ok.astype(np.int8)) != 0) + 1)
        for run in runs:
            if run.size and ok[run[0]]:
                p = np.round(pts[run]).astype(np.int32).reshape(-1, 1, 2)
                cv2.polylines(img, [p], False, color, 2, cv2.LINE_AA)
                if len(v) <= 30:
                    for q in p[:, 0]:
                        cv2.circle(img, (int(q[0]), int(q[1])), 3, color, -1, cv2.LINE_AA)

    names = list(series)
    if names:
        rows = 16
        box_w = max(cv2.getTextSize(n, FONT, 0.4, 1)[0][0] for n in names) + 40
        bx1 = x1 - 6
        by0 = y0 + 6 if legend == "upper right" else y1 - 12 - rows * len(names)
        bx0, by1 = bx1 - box_w, by0 + rows * len(names) + 6
        cv2.rectangle(img, (bx0, by0), (bx1, by1), (255, 255, 255), -1)
        cv2.rectangle(img, (bx0, by0), (bx1, by1), (180, 180, 180), 1)
        for i, n in enumerate(names):
            yy = by0 + 12 + i * rows
            cv2.line(img, (bx0 + 6, yy - 4), (bx0 + 28, yy - 4), COLORS[i % len(COLORS)], 2, cv2.LINE_AA)
            _text(img, n, (bx0 + 34, yy))
    return img


def training_curves(history: Sequence[Mapping[str, float]]) -> np.ndarray:
    """Loss and validation-metric panels side by side from per-epoch history rows."""
    epochs = [float(r["epoch"]) for r in history]
    losses = {"train loss": [r["train_loss"] for r in history], "val loss": [r["val_loss"] for r in history]}
    finite = np.array([v for vs in losses.values() for v in vs if v is not None and np.isfinite(v)])
    # early validation losses (batch-norm statistics not settled yet) can be 100x the later ones
    log = bool(finite.size and finite.min() > 0 and finite.max() / finite.min() > 30)
    loss = line_panel(epochs, losses, "Loss" + (" (log scale)" if log else ""), "epoch", "loss", log_y=log)
    metrics = line_panel(epochs, {"pixel accuracy": [r["pixel_accuracy"] for r in history],
                                  "mIoU": [r["miou"] for r in history],
                                  "mean Dice": [r["mean_dice"] for r in history]},
                         "Validation", "epoch", "score", y_range=(0.0, 1.0), legend="lower right")
    return np.concatenate([loss, metrics], axis=1)


def _heat(v: np.ndarray) -> np.ndarray:
    """Map 0..1 to RGB from white to a dark blue."""
    lo, hi = np.array([247, 251, 255], np.float64), np.array([8, 48, 107], np.float64)
    return (lo + (hi - lo) * np.clip(v, 0, 1)[..., None]).round().astype(np.uint8)


def confusion_heatmap(counts: np.ndarray, names: Sequence[str], cell: int = 52) -> np.ndarray:
    """Row-normalised confusion matrix (rows = truth) as an RGB heatmap with class names and values."""
    counts = np.asarray(counts, dtype=np.float64)
    k = counts.shape[0]
    rows = counts.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        norm = np.where(rows > 0, counts / rows, np.nan)
    label_w = max(cv2.getTextSize(n, FONT, 0.42, 1)[0][0] for n in names) + 40
    top = label_w + 10
    width, height = label_w + k * cell + 12, top + k * cell + 12
    img = np.full((height, width, 3), 255, np.uint8)
    gx, gy = label_w, top
    colors = _heat(np.nan_to_num(norm, nan=0.0))
    tiles = np.repeat(np.repeat(colors, cell, axis=0), cell, axis=1)
    tiles[np.repeat(np.repeat(np.isnan(norm), cell, axis=0), cell, axis=1)] = (235, 235, 235)
    img[gy:gy + k * cell, gx:gx + k * cell] = tiles
    for i in range(k + 1):
        cv2.line(img, (gx, gy + i * cell), (gx + k * cell, gy + i * cell), (255, 255, 255), 1)
        cv2.line(img, (gx + i * cell, gy), (gx + i * cell, gy + k * cell), (255, 255, 255), 1)
    for i in range(k):
        for j in range(k):
            v = norm[i, j]
            s = "-" if np.isnan(v) else f"{v:.2f}"
            ink = (255, 255, 255) if (not np.isnan(v) and v > 0.5) else INK
            _text(img, s, (gx + j * cell + cell // 2, gy + i * cell + cell // 2 + 4), 0.38, ink, "center")
        _text(img, names[i], (gx - 8, gy + i * cell + cell // 2 + 4), 0.42, anchor="right")
        _vertical_text(img, names[i], (gx + i * cell + cell // 2, top - 8 - label_w // 2 + 20), 0.42)
    _vertical_text(img, "true class", (10, gy + k * cell // 2), 0.45)
    _text(img, "predicted class", (gx + k * cell // 2, 14), 0.45, anchor="center")
    cv2.rectangle(img, (gx, gy), (gx + k * cell, gy + k * cell), INK, 1)
    return img
