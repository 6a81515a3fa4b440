"""Built-in default sprites: stained blood cells drawn procedurally, so a fresh machine with
no dataset can still run the whole pipeline.

Each cell is painted in optical density (Beer-Lambert: colour = 255 * exp(-density)), layer
by layer — cytoplasm, nucleus, granules, parasites — so overlapping structures darken the way
stains do. Shapes are signed-distance fields (negative inside) perturbed by random radial
Fourier terms; the alpha channel is the cell's field with a soft anti-aliased edge. All
randomness comes from the `numpy.random.Generator` passed in; the parameters live in
`assets/procedural.yaml`.
"""
from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import yaml

from bloodcells.classes import BY_NAME
from bloodcells.errors import BloodcellsError

from .sprite import Sprite, mask_diameter

# The classes drawn here; platelet clumps are built by the composer from thrombocytes.
SPRITE_CLASSES: tuple[str, ...] = (
    "eosinophil", "basophil", "neutrophil", "lymphocyte",
    "monocyte", "thrombocyte", "infected_rbc", "healthy_rbc",
)
DEFAULT_PARAMS_PATH = Path(__file__).resolve().parents[1] / "assets" / "procedural.yaml"
DEFAULT_SPLITS: Mapping[str, float] = {"train": 0.8, "val": 0.1, "test": 0.1}

_COLOUR_KEYS = ("body", "pallor", "cytoplasm", "nucleus", "granules")  # and every "*_color"
_COMMON_KEYS = ("scale", "margin_px", "edge_px", "size_jitter", "elongation", "outline_amp", "outline_harmonics",
                "stain_jitter", "hue_jitter", "grain", "mottle", "mottle_frac", "membrane", "membrane_frac")
_RBC_KEYS = ("body", "pallor", "pallor_radius", "pallor_depth", "pallor_offset")
_KIND_KEYS: dict[str, tuple[str, ...]] = {  # what each kind of cell needs besides the common keys
    "rbc": _RBC_KEYS,
    "infected_rbc": _RBC_KEYS + (
        "trophozoite_prob", "rings", "ring_weights", "ring_radius", "ring_width", "ring_gap", "ring_spread",
        "ring_color", "chromatin_radius", "chromatin_color", "double_dot_prob", "trophozoite_radius",
        "trophozoite_amp", "trophozoite_color", "pigment_color", "pigment_count", "stipple_prob",
        "stipple_density", "stipple_size", "stipple_color"),
    "wbc": ("cytoplasm", "nucleus", "nucleus_shape", "nucleus_texture", "nucleus_texture_frac", "granules",
            "granule_density", "granule_size", "granule_over_nucleus"),
    "thrombocyte": ("cytoplasm", "granulomere", "granules", "granule_density", "granule_size"),
}
_NUCLEUS_KEYS: dict[str, tuple[str, ...]] = {  # and what each nucleus shape of a white cell needs
    "lobed": ("lobes", "lobe_radius", "lobe_elongation", "lobe_step", "lobe_turn", "filament_width"),
    "round": ("nucleus_radius", "nucleus_offset", "nucleus_amp"),
    "kidney": ("kidney_bend_radius", "kidney_span", "kidney_thickness", "nucleus_offset", "nucleus_amp"),
}
_F = np.float32
_TABLE = 2048  # angular resolution of tabulated outlines


# --------------------------------------------------------------------------- parameters

def load_params(path: str | Path | None = None) -> dict[str, Any]:
    """Read and check the generator's parameter file (default: assets/procedural.yaml)."""
    path = Path(path) if path is not None else DEFAULT_PARAMS_PATH
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BloodcellsError(
            f"{path}: procedural sprite parameters not found; restore assets/procedural.yaml") from None
    except (OSError, yaml.YAMLError) as e:
        raise BloodcellsError(f"{path}: cannot read procedural sprite parameters ({e}); fix the YAML") from None
    _check_params(data, path)
    return data


