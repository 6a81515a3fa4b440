"""Scene maths: transform sprites, paste them with exact labels and instances, build RBC canvases and clumps.

Labels are uint8 class indices; instances int32 object ids while composing. A pasted sprite labels
every pixel where its (un-feathered) alpha is over one half with its class and its object id, on
top of whatever was there: the top-most sprite owns a pixel, in the label map and the instance map
alike, so every pixel with an instance has that instance's class and every cell pixel has an instance.

Two ways to form the image (`look.blend`):
- `optical_density` (Beer-Lambert, the default): sprites are converted to optical density against
  their own source's background, densities add where red cells and platelets overlap (overlaps come out
  darker, as stacked absorbers do; white cells, which push red cells aside, cover what is below), and the
  sum is turned back into colour against the scene's plasma (a flat colour or a background field cut
  from a real smear): image = plasma * exp(-density).
- `alpha`: the top-most sprite's colour covers what is below (alpha compositing), on a plasma colour.
While composing, images are float32: RGB 0..255 (alpha) or optical density per channel (optical_density).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

from bloodcells.classes import BY_NAME, PLASMA_RGB, index_of
from bloodcells.stain import hed_affine

from .optics import apply_optics
from .sprite import Sprite

BLENDS = ("optical_density", "alpha")


def density(rgb: np.ndarray, background: np.ndarray) -> np.ndarray:
    """Optical density per channel of float RGB (h, w, 3) seen against `background` (3,): 0 at the background."""
    od = np.log(np.asarray(background, np.float32) + 1.0) - np.log(rgb.astype(np.float32) + 1.0)
    return np.maximum(od, 0.0, out=od)


def _percentile(values: np.ndarray, q: float) -> np.ndarray:
    """Per-channel percentile of (n, 3) values, from an evenly spaced sample of at most about 4096 of them."""
    return np.percentile(values[::max(1, len(values) // 4096)], q, axis=0)


def rim_capped_density(rgb: np.ndarray, alpha: np.ndarray, background: np.ndarray) -> np.ndarray:
    """Optical density (h, w, 3) of a cell's colours against its background, its soft rim (alpha below 0.98)
    capped at the densest 5% of its inside: a rim mixes the cell with what lay around it, which for crops cut
    out on black is black, and black reads as a dense dark ring once densities add."""
    od = density(rgb, background)
    inside = alpha >= 0.98
    if inside.any():
        cap = _percentile(od[inside], 95).astype(np.float32)
        rim = ~inside
        od[rim] = np.minimum(od[rim], cap)
    return od


def sprite_density(s: Sprite) -> np.ndarray:
    """A sprite's optical density at its native size (rim capped, see rim_capped_density)."""
    return rim_capped_density(s.rgba[..., :3], s.rgba[..., 3] / 255.0, sprite_background(s))


def sprite_background(s: Sprite) -> np.ndarray:
    """The light the sprite's cell was seen against: recorded at import, else a plasma no darker than its lightest
    pixels (for crops cut out on black, whose background is unknown)."""
    if s.background is not None:
        return np.asarray(s.background, np.float32)
    px = s.rgba[..., :3][s.rgba[..., 3] > 127]
    lightest = _percentile(px, 99.5) + 4.0 if px.size else np.zeros(3)
    return np.minimum(np.maximum(np.asarray(PLASMA_RGB, np.float32), lightest), 255.0).astype(np.float32)


