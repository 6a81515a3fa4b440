"""The built-in procedural sprite source: shapes, sizes, determinism, splits and stain colours."""
from __future__ import annotations

import hashlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from bloodcells.classes import BY_NAME, WBC
from bloodcells.errors import BloodcellsError
from bloodcells.composer.procedural import (DEFAULT_PARAMS_PATH, SPRITE_CLASSES, assign_splits, builtin_sprites,
                                 load_params, make_sprite)
from bloodcells.composer.sprite import Sprite, mask_diameter

PER_CLASS = 10


@pytest.fixture(scope="module")
def bank() -> list[Sprite]:
    return builtin_sprites(per_class=PER_CLASS, seed=0)


def _of(bank: list[Sprite], cls: str) -> list[Sprite]:
    return [s for s in bank if s.cls == cls]


def _opaque_rgb(sprite: Sprite) -> np.ndarray:
    """RGB (N, 3) int of the sprite's clearly opaque pixels."""
    return sprite.rgba[..., :3][sprite.rgba[..., 3] > 200].astype(int)


def _dark_purple(px: np.ndarray) -> np.ndarray:
    """Nucleus-like pixels: dark, blue above red (haematoxylin/azure purple)."""
    r, g, b = px.T
    return (r < 140) & (g < 90) & (b > r)


def _purple(px: np.ndarray) -> np.ndarray:
    """Purple stain (parasite, nucleus): blue well above green, red not high."""
    r, g, b = px.T
    return (b > g + 40) & (r < 175)


def _digest(sprites: list[Sprite]) -> list[str]:
    return [hashlib.sha256(s.rgba.tobytes()).hexdigest() for s in sprites]


def test_classes_are_the_drawable_ones() -> None:
    assert set(SPRITE_CLASSES) == set(BY_NAME) - {"background", "platelet_clump"}


