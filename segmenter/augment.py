"""Appearance and scale randomisation of training samples, so that a model trained only on composed scenes
reads smears from other labs (stains, microscopes, cameras, compression, magnification).

Pure functions on uint8 RGB images (H, W, 3), with label (uint8) and instance (uint16) maps where geometry
changes. Every random draw comes from the `numpy.random.Generator` passed in (no global RNG), so a sample's
augmentation is fixed by the generator's state; no function modifies its inputs.

`augment_sample` is the one per-sample entry point; its `level` says what it does:

- ``"none"``: returns copies, unchanged.
- ``"geometric"``: returns copies, unchanged: flips and quarter turns are the caller's
  (`segmenter.data.flip_rotate`), so this level only says "no appearance or scale change".
- ``"appearance"``: the appearance chain of `appearance` alone: HED stain jitter always, then
  brightness/contrast, gamma, saturation, hue, blur or sharpen, sensor noise and JPEG, each with its own
  probability.
- ``"full"``: scale jitter (with probability ``p_scale``: resize by a log-uniform factor, crop or pad back
  with background), then the appearance chain. The caller still applies the geometric transforms.

`strength` scales every appearance range (0 = identity) and the scale range (in log space).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import cv2
import numpy as np

from bloodcells.degrade import jpeg_roundtrip, poisson_gaussian
from bloodcells.errors import BloodcellsError
from bloodcells.stain import HED_FROM_RGB, RGB_FROM_HED, hed_affine  # noqa: F401 (re-exported)

Range = tuple[float, float]
LEVELS = ("none", "geometric", "appearance", "full")


# optical density of each uint8 level, -log((v + 1) / 256): exactly 0 for white, finite for black
_OD_TABLE = (-np.log((np.arange(256) + 1.0) / 256.0)).astype(np.float32)
_LUMA = np.array([0.299, 0.587, 0.114])  # Rec. 601 weights: the grey axis that saturation and hue keep
_RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114],
                        [0.596, -0.274, -0.322],
                        [0.211, -0.523, 0.312]])


@dataclass(frozen=True)
class AugmentConfig:
    """Ranges and probabilities of the "full" level; the defaults are `AUGMENT_DEFAULTS`."""

    stain_alpha: float = 0.05  # HED scale a ~ U(1 - alpha, 1 + alpha) per stain (Tellez et al.'s "HED-light")
    stain_beta: float = 0.05  # HED shift b ~ U(-beta, beta) per stain, in optical density
    brightness: float = 0.1  # shift up to this fraction of 255
    contrast: float = 0.15  # gain about the image mean in 1 +- contrast
    gamma: Range = (0.8, 1.25)  # log-uniform exponent
    saturation: float = 0.2  # chroma gain in 1 +- saturation
    hue: float = 5.0  # chroma rotation in +- degrees (stains of other recipes lean bluer or redder)
    blur_sigma: Range = (0.0, 1.2)  # Gaussian blur sigma in px (defocus, lower resolution)
    sharpen: Range = (0.0, 0.6)  # unsharp-mask amount (cameras that sharpen)
    noise_std: Range = (0.0, 6.0)  # Gaussian noise std in grey levels
    noise_shot: Range = (0.0, 0.03)  # extra, intensity-proportional variance per grey level (photon noise)
    jpeg_quality: Range = (40, 95)
    scale: Range = (0.7, 1.4)  # log-uniform magnification: other objectives, and --scale auto's error
    p_brightness_contrast: float = 0.8
    p_gamma: float = 0.5
    p_saturation: float = 0.6
    p_hue: float = 0.3
    p_blur_sharpen: float = 0.5
    p_noise: float = 0.5
    p_jpeg: float = 0.5
    p_scale: float = 0.8

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, tuple):
                if len(v) != 2 or not 0 <= v[0] <= v[1]:
                    raise BloodcellsError(f"augment: '{f.name}' must be [lo, hi] with 0 <= lo <= hi, got {v}")
            elif f.name.startswith("p_") and not 0 <= v <= 1:
                raise BloodcellsError(f"augment: probability '{f.name}' must be in 0..1, got {v}")
            elif v < 0:
                raise BloodcellsError(f"augment: '{f.name}' must be >= 0, got {v}")
        if self.scale[0] <= 0 or self.gamma[0] <= 0:
            raise BloodcellsError("augment: 'scale' and 'gamma' ranges must be above 0")


AUGMENT_DEFAULTS = AugmentConfig()


def _check_rgb(img: np.ndarray) -> None:
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected a uint8 RGB image (H, W, 3), got {img.dtype} {img.shape}")


def _to_uint8(x: np.ndarray) -> np.ndarray:
    """Round and saturate a float image to uint8 (x is used as scratch)."""
    np.maximum(x, 0, out=x)  # convertScaleAbs rounds and saturates, but takes |x|
    return cv2.convertScaleAbs(x)


def _lut(img: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Map every channel value v to values[v] (rounded, saturated): one table lookup per pixel."""
    return cv2.LUT(img, _to_uint8(values.astype(np.float32)))