class Layer:
    """A transformed sprite ready to paste: premultiplied colour (RGB or density), feathered alpha, exact mask."""

    __slots__ = ("rgb", "alpha", "mask", "box", "_inv")

    def __init__(self, rgb: np.ndarray, alpha: np.ndarray, mask: np.ndarray) -> None:
        self.rgb = rgb  # float32 (h, w, 3), premultiplied by alpha
        self.alpha = alpha  # float32 (h, w) in 0..1 (feathered)
        self.mask = mask  # bool (h, w): the pixels this sprite labels
        self.box = cv2.boundingRect(mask.astype(np.uint8))  # x, y, w, h of the mask
        self._inv: np.ndarray | None = None

    @property
    def inv(self) -> np.ndarray:
        """What shows through, per pixel and channel (alpha compositing only; a full-size array: broadcasting is
        10x slower)."""
        if self._inv is None:
            self._inv = np.repeat((1.0 - self.alpha)[..., None], 3, axis=2)
        return self._inv


@dataclass
class Placed:
    cls: str
    sprite: str
    source: str
    centre: tuple[float, float]
    bbox: tuple[int, int, int, int]
    rotation: float
    flip: bool
    scale: float
    parts: list[str] = field(default_factory=list)  # built objects (clumps): the sprites they are made of

    def to_json(self) -> dict:
        d = {"class": self.cls, "bbox": list(self.bbox), "centre": [round(self.centre[0], 2), round(self.centre[1], 2)],
             "rotation": round(self.rotation, 2), "flip": self.flip, "scale": round(self.scale, 4),
             "sprite": self.sprite, "source": self.source}
        if self.parts:
            d["built"] = True
            d["parts"] = self.parts
        return d


class Prepared:
    """Sprites resized once to a nominal size (area-averaged), premultiplied and feathered.

    Each entry is float32 (h, w, 5): feathered premultiplied colour (RGB, or optical density with
    blend 'optical_density'), feathered alpha, exact alpha."""

    def __init__(self, soft_edge: float = 0.0, blend: str = "alpha") -> None:
        self.soft_edge = soft_edge
        self.blend = blend
        self.cache: dict[tuple[str, float], tuple[np.ndarray, float]] = {}

    @property
    def additive(self) -> bool:
        return self.blend == "optical_density"

    def get(self, s: Sprite, diameter: float) -> tuple[np.ndarray, float]:
        """(float32 (h, w, 5) layers at ~diameter, their exact diameter in px)."""
        key = (s.id, diameter)
        hit = self.cache.get(key)
        if hit is None:
            pm, d = resize_premultiplied(s.rgba, s.diameter, diameter)
            if self.additive:
                # shrunk in light (a camera pixel averages the light of what it sees), then turned into density
                a = pm[..., 3]
                rgb = pm[..., :3] / np.maximum(a, 1e-6)[..., None]
                pm[..., :3] = rim_capped_density(rgb, a, sprite_background(s)) * a[..., None]
            hit = feather(pm, self.soft_edge), d
            if len(self.cache) > 20000:
                self.cache.clear()
            self.cache[key] = hit
        return hit


def resize_premultiplied(rgba: np.ndarray, d_native: float, diameter: float) -> tuple[np.ndarray, float]:
    """An RGBA uint8 sprite as premultiplied float32 (h, w, 4) resized to ~diameter (area-averaged when shrinking),
    and its exact diameter in px."""
    k = diameter / max(d_native, 1.0)
    a = rgba[..., 3:4].astype(np.float32) / 255.0
    pm = np.concatenate([rgba[..., :3].astype(np.float32) * a, a], axis=2)
    if abs(k - 1) > 0.02:
        h, w = pm.shape[:2]
        size = (max(2, round(w * k)), max(2, round(h * k)))
        pm = cv2.resize(pm, size, interpolation=cv2.INTER_AREA if k < 1 else cv2.INTER_LINEAR)
        k = size[0] / w
    return pm, d_native * k


