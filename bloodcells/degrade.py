"""Image-degradation primitives both halves use: fast Gaussian draws and a JPEG round trip."""
from __future__ import annotations

from functools import lru_cache

import cv2
import numpy as np
from scipy.special import ndtri

_LEVELS = 1 << 16


@lru_cache(maxsize=1)
def _normal_table() -> np.ndarray:
    """Standard normal quantiles at the 65,536 bin centres of (0, 1), rescaled to unit variance."""
    q = ndtri((np.arange(_LEVELS, dtype=np.float64) + 0.5) / _LEVELS)
    return (q / q.std()).astype(np.float32)


def standard_normal(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Float32 standard normal draws from rng by inverse-CDF lookup of 16-bit uniforms.

    About 5x faster than Generator.standard_normal for a 224x224x3 field on this project's CPUs, which
    matters when a noise field is drawn for every training sample or scene; the tails stop at 4.3 sigma
    (one pixel in 60,000 would fall beyond), which no image noise model notices. The uniforms are the
    generator's raw 64-bit words cut in four, which costs half as much as Generator.integers.
    """
    n = int(np.prod(shape))
    bits = rng.bit_generator.random_raw(-(-n // 4)).view(np.uint16)[:n]
    return np.take(_normal_table(), bits).reshape(shape)


def poisson_gaussian(img: np.ndarray, rng: np.random.Generator, read_std: float, shot: float) -> np.ndarray:
    """img (uint8 or float) plus Gaussian noise of variance read_std^2 + shot * intensity per pixel and channel, as
    float32 (not clipped, so the mean stays unbiased until the caller rounds)."""
    n = standard_normal(rng, img.shape)
    if shot > 0:
        sd = np.maximum(img, 0).astype(np.float32)
        sd *= np.float32(shot)
        sd += np.float32(read_std * read_std)
        n *= np.sqrt(sd, out=sd)
    else:
        n *= np.float32(read_std)
    n += img
    return n


def jpeg_roundtrip(rgb: np.ndarray, quality: int) -> np.ndarray:
    """Encode a uint8 RGB image as JPEG at quality (0..100) and decode it again (uint8 RGB)."""
    # cameras encode BGR-ordered buffers in OpenCV; the channel order decides which colour gets the
    # luma weight and which is chroma-subsampled, so swap to BGR rather than encode RGB as if it were BGR
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RuntimeError("OpenCV could not encode a JPEG")
    return cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
