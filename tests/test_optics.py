import hashlib

import cv2
import numpy as np
import pytest

from bloodcells.composer import optics as O
from bloodcells.errors import BloodcellsError

OFF = {"defocus": [0, 0], "chromatic": [0, 0], "vignetting": [0, 0], "read_noise": [0, 0],
       "shot_noise": [0, 0], "jpeg": [0, 0], "jpeg_p": 0.0}


def smear(seed: int = 0, size: int = 224) -> np.ndarray:
    """A float32 scene: cream background with fine texture and stained discs."""
    rng = np.random.default_rng(seed)
    img = np.empty((size, size, 3), np.float32)
    img[:] = (236, 222, 210)
    img += rng.normal(0, 4, img.shape).astype(np.float32)
    for _ in range(25):
        c = tuple(int(v) for v in rng.integers(0, size, 2))
        cv2.circle(img, c, int(rng.integers(6, 20)), tuple(float(v) for v in rng.uniform(60, 200, 3)), -1)
    return img


def high_freq_energy(img: np.ndarray) -> float:
    return float((cv2.Laplacian(img, cv2.CV_32F)[8:-8, 8:-8] ** 2).mean())


def test_all_zero_config_is_the_identity_bit_for_bit():
    img = smear(1)
    for seed in range(5):
        out = O.apply_optics(img, np.random.default_rng(seed), OFF)
        assert out.dtype == np.float32 and out is not img
        assert out.tobytes() == img.tobytes()
    assert np.array_equal(O.defocus(img, 0.25), img)
    assert np.array_equal(O.chromatic_offset(img, 0.0), img)
    assert np.array_equal(O.vignetting(img, 0.0), img)
    assert np.array_equal(O.sensor_noise(img, np.random.default_rng(0), 0.0, 0.0), img)


def test_defaults_change_the_image_mildly_and_deterministically():
    img = smear(2)
    before = img.copy()
    outs = [O.apply_optics(img, np.random.default_rng(s)) for s in (5, 5, 6)]
    assert np.array_equal(img, before)  # input untouched
    digests = [hashlib.sha1(o.tobytes()).hexdigest() for o in outs]
    assert digests[0] == digests[1] != digests[2]
    for o in outs:
        assert o.dtype == np.float32 and o.shape == img.shape
        d = o - img
        assert 0 < np.abs(d).mean() < 12  # mild
        assert abs(float(d.mean())) < 8  # only vignetting darkens on average (at most 10% at the corners)


def test_defocus_keeps_the_mean_and_removes_more_detail_with_larger_radius():
    img = smear(3)
    energies = [high_freq_energy(img)]
    for radius in (0.6, 1.2, 2.5, 4.0):
        out = O.defocus(img, radius)
        assert abs(float(out.mean() - img.mean())) < 0.2
        energies.append(high_freq_energy(out))
    assert all(a > 1.3 * b for a, b in zip(energies, energies[1:]))  # strictly less detail at each step
    k = O.disc_kernel(2.0)
    assert abs(k.sum() - 1) < 1e-6 and np.allclose(k, k.T) and np.allclose(k, k[::-1])
    assert k.shape == (5, 5) and k[0, 0] == 0 and k[2, 0] > 0  # a disc, not a box: the corners stay empty


def centroid(channel: np.ndarray) -> np.ndarray:
    ys, xs = np.mgrid[0:channel.shape[0], 0:channel.shape[1]]
    w = channel.astype(np.float64)
    return np.array([(xs * w).sum(), (ys * w).sum()]) / w.sum()


def test_chromatic_offset_moves_red_out_and_blue_in_at_the_corners_but_not_at_the_centre():
    size, shift = 224, 2.0
    c = (size - 1) / 2.0
    for pos in ((20, 30), (200, 190), (int(c), int(c))):
        img = np.zeros((size, size, 3), np.float32)
        cv2.circle(img, pos, 3, (255, 255, 255), -1)
        out = O.chromatic_offset(img, shift)
        r0, g0, b0 = (centroid(img[..., i]) for i in range(3))
        r1, g1, b1 = (centroid(out[..., i]) for i in range(3))
        assert np.allclose(g1, g0)  # green is the reference
        radial = (r0 - c) / max(np.linalg.norm(r0 - c), 1e-9)
        expected = np.linalg.norm(r0 - c) * shift / np.hypot(c, c)  # shift px at the corner, less inside
        if np.linalg.norm(r0 - c) > 50:
            assert abs((r1 - r0) @ radial - expected) < 0.1 and (r1 - r0) @ radial > 1.0
            assert abs((b1 - b0) @ radial + expected) < 0.1
        else:
            assert np.abs(r1 - r0).max() < 0.05 and np.abs(b1 - b0).max() < 0.05


