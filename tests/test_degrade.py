import numpy as np
from scipy import stats

from bloodcells.degrade import jpeg_roundtrip, standard_normal


def test_standard_normal_draws_are_normal_and_seeded():
    x = standard_normal(np.random.default_rng(0), (400, 500))
    assert x.dtype == np.float32 and x.shape == (400, 500)
    assert abs(x.mean()) < 0.01 and abs(x.std() - 1) < 0.01
    assert abs(np.mean(np.abs(x) > 2) - 0.0455) < 0.003  # the tails are there
    assert stats.kstest(x.ravel()[:20000], "norm").pvalue > 0.01
    assert np.array_equal(x, standard_normal(np.random.default_rng(0), (400, 500)))
    assert not np.array_equal(x, standard_normal(np.random.default_rng(1), (400, 500)))


def test_jpeg_roundtrip_treats_red_as_red():
    """JPEG keeps fine detail by luma, where red weighs 0.299 and blue 0.114: red detail must survive better."""
    y, x = np.mgrid[0:64, 0:64]
    checker = ((x + y) % 2 * 120 + 60).astype(np.uint8)
    errors = []
    for ch in (0, 2):
        img = np.full((64, 64, 3), 128, np.uint8)
        img[..., ch] = checker
        out = jpeg_roundtrip(img, 90)
        assert out.shape == img.shape and out.dtype == np.uint8
        errors.append(np.abs(out[..., ch].astype(int) - checker).mean())
    assert errors[0] < 0.9 * errors[1]