def _check_params(data: Any, path: Path) -> None:
    """Every drawable class present, with its kind's keys and well-formed colours."""
    if not isinstance(data, dict) or not isinstance(data.get("common"), dict) \
            or not isinstance(data.get("classes"), dict):
        raise BloodcellsError(f"{path}: needs a 'common' mapping and a 'classes' mapping; see assets/procedural.yaml")
    for name in SPRITE_CLASSES:
        block = data["classes"].get(name)
        if not isinstance(block, dict):
            raise BloodcellsError(f"{path}: class '{name}' is missing; add a block for it under 'classes'")
        if block.get("kind") not in _KIND_KEYS:
            raise BloodcellsError(f"{path}: class '{name}' needs kind: one of {', '.join(_KIND_KEYS)}")
        if not isinstance(block.get("diameter"), (int, float)) or block["diameter"] <= 0:
            raise BloodcellsError(f"{path}: class '{name}' needs a positive 'diameter' (px at 40x)")
        p = {**data["common"], **block}
        needed = _COMMON_KEYS + _KIND_KEYS[block["kind"]]
        if block["kind"] == "wbc":
            if p.get("nucleus_shape") not in _NUCLEUS_KEYS:
                raise BloodcellsError(f"{path}: class '{name}' needs nucleus_shape: one of {', '.join(_NUCLEUS_KEYS)}")
            needed += _NUCLEUS_KEYS[p["nucleus_shape"]] + (("vacuole_radius",) if "vacuoles" in p else ())
        missing = [k for k in needed if k not in p]
        if missing:
            raise BloodcellsError(f"{path}: class '{name}' lacks {', '.join(missing)}; "
                                  "add them to its block or to 'common'")
        for key, value in p.items():
            if (key in _COLOUR_KEYS or key.endswith("_color")) and not (
                    isinstance(value, list) and len(value) == 3
                    and all(isinstance(v, (int, float)) and 0 <= v <= 255 for v in value)):
                raise BloodcellsError(f"{path}: {name}.{key} must be an RGB list of three numbers 0-255")


@functools.lru_cache(maxsize=1)
def _default_params() -> dict[str, Any]:
    return load_params()


def _class_params(cls: str, params: Mapping[str, Any] | None) -> dict[str, Any]:
    table = _default_params() if params is None else params
    if cls not in table["classes"]:
        raise BloodcellsError(
            f"no procedural parameters for class '{cls}'; known: {', '.join(table['classes'])} "
            f"(see {DEFAULT_PARAMS_PATH.name})")
    return {**table["common"], **table["classes"][cls]}


# --------------------------------------------------------------------------- field helpers

def _uniform(rng: np.random.Generator, pair: Any) -> float:
    """One draw from a [lo, hi] range (a plain number is returned as it is)."""
    if isinstance(pair, (list, tuple)):
        return float(rng.uniform(pair[0], pair[1]))
    return float(pair)


def _od(rgb: Any) -> np.ndarray:
    """Optical density (per channel) of a colour seen on a white field."""
    return -np.log((np.asarray(rgb, dtype=_F) + 0.5) / 255.5).astype(_F)


def _soft(sd: np.ndarray, width: float) -> np.ndarray:
    """Coverage in [0, 1] from a signed distance: 1 inside, a linear ramp `width` px wide at the edge."""
    return np.clip(0.5 - sd / width, 0.0, 1.0)


