"""The optics and camera of a microscope, applied to a composed scene's image (labels are never touched).

Images are float32 RGB in 0..255, the composer's working format (it rounds to uint8 at the end). The pure
effects (`defocus`, `chromatic_offset`, `vignetting`, `jpeg_artifacts`) depend only on their arguments;
`sensor_noise` and `apply_optics` draw from the `numpy.random.Generator` passed in. None modifies its input.

`apply_optics` draws one value per effect from the ranges of a config (`OPTICS_DEFAULTS`, the default of
a recipe's `look.optics`) and applies them in physical order: lens (defocus, lateral chromatic
aberration), illumination falloff (vignetting), sensor (read and shot noise), camera compression (JPEG).
All ranges zero (and `jpeg_p` 0) is "off": the output equals the input bit for bit.
"""
from __future__ import annotations

import math
from functools import lru_cache

import cv2
import numpy as np

from bloodcells.degrade import jpeg_roundtrip, poisson_gaussian
from bloodcells.errors import BloodcellsError

OPTICS_DEFAULTS: dict = {
    # mild: the composer's own look (blur, noise, illumination) already varies scenes; these add what a
    # real microscope and camera do on top, at strengths seen on ordinary lab set-ups
    "defocus": [0.0, 0.8],  # pillbox (disc) blur radius in px; below 0.3 px it is the identity
    "chromatic": [0.0, 0.4],  # lateral chromatic aberration: px that red (out) and blue (in) move at the corners
    "vignetting": [0.0, 0.1],  # fraction of light lost at the corners
    "vignetting_offset": 0.3,  # the falloff's centre moves up to this fraction of the half-size (off-centre tiles)
    "read_noise": [0.0, 1.5],  # std of the signal-independent sensor noise, grey levels
    "shot_noise": [0.0, 0.02],  # photon noise: variance per grey level of signal (std 2.1 on a 230 background)
    "jpeg": [75, 95],  # JPEG quality range
    "jpeg_p": 0.25,  # probability that a scene is JPEG-compressed
}
_RANGE_KEYS = ("defocus", "chromatic", "vignetting", "read_noise", "shot_noise", "jpeg")
_MIN_RADIUS = 0.3  # a disc this small stays inside its own pixel: no visible blur
_MIN_SHIFT = 0.01  # px at the corners


def resolve_optics(cfg: dict | None, where: str = "look.optics") -> dict:
    """OPTICS_DEFAULTS overridden by cfg, checked: one BloodcellsError naming the key and what is allowed."""
    cfg = cfg or {}
    for k in cfg:
        if k not in OPTICS_DEFAULTS:
            raise BloodcellsError(f"unknown key '{where}.{k}'; allowed here: {', '.join(OPTICS_DEFAULTS)}")
    out = {**OPTICS_DEFAULTS, **cfg}
    for k in _RANGE_KEYS:
        v = out[k]
        if (not isinstance(v, (list, tuple)) or len(v) != 2 or not all(isinstance(x, (int, float)) for x in v)
                or not 0 <= v[0] <= v[1]):
            raise BloodcellsError(f"'{where}.{k}' must be [lo, hi] with 0 <= lo <= hi, e.g. {OPTICS_DEFAULTS[k]}")
    if out["jpeg"][1] > 100:
        raise BloodcellsError(f"'{where}.jpeg' is a JPEG quality range within 0..100, e.g. {OPTICS_DEFAULTS['jpeg']}")
    for k in ("jpeg_p", "vignetting_offset"):
        if not isinstance(out[k], (int, float)) or not 0 <= out[k] <= 1:
            raise BloodcellsError(f"'{where}.{k}' must be a number in 0..1, e.g. {OPTICS_DEFAULTS[k]}")
    return out


