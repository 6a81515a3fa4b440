import dataclasses
import hashlib

import cv2
import numpy as np
import pytest
from skimage.color import hed_from_rgb, rgb_from_hed

from bloodcells.errors import BloodcellsError
from bloodcells.segmenter import augment as A

BG = (214, 200, 188)


def scene(seed: int = 0, size: int = 96) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[int, int]]:
    """A small smear: textured cream background, overlapping discs with classes 1..9 and instance ids."""
    rng = np.random.default_rng(seed)
    img = np.empty((size, size, 3), np.uint8)
    img[:] = BG
    img = cv2.add(img, rng.integers(0, 6, img.shape, dtype=np.uint8))
    label = np.zeros((size, size), np.uint8)
    inst = np.zeros((size, size), np.uint16)
    cls_of = {}
    for k in range(1, 13):
        cls = int(rng.integers(1, 10))
        colour = tuple(int(v) for v in rng.integers(60, 190, 3))
        c = tuple(int(v) for v in rng.integers(0, size, 2))
        r = int(rng.integers(5, 16))
        cv2.circle(img, c, r, colour, -1)
        cv2.circle(label, c, r, cls, -1)
        cv2.circle(inst, c, r, k, -1)
        cls_of[k] = cls
    # ids fully covered by later discs are not in the map any more
    return img, label, inst, {k: v for k, v in cls_of.items() if (inst == k).any()}


def digest(*arrays: np.ndarray) -> str:
    h = hashlib.sha1()
    for a in arrays:
        h.update(a.tobytes())
    return h.hexdigest()


OPS = {  # name -> (call at default strength, call with every range zero)
    "stain": (lambda x, g: A.stain_jitter_hed(x, g), lambda x, g: A.stain_jitter_hed(x, g, 0, 0)),
    "brightness_contrast": (lambda x, g: A.brightness_contrast(x, g), lambda x, g: A.brightness_contrast(x, g, 0, 0)),
    "gamma": (lambda x, g: A.gamma(x, g, 0.7, 0.85), lambda x, g: A.gamma(x, g, 1, 1)),
    "saturation": (lambda x, g: A.saturation(x, g, 0.5), lambda x, g: A.saturation(x, g, 0)),
    "hue": (lambda x, g: A.hue(x, g, 10), lambda x, g: A.hue(x, g, 0)),
    "blur_or_sharpen": (lambda x, g: A.blur_or_sharpen(x, g, (0.8, 1.2), (0.4, 0.6)),
                        lambda x, g: A.blur_or_sharpen(x, g, (0, 0), (0, 0))),
    "noise": (lambda x, g: A.noise(x, g, (3, 6), (0, 0.05)), lambda x, g: A.noise(x, g, (0, 0), (0, 0))),
    "jpeg": (lambda x, g: A.jpeg(x, g), None),
    "appearance": (lambda x, g: A.appearance(x, g), lambda x, g: A.appearance(x, g, strength=0.0)),
}


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ops_keep_dtype_shape_and_input_and_change_the_image(name, seed):
    img = scene(seed)[0]
    before = img.copy()
    out = OPS[name][0](img, np.random.default_rng(seed))
    assert out.dtype == np.uint8 and out.shape == img.shape
    assert np.array_equal(img, before)  # input untouched
    assert out is not img and not np.array_equal(out, img)


@pytest.mark.parametrize("name", [n for n, (_, zero) in OPS.items() if zero is not None])
def test_zero_strength_is_the_identity(name):
    img = scene(3)[0]
    for seed in range(4):
        out = OPS[name][1](img, np.random.default_rng(seed))
        assert np.array_equal(out, img) and out is not img


def test_augment_sample_is_identity_at_zero_strength_and_below_full_level():
    img, label, inst, _ = scene(4)
    for level, strength in (("full", 0.0), ("none", 1.0), ("geometric", 1.0)):
        out = A.augment_sample(img, label, inst, np.random.default_rng(0), level, strength)
        assert digest(*out) == digest(img, label, inst)
        assert all(o is not i for o, i in zip(out, (img, label, inst)))
    with pytest.raises(BloodcellsError, match="not one of"):
        A.augment_sample(img, label, inst, np.random.default_rng(0), "strong")


def test_augment_sample_is_deterministic_for_a_seeded_generator():
    img, label, inst, _ = scene(5)
    runs = [digest(*A.augment_sample(img, label, inst, np.random.default_rng(s))) for s in (7, 7, 8)]
    assert runs[0] == runs[1] != runs[2]
    out = A.augment_sample(img, label, inst, np.random.default_rng(7))
    assert out[0].dtype == np.uint8 and out[0].shape == img.shape
    assert out[1].shape == label.shape and out[2].dtype == np.uint16


def test_hed_matrices_are_ruifrok_johnstons_and_the_round_trip_is_exact():
    assert np.allclose(A.RGB_FROM_HED, rgb_from_hed) and np.allclose(A.HED_FROM_RGB, hed_from_rgb)
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)
    img[0, :, :] = np.arange(128)[:, None] * 2  # greys, black and near-white
    img[1, :, :] = 255
    out = A.hed_scale_shift(img, np.ones(3), np.zeros(3))
    assert np.array_equal(out, img)  # optical density -log((v + 1) / 256) inverts exactly