def _linear_colour(img: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Per pixel rgb' = m @ rgb, saturated to uint8 (OpenCV rounds)."""
    return cv2.transform(img, m.astype(np.float32))


def hed_scale_shift(img: np.ndarray, scale: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """Scale and shift the haematoxylin, eosin and DAB concentrations of every pixel: c' = c * scale + shift.

    Concentrations are the optical densities unmixed by HED_FROM_RGB; the whole round trip
    OD -> HED -> jitter -> OD is one 3x4 affine map, applied with a single cv2.transform.
    """
    od_map, od_shift = hed_affine(scale, shift)  # row vectors: od' = od @ map + shift
    neg = np.hstack([-od_map.T, -od_shift[:, None]]).astype(np.float32)  # gives -od' per pixel
    trans = cv2.transform(cv2.LUT(img, _OD_TABLE), neg)
    cv2.exp(trans, dst=trans)  # the transmitted fraction, (v' + 1) / 256; in place: fresh buffers cost page faults
    np.maximum(trans, np.float32(1 / 256), out=trans)
    return cv2.convertScaleAbs(trans, alpha=256.0, beta=-1.0)


def stain_jitter_hed(img: np.ndarray, rng: np.random.Generator, alpha: float = 0.05, beta: float = 0.05
                     ) -> np.ndarray:
    """Random HED stain variation (Tellez et al. 2019): per stain a ~ U(1-alpha, 1+alpha), b ~ U(-beta, beta)."""
    _check_rgb(img)
    a = rng.uniform(1 - alpha, 1 + alpha, 3)
    b = rng.uniform(-beta, beta, 3)
    if alpha == 0 and beta == 0:
        return img.copy()
    return hed_scale_shift(img, a, b)


def brightness_contrast(img: np.ndarray, rng: np.random.Generator, brightness: float = 0.1,
                        contrast: float = 0.15) -> np.ndarray:
    """Gain c ~ U(1 +- contrast) about the image's mean grey, plus a shift of U(+- brightness) * 255."""
    _check_rgb(img)
    c = rng.uniform(1 - contrast, 1 + contrast)
    b = rng.uniform(-brightness, brightness)
    if contrast == 0 and brightness == 0:
        return img.copy()
    mean = sum(cv2.mean(img)[:3]) / 3.0  # pivot at the mean so that contrast alone keeps the exposure
    return _lut(img, (np.arange(256) - mean) * c + mean + 255.0 * b)


def gamma(img: np.ndarray, rng: np.random.Generator, lo: float = 0.8, hi: float = 1.25) -> np.ndarray:
    """Tone curve 255 * (v / 255) ** g with g log-uniform in [lo, hi] (camera response, display gamma)."""
    _check_rgb(img)
    g = math.exp(rng.uniform(math.log(lo), math.log(hi)))
    if lo == hi == 1:
        return img.copy()
    return _lut(img, 255.0 * (np.arange(256) / 255.0) ** g)


def saturation(img: np.ndarray, rng: np.random.Generator, strength: float = 0.2) -> np.ndarray:
    """Scale every pixel's chroma about its luma by f ~ U(1 +- strength) (luma kept)."""
    _check_rgb(img)
    f = rng.uniform(1 - strength, 1 + strength)
    if strength == 0:
        return img.copy()
    return _linear_colour(img, f * np.eye(3) + (1 - f) * np.outer(np.ones(3), _LUMA))


def hue(img: np.ndarray, rng: np.random.Generator, degrees: float = 5.0) -> np.ndarray:
    """Rotate every pixel's chroma (the YIQ I-Q plane) by U(+- degrees), luma kept."""
    _check_rgb(img)
    t = math.radians(rng.uniform(-degrees, degrees))
    if degrees == 0:
        return img.copy()
    rot = np.array([[1, 0, 0], [0, math.cos(t), -math.sin(t)], [0, math.sin(t), math.cos(t)]])
    return _linear_colour(img, np.linalg.inv(_RGB_TO_YIQ) @ rot @ _RGB_TO_YIQ)


def blur_or_sharpen(img: np.ndarray, rng: np.random.Generator, blur_sigma: Range = (0.0, 1.2),
                    sharpen: Range = (0.0, 0.6)) -> np.ndarray:
    """Either a Gaussian blur (sigma in blur_sigma) or an unsharp mask (amount in sharpen), equally likely;
    a range of (0, 0) takes that option out, both (0, 0) is the identity."""
    _check_rgb(img)
    options = [k for k, r in (("blur", blur_sigma), ("sharpen", sharpen)) if r[1] > 0]
    if not options:
        return img.copy()
    kind = options[int(rng.integers(len(options)))]
    if kind == "blur":
        sigma = rng.uniform(*blur_sigma)
        return cv2.GaussianBlur(img, (0, 0), sigma) if sigma >= 0.1 else img.copy()
    amount = rng.uniform(*sharpen)
    return cv2.addWeighted(img, 1 + amount, cv2.GaussianBlur(img, (0, 0), 1.0), -amount, 0)


def noise(img: np.ndarray, rng: np.random.Generator, std: Range = (0.0, 6.0), shot: Range = (0.0, 0.0)
          ) -> np.ndarray:
    """Additive Gaussian noise, per pixel and channel: variance std^2 + shot * value, std and shot drawn from
    their ranges (shot > 0 makes it Poisson-like: brighter pixels noisier)."""
    _check_rgb(img)
    sigma = rng.uniform(*std)
    k = rng.uniform(*shot)
    if sigma == 0 and k == 0:
        return img.copy()
    return _to_uint8(poisson_gaussian(img, rng, sigma, k))


def jpeg(img: np.ndarray, rng: np.random.Generator, quality: Range = (40, 95)) -> np.ndarray:
    """JPEG encode/decode at a quality drawn uniformly from the integers in [lo, hi]."""
    _check_rgb(img)
    q = int(rng.integers(int(round(quality[0])), int(round(quality[1])) + 1))
    return jpeg_roundtrip(img, q)


def _scaled(r: Range, s: float) -> Range:
    return (r[0] * s, r[1] * s)


def appearance(img: np.ndarray, rng: np.random.Generator, strength: float = 1.0,
               config: AugmentConfig = AUGMENT_DEFAULTS) -> np.ndarray:
    """The whole appearance chain (stain, exposure, tone, colour, optics, noise, JPEG); strength scales every
    range, 0 returns an unchanged copy."""
    _check_rgb(img)
    if strength <= 0:
        return img.copy()
    c, s = config, float(strength)
    out = stain_jitter_hed(img, rng, c.stain_alpha * s, c.stain_beta * s)
    if rng.random() < c.p_brightness_contrast:
        out = brightness_contrast(out, rng, c.brightness * s, c.contrast * s)
    if rng.random() < c.p_gamma:
        out = gamma(out, rng, c.gamma[0] ** s, c.gamma[1] ** s)
    if rng.random() < c.p_saturation:
        out = saturation(out, rng, c.saturation * s)
    if rng.random() < c.p_hue:
        out = hue(out, rng, c.hue * s)
    if rng.random() < c.p_blur_sharpen:
        out = blur_or_sharpen(out, rng, _scaled(c.blur_sigma, s), _scaled(c.sharpen, s))
    if rng.random() < c.p_noise:
        out = noise(out, rng, _scaled(c.noise_std, s), _scaled(c.noise_shot, s))
    if rng.random() < c.p_jpeg:
        # weaker strength = quality nearer 100
        out = jpeg(out, rng, (100 - (100 - c.jpeg_quality[0]) * s, 100 - (100 - c.jpeg_quality[1]) * s))
    return out


def _median_colour(img: np.ndarray, mask: np.ndarray | None) -> tuple[int, int, int]:
    """Per-channel median of the pixels under mask (uint8 0/255; None = all), from 256-bin histograms."""
    out = []
    for ch in range(3):
        cdf = np.cumsum(cv2.calcHist([img], [ch], mask, [256], [0, 256]).ravel())
        out.append(int(np.searchsorted(cdf, cdf[-1] / 2.0)))
    return out[0], out[1], out[2]


def _window(n: int, target: int, offset: int) -> tuple[slice, slice]:
    """(source slice, destination slice) along one axis: a crop when n >= target, else a pad."""
    if n >= target:
        return slice(offset, offset + target), slice(0, target)
    return slice(0, n), slice(offset, offset + n)


def scale_jitter(img: np.ndarray, label: np.ndarray, instances: np.ndarray | None, rng: np.random.Generator,
                 lo: float = 0.7, hi: float = 1.4, size: int | tuple[int, int] | None = None,
                 fill: tuple[int, int, int] | None = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Resize by s ~ log-uniform(lo, hi), then crop a random window or pad at a random place back to the input
    size (or size: side or (height, width)).

    The image is resampled by area (shrinking) or linearly (enlarging); label and instance maps by exact
    nearest neighbour, from the same source pixels, so each pixel's class still matches its instance.
    Padding is background: label 0, instance 0, the image in fill (default: the median colour of the
    input's background, label 0, or of the whole image if it has none). Never mirrored, which would
    duplicate instance ids. Ids keep their values; those cropped away just vanish.
    """
    _check_rgb(img)
    h, w = label.shape
    if img.shape[:2] != (h, w) or (instances is not None and instances.shape != (h, w)):
        raise ValueError(f"image {img.shape}, label {label.shape} and instances must share height and width")
    th, tw = (h, w) if size is None else (size, size) if isinstance(size, int) else size
    s = math.exp(rng.uniform(math.log(lo), math.log(hi)))
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    y0 = int(rng.integers(abs(nh - th) + 1))
    x0 = int(rng.integers(abs(nw - tw) + 1))
    if fill is None and (nh < th or nw < tw):
        bg = (label == 0).view(np.uint8) * np.uint8(255)
        fill = _median_colour(img, bg if bg.any() else None)
    if (nh, nw) != (h, w):
        img = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR)
        label = cv2.resize(label, (nw, nh), interpolation=cv2.INTER_NEAREST_EXACT)
        if instances is not None:
            instances = cv2.resize(instances, (nw, nh), interpolation=cv2.INTER_NEAREST_EXACT)
    (sy, dy), (sx, dx) = _window(nh, th, y0), _window(nw, tw, x0)
    if nh >= th and nw >= tw:  # crop only
        return (np.ascontiguousarray(img[sy, sx]), np.ascontiguousarray(label[sy, sx]),
                None if instances is None else np.ascontiguousarray(instances[sy, sx]))
    out_img = np.empty((th, tw, 3), np.uint8)
    out_img[:] = np.asarray(fill, np.uint8)
    out_img[dy, dx] = img[sy, sx]
    out_label = np.zeros((th, tw), label.dtype)
    out_label[dy, dx] = label[sy, sx]
    out_inst = None
    if instances is not None:
        out_inst = np.zeros((th, tw), instances.dtype)
        out_inst[dy, dx] = instances[sy, sx]
    return out_img, out_label, out_inst


def augment_sample(img: np.ndarray, label: np.ndarray, instances: np.ndarray | None, rng: np.random.Generator,
                   level: str = "full", strength: float = 1.0, config: AugmentConfig = AUGMENT_DEFAULTS
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """One training sample's appearance and scale augmentation at level "none", "geometric" or "full"
    (see the module docstring); returns new (image, label, instances)."""
    if level not in LEVELS:
        raise BloodcellsError(f"augmentation level {level!r} is not one of: {', '.join(LEVELS)}")
    if level in ("none", "geometric") or strength <= 0:
        return img.copy(), label.copy(), None if instances is None else instances.copy()
    if level == "full" and rng.random() < config.p_scale:
        lo, hi = config.scale[0] ** strength, config.scale[1] ** strength
        img, label, instances = scale_jitter(img, label, instances, rng, lo, hi)
    else:
        label, instances = label.copy(), None if instances is None else instances.copy()
    return appearance(img, rng, strength, config), label, instances