@lru_cache(maxsize=128)
def disc_kernel(radius: float, supersample: int = 16) -> np.ndarray:
    """Pillbox kernel: each tap is the share of a disc of radius px that falls in that pixel (sums to 1)."""
    half = max(0, math.ceil(radius + 0.5) - 1)  # the farthest pixel the disc reaches
    n = (2 * half + 1) * supersample
    c = (np.arange(n, dtype=np.float64) + 0.5) / supersample - (half + 0.5)  # sub-pixel centres
    inside = (c[None, :] ** 2 + c[:, None] ** 2) <= radius * radius
    k = inside.reshape(2 * half + 1, supersample, 2 * half + 1, supersample).sum(axis=(1, 3)).astype(np.float64)
    if k.sum() == 0:  # a disc smaller than the sampling: a point
        return np.ones((1, 1), np.float32)
    return (k / k.sum()).astype(np.float32)


def defocus(img: np.ndarray, radius: float) -> np.ndarray:
    """Out-of-focus blur: convolution with an anti-aliased disc of radius px (identity below 0.3 px)."""
    if radius < _MIN_RADIUS:
        return img.copy()
    # radii quantised to 1/20 px keep the kernel cache small; nobody sees the difference
    return cv2.filter2D(img, -1, disc_kernel(round(radius * 20) / 20), borderType=cv2.BORDER_REFLECT)


def _corner_radius(h: int, w: int) -> float:
    return math.hypot((w - 1) / 2.0, (h - 1) / 2.0)


def _magnify(channel: np.ndarray, m: float) -> np.ndarray:
    """Magnify one channel by m about the image centre (linear interpolation, reflected border)."""
    h, w = channel.shape
    cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
    inv = 1.0 / m  # output pixel p samples the input at c + (p - c) / m
    mat = np.array([[inv, 0.0, cx * (1 - inv)], [0.0, inv, cy * (1 - inv)]], np.float64)
    return cv2.warpAffine(channel, mat, (w, h), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_REFLECT)


def chromatic_offset(img: np.ndarray, shift: float) -> np.ndarray:
    """Lateral chromatic aberration: red magnified by 1 + k and blue by 1 - k about the centre, k chosen so
    the corners move by shift px (red outward for shift > 0); green, the reference, stays."""
    if abs(shift) < _MIN_SHIFT:
        return img.copy()
    h, w = img.shape[:2]
    k = shift / _corner_radius(h, w)
    out = img.copy()  # cv2.split + cv2.merge, with their fresh buffers, took 4x as long in a per-scene chain
    out[..., 0] = _magnify(np.ascontiguousarray(img[..., 0]), 1 + k)
    out[..., 2] = _magnify(np.ascontiguousarray(img[..., 2]), 1 - k)
    return out


@lru_cache(maxsize=8)
def _r2_field(h: int, w: int) -> np.ndarray:
    """(r / r_corner)^2 about the centre of an (h + 2 * (h // 2 + 1), w + 2 * (w // 2 + 1)) field, 3 channels:
    an (h, w) window of it is the falloff for a centre moved by whole px, with no per-call grid."""
    my, mx = h // 2 + 1, w // 2 + 1
    rc2 = np.float32(_corner_radius(h, w) ** 2)
    dx2 = ((np.arange(w + 2 * mx, dtype=np.float32) - np.float32(mx + (w - 1) / 2.0)) ** 2 / rc2)[None, :]
    dy2 = ((np.arange(h + 2 * my, dtype=np.float32) - np.float32(my + (h - 1) / 2.0)) ** 2 / rc2)[:, None]
    r2 = dx2 + dy2
    return cv2.merge([r2, r2, r2])


def _r2_window(h: int, w: int, dx: float, dy: float) -> np.ndarray:
    """(r / r_corner)^2 about the image centre moved by (dx, dy), rounded to whole px (and to at most
    half the image): the falloff is far smoother than a pixel."""
    my, mx = h // 2 + 1, w // 2 + 1
    x0 = mx - min(max(int(round(dx)), -mx), mx)
    y0 = my - min(max(int(round(dy)), -my), my)
    return _r2_field(h, w)[y0:y0 + h, x0:x0 + w]