def _smin(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    """Smooth union of two signed-distance fields (rounded joins of radius about k)."""
    h = np.clip(0.5 + 0.5 * (b - a) / k, 0.0, 1.0)
    return b + (a - b) * h - k * h * (1.0 - h)


def _lerp(od: np.ndarray, target: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Blend a density image (H, W, 3) towards `target` ((3,) or (H, W, 3)) by weight (H, W)."""
    w = weight[..., None]
    return od + (target - od) * w


def _outline(rng: np.random.Generator, radius: float, amp: float, harmonics: int,
             elongation: float = 1.0, angle: float = 0.0) -> tuple[np.ndarray, float, float]:
    """Random irregular outline: R(theta) tabulated, plus its elongation and orientation.

    The outline is an ellipse of equal area whose radius is perturbed by random Fourier terms
    (2nd .. `harmonics`-th, amplitude `amp` at the 2nd, falling as 1/k).
    """
    ks = np.arange(2, max(2, int(harmonics)) + 1)
    amps = amp * (2.0 / ks) * rng.standard_normal(len(ks))
    phases = rng.uniform(0.0, 2.0 * np.pi, len(ks))
    theta = np.arange(_TABLE) * (2.0 * np.pi / _TABLE)
    table = radius * (1.0 + (amps[:, None] * np.cos(ks[:, None] * theta + phases[:, None])).sum(axis=0))
    table = np.append(table, table[0]).astype(_F)  # theta == 2 pi rounds onto the extra entry
    return table, float(elongation), float(angle)


def _outline_sd(x: np.ndarray, y: np.ndarray, outline: tuple[np.ndarray, float, float]) -> np.ndarray:
    """Signed distance (px, negative inside) to an outline from `_outline`, centred at x = y = 0."""
    table, elongation, angle = outline
    c, s, e = np.cos(angle), np.sin(angle), np.sqrt(elongation)
    u = (x * _F(c) + y * _F(s)) * _F(1.0 / e)
    v = (y * _F(c) - x * _F(s)) * _F(e)
    r, theta = cv2.cartToPolar(u, v)  # theta in [0, 2 pi)
    return r - np.take(table, (theta * _F(_TABLE / (2.0 * np.pi))).astype(np.int32))


def _star(x: np.ndarray, y: np.ndarray, radius: float, rng: np.random.Generator, amp: float,
          harmonics: int, elongation: float = 1.0, angle: float = 0.0) -> np.ndarray:
    """Signed distance (px, negative inside) to a random irregular outline centred at x = y = 0."""
    return _outline_sd(x, y, _outline(rng, radius, amp, harmonics, elongation, angle))


def _segment(x: np.ndarray, y: np.ndarray, a: np.ndarray, b: np.ndarray, width: float) -> np.ndarray:
    """Signed distance to a capsule (segment a-b with half-width `width`)."""
    bx, by = b[0] - a[0], b[1] - a[1]
    px, py = x - a[0], y - a[1]
    t = np.clip((px * bx + py * by) / max(bx * bx + by * by, 1e-6), 0.0, 1.0)
    return _dist(px - bx * t, py - by * t) - width


def _dist(dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Euclidean length of float32 offsets (np.hypot is several times slower)."""
    return np.sqrt(dx * dx + dy * dy)


def _wrap(angle: np.ndarray) -> np.ndarray:
    """Angles in (-3 pi, 3 pi) wrapped to [-pi, pi]."""
    two_pi = _F(2.0 * np.pi)
    angle = np.where(angle > np.pi, angle - two_pi, angle)
    return np.where(angle < -np.pi, angle + two_pi, angle)


def _noise(shape: tuple[int, int], rng: np.random.Generator, feature_px: float) -> np.ndarray:
    """Smooth zero-mean, unit-variance noise whose blobs are about `feature_px` across."""
    h, w = shape
    if feature_px <= 1.0:
        return rng.standard_normal(shape, dtype=_F)
    gh, gw = int(np.ceil(h / feature_px)) + 2, int(np.ceil(w / feature_px)) + 2
    field = cv2.resize(rng.standard_normal((gh, gw), dtype=_F), (w, h), interpolation=cv2.INTER_CUBIC)
    return (field - field.mean()) / max(float(field.std()), 1e-6)


def _stamp_disc(field: np.ndarray, body: "_Body", centre: np.ndarray, radius: float, edge: float) -> None:
    """Raise `field` to a soft disc's coverage, touching only the disc's bounding window."""
    win = body.window(centre, centre, radius + edge + 1.0)
    disc = _soft(_dist(body.x[win] - centre[0], body.y[win] - centre[1]) - radius, edge)
    np.maximum(field[win], disc, out=field[win])


def _granules(region: np.ndarray, rng: np.random.Generator, density: float, radius: float,
              weight: tuple[float, float] = (0.6, 1.0)) -> np.ndarray:
    """Field in [0, 1] of round granules placed at random inside `region` (bool).

    `density` is the share of the region the granules would cover if none overlapped; each
    pixel belongs to its nearest granule, so packed granules stay distinct, with seams.
    """
    field = np.zeros(region.shape, dtype=_F)
    rows, cols = np.flatnonzero(region.any(axis=1)), np.flatnonzero(region.any(axis=0))
    if rows.size == 0:
        return field
    radius = max(radius, 0.7)
    pad = int(np.ceil(1.3 * radius)) + 2  # granules at the region's edge stay whole
    win = (slice(max(rows[0] - pad, 0), rows[-1] + pad + 1), slice(max(cols[0] - pad, 0), cols[-1] + pad + 1))
    candidates = np.flatnonzero(region[win])
    count = int(rng.poisson(density * candidates.size / (np.pi * radius * radius)))
    if count == 0:
        return field
    seeds = np.ones(region[win].shape, dtype=np.uint8)
    seeds.reshape(-1)[candidates[rng.integers(0, candidates.size, count)]] = 0
    dist, label = cv2.distanceTransformWithLabels(seeds, cv2.DIST_L2, 5, labelType=cv2.DIST_LABEL_PIXEL)
    # labels number the distinct granule pixels in raster order; give each its own size and weight
    n = int(label.max())
    inv_r2 = (1.0 / (radius * rng.uniform(0.7, 1.3, n + 1)) ** 2).astype(_F)
    weights = rng.uniform(weight[0], weight[1], n + 1).astype(_F)
    profile = np.maximum(1.0 - dist * dist * inv_r2[label], 0.0)
    field[win] = np.sqrt(profile) * weights[label]
    return cv2.GaussianBlur(field, (0, 0), 0.6)


# --------------------------------------------------------------------------- cell body

class _Body:
    """The cell outline on its canvas: coordinates, signed distance, alpha, base texture."""

    def __init__(self, p: Mapping[str, Any], rng: np.random.Generator):
        self.radius = p["scale"] * p["diameter"] * _uniform(rng, p["size_jitter"]) / 2.0
        outline = _outline(rng, self.radius, p["outline_amp"], p["outline_harmonics"],
                           _uniform(rng, p["elongation"]), rng.uniform(0.0, np.pi))
        # the canvas just holds the outline's farthest point, its soft edge and a clear margin
        reach = float(outline[0].max()) * np.sqrt(outline[1]) + p["edge_px"] + p["margin_px"]
        size = 2 * int(np.ceil(reach)) + 2
        self.shape = (size, size)
        coord = np.arange(size, dtype=_F) - _F((size - 1) / 2.0)
        self.x, self.y = np.meshgrid(coord, coord)
        self.sd = _outline_sd(self.x, self.y, outline)
        self.alpha = _soft(self.sd, p["edge_px"])
        self.depth = np.maximum(-self.sd, 0.0)  # px inside the edge
        self.mottle = _noise(self.shape, rng, p["mottle_frac"] * self.radius)
        self.grain = (rng.random(self.shape, dtype=_F) - _F(0.5)) * _F(np.sqrt(12.0))  # unit variance

    def texture(self, p: Mapping[str, Any]) -> np.ndarray:
        """Relative density (H, W): mottle, grain and the darker membrane rim."""
        rim = np.exp(-self.depth / (p["membrane_frac"] * self.radius))
        return (1.0 + p["mottle"] * self.mottle + p["grain"] * self.grain) * (1.0 + p["membrane"] * rim)

    def window(self, a: Any, b: Any, reach: float) -> tuple[slice, slice]:
        """Rows and columns of the canvas within `reach` px of the box spanned by points a and b."""
        half = (self.shape[0] - 1) / 2.0
        lo = [max(0, int(np.floor(min(a[k], b[k]) + half - reach))) for k in (1, 0)]
        hi = [min(self.shape[0], int(np.ceil(max(a[k], b[k]) + half + reach)) + 1) for k in (1, 0)]
        return slice(lo[0], hi[0]), slice(lo[1], hi[1])

    def point(self, rng: np.random.Generator, max_frac: float) -> np.ndarray:
        """A random point within `max_frac` of the radius from the centre, uniform over the disc."""
        r = self.radius * max_frac * np.sqrt(rng.uniform())
        a = rng.uniform(0.0, 2.0 * np.pi)
        return np.array([r * np.cos(a), r * np.sin(a)], dtype=_F)


def _finish(body: _Body, od: np.ndarray, p: Mapping[str, Any], rng: np.random.Generator) -> np.ndarray:
    """Apply stain intensity and hue jitter, convert density to colour, attach the alpha mask.

    The colour goes on smoothly under the transparent margin, so resizing the RGBA without
    premultiplying it leaves no dark fringe at the soft edge.
    """
    stain = _uniform(rng, p["stain_jitter"]) * (1.0 + p["hue_jitter"] * rng.uniform(-1.0, 1.0, 3))
    rgb = np.exp(od * (-stain).astype(_F)) * _F(255.0) + _F(0.5)
    rgba = np.empty(body.shape + (4,), dtype=np.uint8)
    rgba[..., :3] = np.minimum(rgb, 255.0)  # density >= 0 keeps it >= 0
    rgba[..., 3] = body.alpha * _F(255.0) + _F(0.5)
    return rgba


# --------------------------------------------------------------------------- red cells

def _draw_rbc(p: Mapping[str, Any], rng: np.random.Generator) -> tuple[_Body, np.ndarray]:
    """Biconcave disc: salmon body, paler (off-centre) pallor, soft darker rim."""
    body = _Body(p, rng)
    centre = body.point(rng, p["pallor_offset"])
    d = _dist(body.x - centre[0], body.y - centre[1]) / (_uniform(rng, p["pallor_radius"]) * body.radius)
    pallor = _F(_uniform(rng, p["pallor_depth"])) * np.exp(-d ** 4)
    od = _lerp(np.broadcast_to(_od(p["body"]), body.shape + (3,)), _od(p["pallor"]), pallor)
    return body, od * body.texture(p)[..., None]


def _ring_forms(body: _Body, od: np.ndarray, p: Mapping[str, Any], rng: np.random.Generator) -> np.ndarray:
    """Paint 1-3 Plasmodium rings: thin purple ring, often open, with a dark chromatin dot."""
    weights = np.asarray(p["ring_weights"], dtype=float)
    n = int(p["rings"][0]) + int(rng.choice(len(weights), p=weights / weights.sum()))
    n = min(n, int(p["rings"][1]))
    inside = _soft(body.sd + 2.0, 1.0)
    for _ in range(n):
        c = body.point(rng, p["ring_spread"])
        rr = _uniform(rng, p["ring_radius"]) * body.radius
        width = max(_uniform(rng, p["ring_width"]) * body.radius, 1.2)
        dx, dy = body.x - c[0], body.y - c[1]
        dist, angle = cv2.cartToPolar(dx, dy)
        ring = _soft(np.abs(dist - rr) - width / 2.0, 1.2)
        gap_at = rng.uniform(0.0, 2.0 * np.pi)
        off = np.abs(_wrap(angle - _F(gap_at)))  # angle from the gap
        ring *= np.clip((off - _uniform(rng, p["ring_gap"]) / 2.0) * rr / 1.5, 0.0, 1.0)
        od = _lerp(od, _od(p["ring_color"]), 0.9 * ring * inside)
        dots = [gap_at + np.pi + rng.uniform(-0.8, 0.8)]
        if rng.uniform() < p["double_dot_prob"]:
            dots.append(dots[0] + rng.choice([-1.0, 1.0]) * rng.uniform(0.6, 1.0))
        for a in dots:
            cr = max(_uniform(rng, p["chromatin_radius"]) * body.radius, 1.3)
            dot = _soft(_dist(dx - _F(rr * np.cos(a)), dy - _F(rr * np.sin(a))) - cr, 1.2)
            od = _lerp(od, _od(p["chromatin_color"]), dot * inside)
    return od


def _trophozoite(body: _Body, od: np.ndarray, p: Mapping[str, Any], rng: np.random.Generator) -> np.ndarray:
    """Paint one amoeboid trophozoite: a denser purple blob with chromatin and haemozoin specks."""
    c = body.point(rng, 0.3)
    radius = _uniform(rng, p["trophozoite_radius"]) * body.radius
    sd = _star(body.x - c[0], body.y - c[1], radius, rng, p["trophozoite_amp"], 5,
                  rng.uniform(1.0, 1.5), rng.uniform(0.0, np.pi))
    sd = np.maximum(sd + 0.06 * radius * _noise(body.shape, rng, 0.5 * radius), body.sd + 2.0)
    blob = _soft(sd, 1.5)
    density = 1.0 + 0.15 * _noise(body.shape, rng, 0.25 * radius)
    od = _lerp(od, _od(p["trophozoite_color"]) * density[..., None], 0.85 * blob)
    dot_at = (c + radius * 0.5 * rng.uniform(-1.0, 1.0, 2)).astype(_F)
    cr = max(_uniform(rng, p["chromatin_radius"]) * body.radius, 1.3)
    od = _lerp(od, _od(p["chromatin_color"]), _soft(_dist(body.x - dot_at[0], body.y - dot_at[1]) - cr, 1.2))
    lo, hi = p["pigment_count"]
    specks = _granules(blob > 0.5, rng, rng.integers(lo, hi + 1) * 0.02, 0.04 * body.radius, (0.8, 1.0))
    return _lerp(od, _od(p["pigment_color"]), specks)


def _draw_infected_rbc(p: Mapping[str, Any], rng: np.random.Generator) -> tuple[_Body, np.ndarray]:
    """The red disc plus ring forms or a trophozoite, sometimes with stippling."""
    body, od = _draw_rbc(p, rng)
    if rng.uniform() < p["stipple_prob"]:
        dots = _granules(body.sd < -2.0, rng, p["stipple_density"], p["stipple_size"] * body.radius, (0.5, 0.9))
        od = _lerp(od, _od(p["stipple_color"]), dots)
    if rng.uniform() < p["trophozoite_prob"]:
        od = _trophozoite(body, od, p, rng)
    else:
        od = _ring_forms(body, od, p, rng)
    return body, od


# --------------------------------------------------------------------------- white cells

def _pick_count(rng: np.random.Generator, bounds: list[int], weights: list[float] | None) -> int:
    """A count in [lo, hi], uniform or by relative weights for lo, lo + 1, ..."""
    lo, hi = int(bounds[0]), int(bounds[1])
    if weights:
        w = np.asarray(weights, dtype=float)[: hi - lo + 1]
        return lo + int(rng.choice(len(w), p=w / w.sum()))
    return int(rng.integers(lo, hi + 1))


def _lobed_nucleus(body: _Body, p: Mapping[str, Any], rng: np.random.Generator) -> np.ndarray:
    """Signed distance of a segmented nucleus: oval lobes along a bent path, joined by strands."""
    R = body.radius
    n = _pick_count(rng, p["lobes"], p.get("lobe_weights"))
    # a bent walk (C or S shaped) from lobe to lobe, then centred in the cell and made to fit
    heading = rng.uniform(0.0, 2.0 * np.pi)
    bend = rng.choice([-1.0, 1.0])
    centres = [np.zeros(2)]
    for _ in range(n - 1):
        step = _uniform(rng, p["lobe_step"]) * R
        centres.append(centres[-1] + step * np.array([np.cos(heading), np.sin(heading)]))
        if rng.uniform() < 0.2:
            bend = -bend
        heading += bend * _uniform(rng, p["lobe_turn"])
    centres = np.array(centres)
    centres -= (centres.max(axis=0) + centres.min(axis=0)) / 2.0
    radii = np.array([_uniform(rng, p["lobe_radius"]) for _ in range(n)]) * R
    reach = float(np.max(np.hypot(centres[:, 0], centres[:, 1]) + radii))
    if reach > 0.9 * R:
        centres *= (0.9 * R - radii.max()) / max(reach - radii.max(), 1e-3)
    centres = centres.astype(_F)
    # each piece is evaluated only in its own window; elsewhere it is "far" (R outside)
    sd = np.full(body.shape, R, dtype=_F)
    for i, ((cx, cy), lr) in enumerate(zip(centres, radii)):
        nb = centres[min(i + 1, n - 1)] - centres[max(i - 1, 0)]
        along = float(np.arctan2(nb[1], nb[0])) if n > 1 else rng.uniform(0.0, np.pi)
        elongation = _uniform(rng, p["lobe_elongation"])
        win = body.window((cx, cy), (cx, cy), 1.5 * lr * np.sqrt(elongation) + 0.1 * R)
        lobe = _star(body.x[win] - cx, body.y[win] - cy, lr, rng, 0.08, 5, elongation,
                        along + rng.uniform(-0.4, 0.4))
        sd[win] = _smin(sd[win], lobe, 0.03 * R)
    for a, b in zip(centres[:-1], centres[1:]):
        width = _uniform(rng, p["filament_width"]) * R
        win = body.window(a, b, width + 0.1 * R)
        sd[win] = _smin(sd[win], _segment(body.x[win], body.y[win], a, b, width), 0.04 * R)
    return sd


def _round_nucleus(body: _Body, p: Mapping[str, Any], rng: np.random.Generator) -> np.ndarray:
    """Signed distance of one big round nucleus pushed to one side, sometimes notched."""
    R = body.radius
    a = rng.uniform(0.0, 2.0 * np.pi)
    off = _uniform(rng, p["nucleus_offset"]) * R
    c = np.array([off * np.cos(a), off * np.sin(a)], dtype=_F)
    nr = _uniform(rng, p["nucleus_radius"]) * R
    sd = _star(body.x - c[0], body.y - c[1], nr, rng, p["nucleus_amp"], 5, rng.uniform(1.0, 1.15),
                  rng.uniform(0.0, np.pi))
    if rng.uniform() < p.get("nucleus_notch_prob", 0.0):
        b = rng.uniform(0.0, 2.0 * np.pi)
        notch = _dist(body.x - _F(c[0] + 1.12 * nr * np.cos(b)), body.y - _F(c[1] + 1.12 * nr * np.sin(b)))
        notch -= _F(0.3 * nr)  # a shallow bite, 0.18 of the nucleus radius deep
        sd = np.maximum(sd, -notch)
    return sd


def _kidney_nucleus(body: _Body, p: Mapping[str, Any], rng: np.random.Generator) -> np.ndarray:
    """Signed distance of a kidney/horseshoe nucleus: a thick tube bent along an arc."""
    R = body.radius
    bend = _uniform(rng, p["kidney_bend_radius"]) * R
    half = _uniform(rng, p["kidney_span"]) / 2.0
    thick = _uniform(rng, p["kidney_thickness"]) * R
    facing = rng.uniform(0.0, 2.0 * np.pi)
    off = body.point(rng, p["nucleus_offset"][1])
    # put the arc's centre behind the nucleus so the nucleus itself sits near the cell centre
    ox = _F(off[0] - 0.5 * bend * np.cos(facing))
    oy = _F(off[1] - 0.5 * bend * np.sin(facing))
    dx, dy = body.x - ox, body.y - oy
    dist, angle = cv2.cartToPolar(dx, dy)
    rel = _wrap(angle - _F(facing))
    on_arc = np.abs(dist - _F(bend))
    ends = [_dist(dx - _F(bend * np.cos(facing + s * half)), dy - _F(bend * np.sin(facing + s * half)))
            for s in (-1.0, 1.0)]
    dist = np.where(np.abs(rel) <= half, on_arc, np.minimum(*ends))
    taper = 1.0 - 0.2 * (np.abs(rel) / max(half, 1e-3)).clip(0, 1)  # ends a little thinner
    wobble = p["nucleus_amp"] * R * _noise(body.shape, rng, 0.35 * R)
    return dist - thick * taper + wobble


_NUCLEI = {"lobed": _lobed_nucleus, "round": _round_nucleus, "kidney": _kidney_nucleus}


def _draw_wbc(p: Mapping[str, Any], rng: np.random.Generator) -> tuple[_Body, np.ndarray]:
    """Round white cell: textured cytoplasm, a nucleus of the class's shape, granules, vacuoles."""
    body = _Body(p, rng)
    R = body.radius
    nuc_sd = np.maximum(_NUCLEI[p["nucleus_shape"]](body, p, rng), body.sd + 0.05 * R)  # keep a cytoplasm rim
    nucleus = _soft(nuc_sd, 1.5)
    chromatin = np.maximum(1.0 + p["nucleus_texture"] * _noise(body.shape, rng, p["nucleus_texture_frac"] * R), 0.6)
    chromatin *= 1.0 + 0.25 * np.exp(-np.abs(nuc_sd) * _F(1.0 / (0.04 * R)))  # denser along the nuclear edge
    if p.get("nucleus_folds"):
        ridge = _noise(body.shape, rng, 0.25 * R)
        chromatin *= 1.0 - p["nucleus_folds"] * np.exp(-(ridge * _F(5.0)) ** 2)

    grains = np.zeros(body.shape, dtype=_F)
    if p.get("granule_density", 0.0) > 0.0:
        grains = _granules(body.sd < -1.0, rng, p["granule_density"], p["granule_size"] * R)
        grains *= 1.0 - nucleus * (1.0 - p["granule_over_nucleus"])

    # each pixel mixes cytoplasm, nucleus and granule densities (later layers cover earlier ones)
    uncovered = 1.0 - grains
    weights = np.stack([body.texture(p) * (1.0 - nucleus) * uncovered, chromatin * nucleus * uncovered, grains], -1)
    if "vacuoles" in p:
        lo, hi = p["vacuoles"]
        clear = np.zeros(body.shape, dtype=_F)
        for _ in range(int(rng.integers(lo, hi + 1))):
            _stamp_disc(clear, body, body.point(rng, 0.8), _uniform(rng, p["vacuole_radius"]) * R, 1.5)
        weights *= (1.0 - 0.65 * clear * (1.0 - nucleus) * _soft(body.sd + 2.0, 1.0))[..., None]
    colours = np.stack([_od(p["cytoplasm"]), _od(p["nucleus"]), _od(p["granules"])])
    return body, weights @ colours


# --------------------------------------------------------------------------- platelets

def _draw_thrombocyte(p: Mapping[str, Any], rng: np.random.Generator) -> tuple[_Body, np.ndarray]:
    """Small irregular fragment: pale lilac hyalomere around a purple granular centre."""
    body = _Body(p, rng)
    R = body.radius
    od = np.broadcast_to(_od(p["cytoplasm"]), body.shape + (3,)) * body.texture(p)[..., None]
    c = body.point(rng, 0.2)
    centre_sd = _star(body.x - c[0], body.y - c[1], _uniform(rng, p["granulomere"]) * R, rng, 0.12, 5)
    core = _soft(np.maximum(centre_sd, body.sd + 1.0), 0.25 * R)
    od = _lerp(od, 0.6 * _od(p["granules"]) + 0.4 * _od(p["cytoplasm"]), 0.7 * core)
    grains = _granules(core > 0.3, rng, p["granule_density"], p["granule_size"] * R)
    return body, _lerp(od, _od(p["granules"]), grains)


_DRAW = {
    "rbc": _draw_rbc,
    "infected_rbc": _draw_infected_rbc,
    "wbc": _draw_wbc,
    "thrombocyte": _draw_thrombocyte,
}


# --------------------------------------------------------------------------- public API

def make_sprite(cls: str, rng: np.random.Generator, params: Mapping[str, Any] | None = None) -> np.ndarray:
    """Draw one cell of class `cls` as an RGBA uint8 array (alpha = its mask, soft edge).

    `params` is a whole parameter table as returned by `load_params` (default: the built-in
    one). The sprite is drawn at `scale` times the class's 40x diameter, like real crops.
    """
    p = _class_params(cls, params)
    body, od = _DRAW[p["kind"]](p, rng)
    return _finish(body, od, p, rng)


def assign_splits(n: int, splits: Mapping[str, float] = DEFAULT_SPLITS) -> list[str]:
    """The split of each of n indices: exact quotas (each split with a positive share gets at
    least one when n allows), spread evenly through the sequence rather than in blocks."""
    names = [s for s, f in splits.items() if f > 0]
    fracs = np.array([splits[s] for s in names], dtype=float)
    if not names or np.any(~np.isfinite(fracs)) or any(f < 0 for f in splits.values()):
        raise BloodcellsError(f"splits {dict(splits)} must be non-negative fractions with a positive sum")
    fracs /= fracs.sum()
    counts = np.floor(fracs * n).astype(int)
    if n >= len(names):
        counts = np.maximum(counts, 1)
    while counts.sum() > n:  # take back from the largest
        counts[int(np.argmax(counts))] -= 1
    while counts.sum() < n:  # largest remainder first
        counts[int(np.argmax(fracs * n - counts))] += 1
    share = counts / max(n, 1)
    given = np.zeros(len(names), dtype=int)
    order = []
    for i in range(n):
        deficit = np.where(given < counts, share * (i + 1) - given, -np.inf)
        k = int(np.argmax(deficit))
        given[k] += 1
        order.append(names[k])
    return order


def builtin_sprites(per_class: int = 24, seed: int = 0,
                    splits: Mapping[str, float] = DEFAULT_SPLITS) -> list[Sprite]:
    """`per_class` procedural sprites of every class in SPRITE_CLASSES, with deterministic splits.

    Sprite i of a class is drawn from its own generator seeded by (seed, class index, i), so
    the same seed gives byte-identical sprites and adding more sprites never changes earlier ones.
    """
    if per_class < 0 or seed < 0:
        raise BloodcellsError(f"builtin sprites need per_class >= 0 and seed >= 0 (got {per_class}, {seed})")
    params = _default_params()
    order = assign_splits(per_class, splits)
    sprites = []
    for cls in SPRITE_CLASSES:
        index = BY_NAME[cls].index
        for i in range(per_class):
            rgba = make_sprite(cls, np.random.default_rng([seed, index, i]), params)
            sprites.append(Sprite(id=f"builtin-{cls}-{i:04d}", cls=cls, rgba=rgba,
                                  diameter=mask_diameter(rgba[..., 3]), split=order[i], source="builtin",
                                  background=(255.0, 255.0, 255.0)))  # drawn as seen on a white field
    return sprites


__all__ = ["SPRITE_CLASSES", "DEFAULT_PARAMS_PATH", "DEFAULT_SPLITS", "load_params", "make_sprite",
           "assign_splits", "builtin_sprites"]