def test_vignetting_darkens_corners_by_the_strength():
    flat = np.full((200, 240, 3), 200, np.float32)
    out = O.vignetting(flat, 0.2)
    assert abs(out[0, 0, 0] - 200 * 0.8) < 0.5 and abs(out[-1, -1, 2] - 160) < 0.5
    assert abs(out[100, 120, 1] - 200) < 0.2
    assert out[100, 0, 0] > out[0, 0, 0]  # falls off with the radius
    moved = O.vignetting(flat, 0.2, centre=(180, 150))
    assert moved[0, 0, 0] < moved[-1, -1, 0]  # the corner far from the moved centre is darker


def test_sensor_noise_variance_grows_with_intensity_as_configured():
    read, shot = 2.0, 0.1
    for level in (20.0, 120.0, 230.0):
        flat = np.full((256, 256, 3), level, np.float32)
        out = O.sensor_noise(flat, np.random.default_rng(int(level)), read, shot)
        d = (out - flat).astype(np.float64)
        want = read ** 2 + shot * level
        assert abs(d.mean()) < 0.05 and abs(d.var() / want - 1) < 0.03
        assert out.dtype == np.float32
    only_read = O.sensor_noise(np.full((256, 256, 3), 200, np.float32), np.random.default_rng(1), 3.0, 0.0) - 200
    assert abs(only_read.std() - 3.0) < 0.05


def blockiness(img: np.ndarray) -> float:
    """Mean jump across 8x8 JPEG block borders over the mean jump inside blocks."""
    dx = np.abs(np.diff(img.astype(np.float64), axis=1)).mean(axis=(0, 2))
    at_border = dx[7::8].mean()
    inside = np.delete(dx, np.s_[7::8]).mean()
    return at_border / inside


def test_jpeg_quality_sets_blockiness():
    ramp = np.linspace(40, 220, 224, dtype=np.float32)
    img = np.dstack([ramp[None, :] * np.ones((224, 1), np.float32)] * 3) + smear(4) * 0.1
    b = {q: blockiness(O.jpeg_artifacts(img, q)) for q in (10, 50, 95)}
    assert b[10] > b[50] > b[95] and b[10] > 1.5
    out = O.jpeg_artifacts(img, 95)
    assert out.dtype == np.float32 and np.abs(out - img).mean() < 2


def test_resolve_optics_checks_keys_and_ranges():
    assert O.resolve_optics(None) == O.OPTICS_DEFAULTS
    assert O.resolve_optics({"defocus": [0, 2]})["defocus"] == [0, 2]
    with pytest.raises(BloodcellsError, match="unknown key 'look.optics.blur'"):
        O.resolve_optics({"blur": [0, 1]})
    with pytest.raises(BloodcellsError, match="'look.optics.vignetting' must be"):
        O.resolve_optics({"vignetting": [0.3, 0.1]})
    with pytest.raises(BloodcellsError, match="jpeg_p"):
        O.resolve_optics({"jpeg_p": 2})
    assert O.resolve_optics(OFF) == {**O.OPTICS_DEFAULTS, **OFF}


def test_switching_one_effect_on_leaves_the_others_draws_alone():
    """Each effect takes fixed draws: adding chromatic aberration changes red and blue, and nothing else."""
    img = smear(5)
    cfg = {**OFF, "defocus": [0.5, 2.0], "vignetting": [0.1, 0.3]}
    with_chromatic = O.apply_optics(img, np.random.default_rng(9), {**cfg, "chromatic": [0.5, 1.0]})
    without = O.apply_optics(img, np.random.default_rng(9), cfg)
    assert not np.array_equal(with_chromatic[..., 0], without[..., 0])
    assert np.array_equal(with_chromatic[..., 1], without[..., 1])  # same defocus and vignetting on green