def vignetting(img: np.ndarray, strength: float, centre: tuple[float, float] | None = None) -> np.ndarray:
    """Radial light falloff: multiply by 1 - strength * (r / r_corner)^2 (the leading term of cos^4), r from
    centre (x, y) in px (default the image centre; moved from it by whole px, at most half the image) and
    r_corner the centre-to-corner distance of the image."""
    if strength <= 0:
        return img.copy()
    h, w = img.shape[:2]
    dx, dy = (0.0, 0.0) if centre is None else (centre[0] - (w - 1) / 2.0, centre[1] - (h - 1) / 2.0)
    r2 = _r2_window(h, w, dx, dy)
    out = cv2.multiply(img, r2, scale=float(strength))
    cv2.subtract(img, out, dst=out)  # in place: a fresh buffer per step costs page faults
    # an off-centre falloff can pass 1 at the far corner, and light never goes negative (the corners'
    # sum bounds the largest factor without scanning the grid)
    if strength * float(r2[0, 0, 0] + r2[-1, -1, 0] + r2[0, -1, 0] + r2[-1, 0, 0]) > 1:
        np.maximum(out, 0, out=out)
    return out


def sensor_noise(img: np.ndarray, rng: np.random.Generator, read_std: float, shot: float) -> np.ndarray:
    """Poisson-Gaussian sensor noise: Gaussian with variance read_std^2 + shot * intensity per pixel and
    channel (float32, not clipped, so the mean stays unbiased until the final rounding)."""
    if read_std <= 0 and shot <= 0:
        return img.copy()
    return poisson_gaussian(img, rng, read_std, shot)


def jpeg_artifacts(img: np.ndarray, quality: int) -> np.ndarray:
    """Round to uint8, JPEG encode/decode at quality (0..100), back to float32."""
    u8 = cv2.convertScaleAbs(np.maximum(img, 0))  # rounds and saturates (of |x|, hence the floor at 0)
    return jpeg_roundtrip(u8, quality).astype(np.float32)


def _lerp(r: list | tuple, u: float) -> float:
    return float(r[0] + (r[1] - r[0]) * u)


def apply_optics(img: np.ndarray, rng: np.random.Generator, cfg: dict | None = None) -> np.ndarray:
    """Draw this scene's optics from cfg's ranges (missing keys: OPTICS_DEFAULTS; check a recipe's with
    resolve_optics once) and apply them: defocus, chromatic offset, vignetting, sensor noise, JPEG."""
    c = OPTICS_DEFAULTS if cfg is None else {**OPTICS_DEFAULTS, **cfg}
    # a fixed number of draws, so that changing one range leaves every other effect of a scene as it was
    u = rng.random(10)
    h, w = img.shape[:2]
    radius = _lerp(c["defocus"], u[0])
    shift = _lerp(c["chromatic"], u[1]) * (1.0 if u[2] < 0.5 else -1.0)
    strength = _lerp(c["vignetting"], u[3])
    off = float(c["vignetting_offset"])
    centre = ((w - 1) / 2.0 * (1 + off * (2 * u[4] - 1)), (h - 1) / 2.0 * (1 + off * (2 * u[5] - 1)))
    read, shot = _lerp(c["read_noise"], u[6]), _lerp(c["shot_noise"], u[7])
    quality = round(_lerp(c["jpeg"], u[9])) if u[8] < c["jpeg_p"] and c["jpeg"][1] > 0 else None

    out = img
    if radius >= _MIN_RADIUS:
        out = defocus(out, radius)
    if abs(shift) >= _MIN_SHIFT:
        out = chromatic_offset(out, shift)
    if strength > 0:
        out = vignetting(out, strength, centre if off > 0 else None)
    if read > 0 or shot > 0:
        out = sensor_noise(out, rng, read, shot)
    if quality is not None:
        out = jpeg_artifacts(out, quality)
    return img.copy() if out is img else out