@pytest.mark.parametrize("cls", SPRITE_CLASSES)
@pytest.mark.parametrize("seed", [1, 2])
def test_sprite_is_rgba_with_opaque_inside_and_clear_corners(cls: str, seed: int) -> None:
    rgba = make_sprite(cls, np.random.default_rng(seed))
    assert rgba.dtype == np.uint8 and rgba.ndim == 3 and rgba.shape[2] == 4
    h, w = rgba.shape[:2]
    alpha = rgba[..., 3]
    r = max(2, int(0.2 * mask_diameter(alpha)))
    assert np.all(alpha[h // 2 - r:h // 2 + r, w // 2 - r:w // 2 + r] == 255)
    for corner in (alpha[:4, :4], alpha[:4, -4:], alpha[-4:, :4], alpha[-4:, -4:]):
        assert np.all(corner == 0)
    for edge in (alpha[:2], alpha[-2:], alpha[:, :2], alpha[:, -2:]):
        assert np.all(edge == 0)  # the canvas never cuts the cell
    # the soft edge: some partly transparent pixels, but only a thin band of them
    soft = np.count_nonzero((alpha > 0) & (alpha < 255))
    assert 0 < soft < 0.25 * np.count_nonzero(alpha)


def test_diameters_are_twice_the_40x_size(bank: list[Sprite]) -> None:
    for s in bank:
        expected = 2.0 * BY_NAME[s.cls].diameter_40x
        assert s.diameter == pytest.approx(mask_diameter(s.rgba[..., 3]))
        assert 0.75 * expected <= s.diameter <= 1.25 * expected, (s.id, s.diameter, expected)


def test_records(bank: list[Sprite]) -> None:
    assert len(bank) == PER_CLASS * len(SPRITE_CLASSES)
    assert bank[3].id == f"builtin-{bank[3].cls}-0003"
    assert len({s.id for s in bank}) == len(bank)
    assert {s.source for s in bank} == {"builtin"}
    assert {s.cls for s in bank} == set(SPRITE_CLASSES)


def test_same_seed_same_bytes_other_seed_differs(bank: list[Sprite]) -> None:
    first = [s for s in bank if int(s.id[-4:]) < 3]
    again = builtin_sprites(per_class=3, seed=0)
    assert _digest(again) == _digest(first)  # also: asking for more sprites keeps the first ones
    assert [s.split for s in again] == assign_splits(3) * len(SPRITE_CLASSES)
    other = _digest(builtin_sprites(per_class=3, seed=1))
    assert not set(other) & set(_digest(first))


def test_no_global_random_state_used() -> None:
    before = np.random.get_state()[1].copy()
    make_sprite("neutrophil", np.random.default_rng(0))
    assert np.array_equal(np.random.get_state()[1], before)


def test_every_split_has_every_class(bank: list[Sprite]) -> None:
    for split in ("train", "val", "test"):
        assert {s.cls for s in bank if s.split == split} == set(SPRITE_CLASSES), split
    small = builtin_sprites(per_class=3, seed=0)
    assert {(s.split, s.cls) for s in small} == {(sp, c) for sp in ("train", "val", "test") for c in SPRITE_CLASSES}


@pytest.mark.parametrize("n", [1, 2, 3, 5, 10, 24, 100])
def test_split_quotas(n: int) -> None:
    order = assign_splits(n)
    counts = {sp: order.count(sp) for sp in ("train", "val", "test")}
    assert sum(counts.values()) == n
    if n >= 3:
        assert min(counts.values()) >= 1
    for sp, share in (("val", 0.1), ("test", 0.1)):
        assert abs(counts[sp] - max(share * n, 1 if n >= 3 else 0)) <= 1, (n, counts)
    assert assign_splits(n) == order


def test_custom_splits() -> None:
    bank = builtin_sprites(per_class=4, seed=0, splits={"train": 1.0, "test": 1.0})
    assert {s.split for s in bank} == {"train", "test"}
    with pytest.raises(BloodcellsError):
        builtin_sprites(per_class=4, splits={"train": -1.0})


def test_white_cells_have_dark_purple_nuclei_red_cells_do_not(bank: list[Sprite]) -> None:
    for cls in WBC:
        for s in _of(bank, cls):
            assert _dark_purple(_opaque_rgb(s)).mean() > 0.1, s.id
    for s in _of(bank, "healthy_rbc"):
        assert not _dark_purple(_opaque_rgb(s)).any(), s.id


def test_infected_red_cells_hold_purple_parasites(bank: list[Sprite]) -> None:
    for s in _of(bank, "infected_rbc"):
        assert np.count_nonzero(_purple(_opaque_rgb(s))) >= 10, s.id
    for s in _of(bank, "healthy_rbc"):
        assert not _purple(_opaque_rgb(s)).any(), s.id


def test_red_cells_are_salmon_with_a_pale_centre(bank: list[Sprite]) -> None:
    for s in _of(bank, "healthy_rbc"):
        px = _opaque_rgb(s)
        assert px[:, 0].mean() > px[:, 1].mean() + 30 and px[:, 0].mean() > px[:, 2].mean() + 30
        h, w = s.rgba.shape[:2]
        centre = s.rgba[h // 2 - 4:h // 2 + 4, w // 2 - 4:w // 2 + 4, :3].astype(int).sum(axis=2).mean()
        assert centre > px.sum(axis=1).mean(), s.id  # central pallor is lighter than the cell on average


def _orange_red_share(s: Sprite) -> float:
    hsv = cv2.cvtColor(np.ascontiguousarray(s.rgba[..., :3]), cv2.COLOR_RGB2HSV_FULL)[s.rgba[..., 3] > 200]
    hue = hsv[:, 0].astype(float) * 360.0 / 256.0
    return float(((hue < 30) | (hue > 345)).mean())


def test_eosinophils_are_orange_red_basophils_blue_purple(bank: list[Sprite]) -> None:
    eos, bas = _of(bank, "eosinophil"), _of(bank, "basophil")
    assert min(_orange_red_share(s) for s in eos) > 0.5
    assert max(_orange_red_share(s) for s in bas) < 0.05
    red_minus_blue = {c: np.mean([np.mean(_opaque_rgb(s) @ [1, 0, -1]) for s in _of(bank, c)])
                      for c in ("eosinophil", "basophil")}
    assert red_minus_blue["eosinophil"] > red_minus_blue["basophil"] + 50


def test_lymphocyte_nucleus_fills_the_cell_neutrophil_does_not(bank: list[Sprite]) -> None:
    assert min(_dark_purple(_opaque_rgb(s)).mean() for s in _of(bank, "lymphocyte")) > 0.5
    assert max(_dark_purple(_opaque_rgb(s)).mean() for s in _of(bank, "neutrophil")) < 0.45


def test_monocyte_cytoplasm_is_blue_grey_neutrophil_pink(bank: list[Sprite]) -> None:
    def bluish(s: Sprite) -> float:
        px = _opaque_rgb(s)
        return float((px[:, 2] > px[:, 0] + 5).mean())
    assert min(bluish(s) for s in _of(bank, "monocyte")) > 0.85
    assert max(bluish(s) for s in _of(bank, "neutrophil")) < 0.6


def test_params_match_the_class_table() -> None:
    params = load_params()
    for cls in SPRITE_CLASSES:
        assert params["classes"][cls]["diameter"] == BY_NAME[cls].diameter_40x, cls
    assert DEFAULT_PARAMS_PATH == Path(__file__).resolve().parents[1] / "assets" / "procedural.yaml"


def test_custom_params_are_used() -> None:
    params = load_params()
    params["classes"]["healthy_rbc"]["diameter"] = 20
    small = make_sprite("healthy_rbc", np.random.default_rng(0), params)
    assert mask_diameter(small[..., 3]) < 0.75 * 2 * 37


def _write_broken(tmp_path: Path, edit) -> Path:
    params = yaml.safe_load(DEFAULT_PARAMS_PATH.read_text(encoding="utf-8"))
    edit(params["classes"])
    path = tmp_path / "procedural.yaml"
    path.write_text(yaml.safe_dump(params), encoding="utf-8")
    return path


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.pop("monocyte"), "class 'monocyte' is missing"),
    (lambda c: c["neutrophil"].pop("lobe_step"), "'neutrophil' lacks lobe_step"),
    (lambda c: c["eosinophil"].update(granules=[300, 0]), "eosinophil.granules must be an RGB"),
    (lambda c: c["lymphocyte"].update(nucleus_shape="star"), "'lymphocyte' needs nucleus_shape"),
    (lambda c: c["basophil"].update(kind="fish"), "'basophil' needs kind"),
])
def test_bad_params_name_the_class_and_the_fix(tmp_path: Path, edit, message: str) -> None:
    path = _write_broken(tmp_path, edit)
    with pytest.raises(BloodcellsError, match=message) as err:
        load_params(path)
    assert str(path) in str(err.value)


def test_missing_params_file_and_unknown_class(tmp_path: Path) -> None:
    with pytest.raises(BloodcellsError, match="not found"):
        load_params(tmp_path / "missing.yaml")
    with pytest.raises(BloodcellsError, match="platelet_clump"):
        make_sprite("platelet_clump", np.random.default_rng(0))