def test_hed_scaling_acts_on_its_own_stain_only():
    """A pixel holding only haematoxylin keeps its colour when eosin or DAB are scaled, not when H is."""
    od = 0.8 * A.RGB_FROM_HED[0]  # optical density of pure haematoxylin
    px = np.round(256 * np.exp(-od) - 1).astype(np.uint8)[None, None, :]
    assert np.array_equal(A.hed_scale_shift(px, np.array([1, 1.5, 0.5]), np.zeros(3)), px)
    darker = A.hed_scale_shift(px, np.array([1.5, 1, 1]), np.zeros(3))
    assert (darker.astype(int) < px).all()


def test_stain_jitter_keeps_white_white_and_moves_stained_pixels_within_bounds():
    white = np.full((8, 8, 3), 255, np.uint8)
    nucleus = (118, 62, 160)  # a purple stained nucleus
    img = np.concatenate([white, np.full((8, 8, 3), nucleus, np.uint8)])
    alpha, beta = 0.05, 0.05
    # optical density can move by at most |c| * alpha + beta per stain, mixed back through |RGB_FROM_HED|
    od = -np.log((np.array(nucleus) + 1) / 256)
    c = od @ hed_from_rgb
    bound_od = (np.abs(c) * alpha + beta) @ np.abs(rgb_from_hed)
    lo = 256 * np.exp(-(od + bound_od)) - 1 - 1
    hi = 256 * np.exp(-(od - bound_od)) - 1 + 1
    white_floor = 256 * np.exp(-beta * np.abs(rgb_from_hed).sum(axis=0)) - 1 - 1
    moved = 0
    for seed in range(60):
        out = A.stain_jitter_hed(img, np.random.default_rng(seed), alpha, beta).astype(float)
        assert (out[:8] >= white_floor).all()  # background only takes a faint tint (the shift), never a stain
        px = out[8:].reshape(-1, 3)
        assert (px >= lo).all() and (px <= hi).all()
        moved += np.abs(px[0] - nucleus).max() >= 2
    assert moved >= 40
    # scaling alone leaves white (optical density 0) exactly white
    for seed in range(10):
        assert (A.stain_jitter_hed(white, np.random.default_rng(seed), 0.3, 0.0) == 255).all()


def test_saturation_and_hue_keep_greys_and_luma():
    g = np.random.default_rng(0)
    grey = np.repeat(np.arange(0, 256, 5, dtype=np.uint8)[:, None, None], 3, axis=2)
    assert np.abs(A.saturation(grey, g, 0.5).astype(int) - grey).max() <= 1
    assert np.abs(A.hue(grey, g, 30).astype(int) - grey).max() <= 1
    img = scene(2)[0]
    luma = lambda x: x.astype(float) @ [0.299, 0.587, 0.114]  # noqa: E731
    assert np.abs(luma(A.hue(img, g, 20)) - luma(img)).mean() < 1.0
    assert np.abs(luma(A.saturation(img, g, 0.5)) - luma(img)).mean() < 1.0
    spread = lambda x: (x.max(axis=2).astype(int) - x.min(axis=2)).mean()  # noqa: E731
    ratios = [spread(A.saturation(img, np.random.default_rng(s), 0.5)) / spread(img) for s in range(12)]
    assert 0.45 < min(ratios) < 0.8 and 1.2 < max(ratios) < 1.55  # chroma gain within 1 +- 0.5, both ways


def test_gamma_and_brightness_contrast_change_tones_monotonically():
    ramp = np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 3, axis=2)
    for seed in range(5):
        for out in (A.gamma(ramp, np.random.default_rng(seed), 0.6, 1.6),
                    A.brightness_contrast(ramp, np.random.default_rng(seed), 0.2, 0.3)):
            assert (np.diff(out[0, :, 0].astype(int)) >= 0).all()
        g = A.gamma(ramp, np.random.default_rng(seed), 0.6, 1.6)
        assert g[0, 0, 0] == 0 and g[0, 255, 0] == 255


def test_noise_and_jpeg_change_the_image_but_keep_its_mean():
    img, *_ = scene(6)
    grey = np.full((128, 128, 3), 128, np.uint8)
    for seed in range(3):
        n = A.noise(grey, np.random.default_rng(seed), (6, 6))
        d = n.astype(float) - grey
        assert abs(d.mean()) < 0.2 and 5.7 < d.std() < 6.3
        j = A.jpeg(img, np.random.default_rng(seed), (40, 60))
        assert np.abs(j.astype(int) - img).max() > 5
        assert abs(j.astype(float).mean() - img.mean()) < 1.0
    # shot noise: brighter pixels are noisier
    flat = np.concatenate([np.full((64, 64, 3), 30, np.uint8), np.full((64, 64, 3), 220, np.uint8)])
    d = A.noise(flat, np.random.default_rng(0), (1, 1), (0.1, 0.1)).astype(float) - flat
    assert abs(d[:64].var() - (1 + 3.0)) < 0.6 and abs(d[64:].var() - (1 + 22.0)) < 2.0