def feather(pm: np.ndarray, soft_edge: float) -> np.ndarray:
    """(h, w, 4) premultiplied RGBA -> (h, w, 5) with a feathered edge and the exact alpha last."""
    pad = int(np.ceil(2 * soft_edge)) + 1
    pm = np.pad(pm, ((pad, pad), (pad, pad), (0, 0)))
    exact = pm[..., 3]
    if soft_edge > 0:
        alpha = cv2.GaussianBlur(exact, (0, 0), soft_edge)
        # feathering only fades the edge outward: inside the mask the cell stays as opaque as it was
        alpha = np.where(exact > 0.5, np.maximum(alpha, exact), alpha)
        ratio = np.where(exact > 1e-4, alpha / np.maximum(exact, 1e-4), 0)[..., None]
        rgb = pm[..., :3] * ratio
    else:
        alpha, rgb = exact, pm[..., :3]
    return np.ascontiguousarray(np.dstack([rgb, alpha, exact]), dtype=np.float32)


def transform(pm: np.ndarray, scale: float, angle: float, flip: bool,
              gains: np.ndarray | None = None) -> Layer:
    """Scale, rotate (degrees) and flip prepared (h, w, 5) sprite layers; tint the colour (or scale the density)."""
    if flip:
        pm = pm[:, ::-1]
    h, w = pm.shape[:2]
    m = cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), angle, scale)
    cos, sin = abs(m[0, 0]), abs(m[0, 1])
    ow, oh = int(np.ceil(w * cos + h * sin)) + 2, int(np.ceil(w * sin + h * cos)) + 2
    m[0, 2] += (ow - 1) / 2 - (w - 1) / 2
    m[1, 2] += (oh - 1) / 2 - (h - 1) / 2
    pm = np.ascontiguousarray(pm)
    kw = dict(flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    out = cv2.warpAffine(pm[..., :4], m, (ow, oh), **kw)
    mask = cv2.warpAffine(pm[..., 4], m, (ow, oh), **kw) > 0.5
    rgb = out[..., :3] if gains is None else out[..., :3] * gains
    return Layer(rgb, out[..., 3], mask)


def paste(img: np.ndarray, label: np.ndarray, layer: Layer, cls_index: int, cx: float, cy: float,
          inst: np.ndarray | None = None, inst_id: int = 0, additive: bool = False
          ) -> tuple[int, int, int, int] | None:
    """Composite `layer` centred at (cx, cy), clipped to the image; returns its visible label bbox.

    additive: add the layer's (density) values instead of covering what is below. `inst`, when given,
    takes `inst_id` wherever the label takes `cls_index`."""
    h, w = layer.mask.shape
    x0, y0 = int(round(cx - (w - 1) / 2)), int(round(cy - (h - 1) / 2))
    H, W = label.shape
    ix0, iy0, ix1, iy1 = max(0, x0), max(0, y0), min(W, x0 + w), min(H, y0 + h)
    if ix0 >= ix1 or iy0 >= iy1:
        return None
    sx0, sy0 = ix0 - x0, iy0 - y0
    sl = (slice(sy0, sy0 + iy1 - iy0), slice(sx0, sx0 + ix1 - ix0))
    region = img[iy0:iy1, ix0:ix1]
    if not additive:
        np.multiply(region, layer.inv[sl], out=region)
    np.add(region, layer.rgb[sl], out=region)
    m = layer.mask[sl]
    np.copyto(label[iy0:iy1, ix0:ix1], np.uint8(cls_index), where=m)
    if inst is not None:
        np.copyto(inst[iy0:iy1, ix0:ix1], inst.dtype.type(inst_id), where=m)
    bx, by, bw, bh = layer.box
    if bw == 0:
        return None
    if x0 == ix0 and y0 == iy0 and x0 + w == ix1 and y0 + h == iy1:  # not clipped: the mask's own box
        return x0 + bx, y0 + by, x0 + bx + bw, y0 + by + bh
    bx, by, bw, bh = cv2.boundingRect(m.astype(np.uint8))
    if bw == 0:
        return None
    return ix0 + bx, iy0 + by, ix0 + bx + bw, iy0 + by + bh


def jitter_gains(rng: np.random.Generator, strength: float) -> np.ndarray | None:
    """Per-sprite stain variation: a brightness factor times small per-channel gains."""
    if strength <= 0:
        return None
    g = 1.0 + rng.normal(0.0, strength * 0.5, 3) + rng.normal(0.0, strength)
    return np.clip(g, 0.6, 1.4).astype(np.float32)


def hue_rotation(degrees: float) -> np.ndarray:
    """3x3 RGB matrix turning every colour's chroma by `degrees` about the grey axis (YIQ), keeping its luma."""
    t = np.radians(degrees)
    turn = np.array([[1.0, 0.0, 0.0], [0.0, np.cos(t), -np.sin(t)], [0.0, np.sin(t), np.cos(t)]])
    return (np.linalg.inv(_RGB_TO_YIQ) @ turn @ _RGB_TO_YIQ).astype(np.float32)


_RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


def cell_look(layer: Layer, rng: np.random.Generator, stain: float, texture: float, additive: bool,
              hue: float = 0.0) -> Layer:
    """One object's own appearance, so that a source's look (its stain, the sharpness of its optics) does not
    stand for a cell type: the cell's haematoxylin, eosin and DAB concentrations scaled by U(1 - stain, 1 + stain)
    and shifted by U(-stain, stain) / 4 (optical density); with `hue`, its colours turned about the grey axis by
    U(-hue, hue) degrees (labs' Romanowsky stains differ in hue, not only in strength); then, equally likely, a
    blur (sigma up to 1.5 * texture px) or an unsharp mask (amount up to 2 * texture), both inside the cell only
    (normalised by its alpha, so its outline stays as sharp as it was). Alpha and mask, so the label, are
    unchanged; 0 turns each off."""
    a = layer.alpha
    a3 = np.maximum(a, np.float32(1e-3))[..., None]
    col = layer.rgb / a3  # un-premultiplied: optical density (additive) or RGB
    od = col if additive else -np.log((np.clip(col, 0.0, 255.0) + 1.0) / 256.0)
    if stain > 0:
        m, off = hed_affine(rng.uniform(1 - stain, 1 + stain, 3), rng.uniform(-stain, stain, 3) * 0.25)
        od = cv2.transform(np.ascontiguousarray(od, np.float32), np.hstack([m.T, off[:, None]]).astype(np.float32))
    if hue > 0:  # turned in RGB, where hue is defined, and back to optical density
        rgb = 256.0 * np.exp(-np.maximum(od, 0.0)) - 1.0
        rgb = cv2.transform(np.ascontiguousarray(rgb, np.float32), hue_rotation(float(rng.uniform(-hue, hue))))
        od = -np.log((np.clip(rgb, 0.0, 255.0) + 1.0) / 256.0)
    if texture > 0:
        blur = bool(rng.integers(2))
        amount = float(rng.uniform(0.0, (1.5 if blur else 2.0) * texture))
        sigma = amount if blur else 1.0
        if sigma >= 0.1 and amount > 0:
            smooth = cv2.GaussianBlur(od * a[..., None], (0, 0), sigma) / np.maximum(
                cv2.GaussianBlur(a, (0, 0), sigma), np.float32(1e-3))[..., None]
            od = smooth if blur else od + np.float32(amount) * (od - smooth)
    od = np.maximum(od, 0.0)
    col = od if additive else np.clip(256.0 * np.exp(-od) - 1.0, 0.0, 255.0)
    rgb = (col * a[..., None]).astype(np.float32)
    rgb[a <= 1e-3] = 0.0
    return Layer(rgb, a, layer.mask)


def nominal_size(sizes: dict, cls: str) -> float:
    """The size a class's sprites are prepared at: its diameter, or the geometric middle of its [low, high] range."""
    v = sizes[cls]
    return float(np.sqrt(v[0] * v[1])) if isinstance(v, (list, tuple)) else float(v)


def draw_size(rng: np.random.Generator, sizes: dict, cls: str) -> float:
    """One object's diameter at 40x: log-uniform in a [low, high] range, or the diameter times (1 +- jitter)."""
    v = sizes[cls]
    if isinstance(v, (list, tuple)):
        return float(np.exp(rng.uniform(np.log(v[0]), np.log(v[1]))))
    j = sizes["jitter"]
    return float(v) * (1.0 + float(rng.uniform(-j, j)))


def fade(layer: Layer, f: float, additive: bool) -> Layer:
    """A fainter copy of a layer (less stain taken up); its mask, and so its label, is unchanged."""
    if additive:
        return Layer(layer.rgb * np.float32(f), layer.alpha, layer.mask)
    return Layer(layer.rgb * np.float32(f), layer.alpha * np.float32(f), layer.mask)


def place_sprite(img: np.ndarray, label: np.ndarray, rng: np.random.Generator, prep: Prepared, s: Sprite,
                 sizes: dict, look: dict, cx: float, cy: float, inst: np.ndarray | None = None,
                 inst_id: int = 0) -> Placed | None:
    """Paste one sprite at (cx, cy) at its class's size with random rotation, flip and stain."""
    pm, d0 = prep.get(s, nominal_size(sizes, s.cls))
    scale = draw_size(rng, sizes, s.cls) / d0
    angle = float(rng.uniform(0, 360))
    flip = bool(rng.integers(2))
    layer = transform(pm, scale, angle, flip, jitter_gains(rng, look["stain_jitter"]))
    stain, texture, hue = look.get("cell_stain", 0.0), look.get("cell_texture", 0.0), look.get("cell_hue", 0.0)
    if stain > 0 or texture > 0 or hue > 0:
        layer = cell_look(layer, rng, stain, texture, prep.additive, hue)
    if s.cls == "thrombocyte" and look["faint"] > 0 and rng.uniform() < look["faint"]:
        layer = fade(layer, float(rng.uniform(0.35, 0.75)), prep.additive)
    # white cells push the red cells aside rather than lie on them: in density they cover what is below;
    # platelets lie on red cells as often as between them, and add to them
    additive = prep.additive and BY_NAME[s.cls].group != "wbc"
    bbox = paste(img, label, layer, index_of(s.cls), cx, cy, inst, inst_id, additive)
    if bbox is None:
        return None
    return Placed(s.cls, s.id, s.source, (cx, cy), bbox, angle, flip, scale * d0 / s.diameter)


def build_clump(rng: np.random.Generator, prep: Prepared, thrombocytes: list[Sprite], n: int,
                diameter: float, sizes: dict, look: dict) -> tuple[np.ndarray, list[str], float]:
    """A platelet clump: n thrombocyte sprites packed around a centre; premultiplied colour + alpha, and part ids."""
    part = nominal_size(sizes, "thrombocyte")
    size = int(diameter * 1.6) + 8
    img = np.zeros((size, size, 3), np.float32)
    alpha_img = np.zeros((size, size, 3), np.float32)
    lab = np.zeros((size, size), np.uint8)
    parts = []
    spread = max(1.0, (diameter - part) / 2)
    for _ in range(n):
        s = thrombocytes[int(rng.integers(len(thrombocytes)))]
        r = spread * np.sqrt(rng.uniform(0, 1))
        t = rng.uniform(0, 2 * np.pi)
        cx, cy = (size - 1) / 2 + r * np.cos(t), (size - 1) / 2 + r * np.sin(t)
        pm, d0 = prep.get(s, part)
        j = sizes["jitter"]
        layer = transform(pm, part * (1 + rng.uniform(-j, j)) / d0, float(rng.uniform(0, 360)),
                          bool(rng.integers(2)), jitter_gains(rng, look["stain_jitter"]))
        paste(img, lab, layer, 1, cx, cy, additive=prep.additive)
        # the clump's own alpha: composite each part's alpha the same way
        paste(alpha_img, lab, Layer(np.repeat(layer.alpha[..., None], 3, axis=2), layer.alpha, layer.mask), 1, cx, cy)
        parts.append(s.id)
    alpha = alpha_img[..., 0]
    rgba = np.dstack([img, alpha])
    ys, xs = np.nonzero(lab)
    rgba = rgba[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    dia = float(2 * np.sqrt(np.count_nonzero(lab) / np.pi))
    return np.ascontiguousarray(rgba), parts, dia


@dataclass
class Canvas:
    """An RBC-only canvas: its image (RGB or density), labels, instance ids (k = placed[k - 1]) and plasma."""

    img: np.ndarray
    label: np.ndarray
    inst: np.ndarray  # int32: 1 + index into `placed`
    placed: list[Placed]
    plasma: np.ndarray  # (3,) flat plasma colour, or (size, size, 3) a background field
    density: float  # share of lattice slots holding a cell
    overlap: float  # how far neighbours overlap (fraction of a diameter; < 0: gaps between cells)
    rbc_source: str | None = None  # with canvas.rbc_sources 'per_canvas': the one source of its RBCs


def _draw(rng: np.random.Generator, value) -> float:
    """A number, or uniform in a [low, high] range."""
    return float(rng.uniform(value[0], value[1])) if isinstance(value, (list, tuple)) else float(value)


def pick_plasma(rng: np.random.Generator, look: dict, size: int, backgrounds: list[Sprite]) -> np.ndarray:
    """A canvas's plasma: a background field cut from a real smear (share `look.backgrounds`, when the bank has
    any), else one of the recipe's flat colours; either with a per-canvas tone jitter."""
    tone = (1.0 + rng.normal(0, look["background_tone"], 3)).astype(np.float32)
    # the same draws whichever plasma is chosen, so the cells of a canvas do not depend on it
    u, pick, flip = rng.uniform(), int(rng.integers(1 << 30)), bool(rng.integers(2))
    if backgrounds and look["backgrounds"] > 0 and u < look["backgrounds"]:
        b = backgrounds[pick % len(backgrounds)]
        field_ = cv2.resize(b.rgba[..., :3], (size, size), interpolation=cv2.INTER_LINEAR).astype(np.float32)
        if flip:
            field_ = field_[::-1]
        return np.clip(field_ * tone, 0, 255).astype(np.float32)
    colours = look.get("plasma") or [PLASMA_RGB]
    return np.clip(np.array(colours[pick % len(colours)], np.float32) * tone, 0, 255).astype(np.float32)


def rbc_pools(kind: str, healthy: list[Sprite], infected: list[Sprite], mode: str,
              rng: np.random.Generator) -> tuple[list[Sprite], list[Sprite], str | None]:
    """The RBC sprites a canvas draws from. mode 'any': every source; 'per_canvas': one source per canvas, chosen
    among those that can fill this kind of canvas, so a source with both classes (Kaggle's) shows up on healthy
    canvases as often as any other: its look no longer tells infected from healthy."""
    if mode != "per_canvas":
        return healthy, infected, None
    by_h: dict[str, list[Sprite]] = {}
    by_i: dict[str, list[Sprite]] = {}
    for s in healthy:
        by_h.setdefault(s.source, []).append(s)
    for s in infected:
        by_i.setdefault(s.source, []).append(s)
    if kind == "healthy":
        able = sorted(by_h)
    elif kind == "infected":
        able = sorted(by_i)
    else:
        able = sorted(set(by_h) & set(by_i)) or sorted(set(by_h) | set(by_i))
    if not able:
        return healthy, infected, None
    src = able[int(rng.integers(len(able)))]
    return by_h.get(src, healthy), by_i.get(src, infected), src


def rbc_canvas(rng: np.random.Generator, prep: Prepared, size: int, kind: str, healthy: list[Sprite],
               infected: list[Sprite], recipe: dict, backgrounds: list[Sprite] | None = None,
               thrombocytes: list[Sprite] | None = None) -> Canvas:
    """An RBC canvas: plasma background with RBCs on a jittered hexagonal lattice, and with
    `canvas.platelets_on_rbc` > 0, platelets lying on a share of them."""
    look, cv, sizes = recipe["look"], recipe["canvas"], recipe["sizes"]
    plasma = pick_plasma(rng, look, size, backgrounds or [])
    if prep.additive:
        img = np.zeros((size, size, 3), np.float32)
    elif plasma.ndim == 3:
        img = plasma.copy()
    else:
        img = np.empty((size, size, 3), np.float32)
        img[:] = plasma
    label = np.zeros((size, size), np.uint8)
    inst = np.zeros((size, size), np.int32)
    dens, overlap = _draw(rng, cv["density"]), _draw(rng, cv["overlap"])
    healthy, infected, src = rbc_pools(kind, healthy, infected, cv["rbc_sources"], rng)
    d = nominal_size(sizes, "healthy_rbc")
    step = d * (1.0 - overlap)
    rows = int(size / (step * 0.866)) + 2
    cols = int(size / step) + 2
    gy, gx = np.mgrid[0:rows, 0:cols].astype(np.float32)
    xs = gx * step + (gy % 2) * step / 2 - step / 2
    ys = gy * step * 0.866 - step / 2
    # sparse canvases get looser lattices: cells apart at random, not on a visible grid
    wobble = 0.2 + 0.3 * max(0.0, min(1.0, -overlap / 0.5))
    xs = xs + rng.uniform(-wobble, wobble, xs.shape) * step
    ys = ys + rng.uniform(-wobble, wobble, ys.shape) * step
    keep = rng.uniform(0, 1, xs.shape) < dens
    pts = np.stack([xs[keep], ys[keep]], axis=1)
    pts = pts[rng.permutation(len(pts))]
    if kind == "healthy" or not infected:
        is_inf = np.zeros(len(pts), bool)
    elif kind == "infected" or not healthy:
        is_inf = np.ones(len(pts), bool)
    else:
        is_inf = rng.uniform(0, 1, len(pts)) < _draw(rng, cv["infected_share"])
    # Each canvas draws a set of transformed RBC variants once and pastes them many times:
    # transforming is most of a paste's cost, and a field of RBCs repeats shapes anyway.
    variants = {}
    for inf, pool in ((False, healthy), (True, infected)):
        if not pool or (inf and not is_inf.any()) or (not inf and is_inf.all()):
            continue
        k = max(1, min(int(cv["variants"]), len(pts)))
        variants[inf] = [_variant(rng, prep, pool[int(rng.integers(len(pool)))], sizes, look) for _ in range(k)]
    pick = rng.integers(0, 1 << 30, len(pts))
    placed: list[Placed] = []
    for (x, y), inf, j in zip(pts, is_inf, pick):
        vs = variants[bool(inf)]
        s, layer, angle, flip, scale = vs[j % len(vs)]
        bbox = paste(img, label, layer, index_of(s.cls), float(x), float(y), inst, len(placed) + 1, prep.additive)
        if bbox is not None:
            placed.append(Placed(s.cls, s.id, s.source, (float(x), float(y)), bbox, angle, flip, scale))
    if cv["platelets_on_rbc"] > 0 and thrombocytes and placed:
        # In real smears platelets often lie on red cells: a small purple body inside a red cell that is not a
        # parasite. Without such cells in the scenes, "a dark dot inside a red cell" means "infected".
        rbcs = placed[:]
        on = np.flatnonzero(rng.uniform(0, 1, len(rbcs)) < cv["platelets_on_rbc"])
        for k in on:
            cx, cy = rbcs[k].centre
            r, t = 0.3 * d * np.sqrt(rng.uniform()), rng.uniform(0, 2 * np.pi)
            s = thrombocytes[int(rng.integers(len(thrombocytes)))]
            p = place_sprite(img, label, rng, prep, s, sizes, look, float(cx + r * np.cos(t)),
                             float(cy + r * np.sin(t)), inst, len(placed) + 1)
            if p is not None:
                placed.append(p)
    return Canvas(img, label, inst, placed, plasma, dens, overlap, src)


def _variant(rng: np.random.Generator, prep: Prepared, s: Sprite, sizes: dict, look: dict):
    pm, d0 = prep.get(s, nominal_size(sizes, s.cls))
    scale = draw_size(rng, sizes, s.cls) / d0
    angle, flip = float(rng.uniform(0, 360)), bool(rng.integers(2))
    layer = transform(pm, scale, angle, flip, jitter_gains(rng, look["stain_jitter"]))
    stain, texture = look.get("rbc_stain", 0.0), look.get("rbc_texture", 0.0)
    if stain > 0 or texture > 0:
        layer = cell_look(layer, rng, stain, texture, prep.additive)
    return s, layer, angle, flip, scale * d0 / s.diameter


def to_colour(img: np.ndarray, plasma: np.ndarray) -> np.ndarray:
    """Optical density (h, w, 3) seen against the plasma ((3,) or (h, w, 3)) -> float32 RGB 0..255."""
    out = cv2.exp(-img)
    if plasma.ndim == 1:
        return cv2.multiply(out, cv2.merge([np.full(out.shape[:2], float(v), np.float32) for v in plasma]))
    return cv2.multiply(out, plasma)


def optics_on(optics: dict) -> bool:
    """Whether a recipe's look.optics changes anything."""
    return any(optics[k][1] > 0 for k in ("defocus", "chromatic", "vignetting", "read_noise", "shot_noise")) \
        or optics["jpeg_p"] > 0


def finish_look(img: np.ndarray, rng: np.random.Generator, look: dict) -> np.ndarray:
    """Illumination gradient, blur, noise and the optics of a microscope and camera (look.optics: defocus,
    chromatic offset, vignetting, sensor noise, JPEG) on a composed float RGB image; returns uint8 RGB."""
    h, w = img.shape[:2]
    if look["illumination"] > 0:
        gx, gy = rng.normal(0, look["illumination"], 2)
        ramp = 1.0 + (np.linspace(-0.5, 0.5, w, dtype=np.float32)[None, :] * np.float32(gx)
                      + np.linspace(-0.5, 0.5, h, dtype=np.float32)[:, None] * np.float32(gy))
        img = cv2.multiply(img, cv2.merge([ramp, ramp, ramp]))  # no numpy broadcasting: 10x faster
    lo, hi = look["blur"]
    sigma = float(rng.uniform(lo, hi)) if hi > 0 else 0.0
    if sigma > 0.15:
        img = cv2.GaussianBlur(img, (0, 0), sigma)
    if look["noise"] > 0:
        tile = noise_tile(look["noise"])
        if tile.shape[0] >= max(h, w):
            y, x = (int(v) for v in rng.integers(0, tile.shape[0] - max(h, w) + 1, 2))
            img = cv2.add(img, tile[y:y + h, x:x + w])
        else:
            img = img + rng.standard_normal(img.shape, dtype=np.float32) * np.float32(look["noise"])
    if optics_on(look["optics"]):
        img = apply_optics(img, rng, look["optics"])
    np.clip(img, 0, 255, out=img)
    img += 0.5
    return img.astype(np.uint8)


_NOISE: dict[float, np.ndarray] = {}


def noise_tile(std: float, size: int = 640) -> np.ndarray:
    """A fixed field of Gaussian noise; scenes take random windows of it (drawing fresh noise costs more
    than the rest of the finishing). Fixed seed, so every worker holds the same field."""
    t = _NOISE.get(std)
    if t is None:
        t = _NOISE[std] = np.random.default_rng(12345).standard_normal((size, size, 3), dtype=np.float32) * np.float32(std)
    return t