def check_scale_jitter(img, label, inst, cls_of, out, fill=None):
    o_img, o_lab, o_inst = out
    assert o_img.dtype == np.uint8 and o_lab.dtype == np.uint8 and o_inst.dtype == np.uint16
    assert set(np.unique(o_lab)) <= set(np.unique(label))
    assert set(np.unique(o_inst)) <= set(np.unique(inst))
    for k in np.unique(o_inst):
        if k:
            assert (o_lab[o_inst == k] == cls_of[int(k)]).all()
    assert (o_lab[o_inst == 0] == 0).all()  # every cell pixel has an instance in this scene
    if fill is not None:
        padded = (o_img == fill).all(axis=2)
        assert (o_lab[padded] == 0).all() and (o_inst[padded] == 0).all()
        return int(padded.sum())
    return 0


@pytest.mark.parametrize("seed", range(8))
def test_scale_jitter_keeps_labels_and_instances_consistent(seed):
    img, label, inst, cls_of = scene(seed)
    img = np.maximum(img, 40)  # no pixel of the scene has the fill colour below
    fill = (1, 2, 3)
    out = A.scale_jitter(img, label, inst, np.random.default_rng(seed), 0.5, 2.0, fill=fill)
    assert out[0].shape == img.shape and out[1].shape == label.shape
    check_scale_jitter(img, label, inst, cls_of, out, fill)
    shrunk = A.scale_jitter(img, label, inst, np.random.default_rng(seed), 0.6, 0.6, fill=fill)
    padded = check_scale_jitter(img, label, inst, cls_of, shrunk, fill)
    side = round(96 * 0.6)
    assert padded == 96 * 96 - side * side  # exactly the border around the shrunk scene is padding


def test_scale_jitter_pads_with_the_background_median_and_honours_size():
    img, label, inst, cls_of = scene(1)
    bg = np.sort(img[label == 0], axis=0)
    bg_median = tuple(int(v) for v in bg[(len(bg) - 1) // 2])  # the lower median
    o_img, o_lab, o_inst = A.scale_jitter(img, label, inst, np.random.default_rng(0), 0.5, 0.5, size=(120, 100))
    assert o_img.shape == (120, 100, 3) and o_lab.shape == o_inst.shape == (120, 100)
    pad = np.ones((120, 100), bool)
    pad[o_lab > 0] = False
    border = np.zeros((120, 100), bool)
    border[:2], border[-2:], border[:, :2], border[:, -2:] = True, True, True, True
    # 48x48 content inside 120x100: the whole frame is padding
    assert (o_img[border] == bg_median).all() and (o_lab[border] == 0).all() and (o_inst[border] == 0).all()
    assert A.scale_jitter(img, label, None, np.random.default_rng(0))[2] is None
    full = np.full_like(label, 9)  # no background at all: the whole image's median
    whole = np.sort(img.reshape(-1, 3), axis=0)[(img.shape[0] * img.shape[1] - 1) // 2]
    o_img = A.scale_jitter(img, full, None, np.random.default_rng(0), 0.5, 0.5)[0]
    assert (o_img[0, 0] == whole).all() and (o_img[-1, -1] == whole).all()
    enlarged = A.scale_jitter(img, label, inst, np.random.default_rng(3), 1.5, 1.5)
    check_scale_jitter(img, label, inst, cls_of, enlarged)
    assert len(np.unique(enlarged[2])) < len(np.unique(inst))  # a 64 px window of 144 loses some cells


def test_config_is_checked():
    with pytest.raises(BloodcellsError, match="gamma"):
        A.AugmentConfig(gamma=(1.2, 0.8))
    with pytest.raises(BloodcellsError, match="p_jpeg"):
        A.AugmentConfig(p_jpeg=1.5)


ONLY = {  # one step of the appearance chain on its own (the stain step is always on, so zeroed elsewhere)
    "stain": {},
    "brightness_contrast": {"p_brightness_contrast": 1.0},
    "gamma": {"p_gamma": 1.0, "gamma": (0.6, 0.7)},
    "saturation": {"p_saturation": 1.0, "saturation": 0.5},
    "hue": {"p_hue": 1.0, "hue": 20.0},
    "blur_or_sharpen": {"p_blur_sharpen": 1.0},
    "noise": {"p_noise": 1.0},
    "jpeg": {"p_jpeg": 1.0},
}


@pytest.mark.parametrize("step", ONLY)
def test_strength_scales_every_step_of_the_chain(step):
    none = {f.name: 0.0 for f in dataclasses.fields(A.AugmentConfig) if f.name.startswith("p_")}
    stain = {} if step == "stain" else {"stain_alpha": 0.0, "stain_beta": 0.0}
    config = A.AugmentConfig(**{**none, **stain, **ONLY[step]})
    img = scene(0)[0]
    change = {s: np.mean([np.abs(A.appearance(img, np.random.default_rng(seed), s, config).astype(int) - img).mean()
                          for seed in range(6)]) for s in (0.25, 1.0)}
    assert 0 < change[0.25] < 0.8 * change[1.0]
