"""Recipes: YAML that decides what a composed dataset holds; validated against one schema."""
from __future__ import annotations

import copy
import math
import re
from pathlib import Path
from typing import Any

import yaml

from bloodcells.classes import BY_NAME, NAMES
from bloodcells.errors import BloodcellsError

from .optics import resolve_optics

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"
OBJECT_CLASSES = ("eosinophil", "basophil", "neutrophil", "lymphocyte", "monocyte", "thrombocyte", "platelet_clump")
KINDS = ("healthy", "infected", "mixed")
# a recipe's name is the default output folder (data/<name>): a plain file name, never a path
SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}")

DEFAULTS: dict[str, Any] = {
    "name": "custom",
    "seed": 0,
    "scene_size": 224,
    "scenes": {"train": 1000, "val": 100, "test": 100},
    "canvas": {
        "size": 1000,  # RBC-only canvases, as in the original procedure
        "windows": 16,  # scene windows cropped from each canvas
        "kinds": {"healthy": 1.0, "infected": 1.0, "mixed": 1.0},
        "infected_share": 0.3,  # share of infected RBCs on a mixed canvas (parasitemia); [low, high]: drawn per canvas
        "density": 0.8,  # chance that each slot of the RBC lattice holds a cell; [low, high]: drawn per canvas
        "overlap": 0.1,  # how far neighbouring RBCs overlap (fraction of a diameter; < 0 leaves gaps); or [low, high]
        "variants": 64,  # transformed RBC looks drawn per canvas (each pasted many times)
        "rbc_sources": "any",  # any | per_canvas: all RBCs of a canvas from one source (balances each source's classes)
        "platelets_on_rbc": 0.0,  # share of red cells with a platelet lying on them (labelled thrombocyte)
    },
    "objects": {
        "coverage": "pairs",  # none | singles | pairs: each (type or pair) x background kind appears
        "count": [1, 3],  # further random objects per scene (inclusive range)
        "weights": {c: 1.0 for c in OBJECT_CLASSES},
        # any: each sprite of a class equally likely | balanced: first a source of the class, then one of its sprites,
        # so a source that gives many cells of one type (and few of another) does not make its look stand for that type
        "sources": "any",
    },
    "sizes": {"jitter": 0.08, **{c: BY_NAME[c].diameter_40x for c in NAMES[1:]}},
    "clumps": {"min": 3, "max": 10},
    "look": {
        "blend": "optical_density",  # optical_density (Beer-Lambert: overlaps absorb more) | alpha (top cell covers)
        "backgrounds": 0.0,  # share of canvases on a plasma field cut from a real smear (when the bank has some)
        "faint": 0.0,  # share of thrombocytes that took up little stain (drawn fainter; labels unchanged)
        "soft_edge": 0.8,  # feather of sprite edges in px (the label stays exact)
        "stain_jitter": 0.05,  # per-sprite brightness/saturation/hue jitter
        # each white cell's and platelet's own stain (HED concentrations x U(1 - s, 1 + s)) and texture (blur up to
        # 1.5 t px or sharpen up to 2 t): a source's look then does not stand for a cell type; 0: off
        "cell_stain": 0.0,
        "cell_texture": 0.0,
        "cell_hue": 0.0,  # and its colours turned about the grey axis by up to this many degrees; 0: off
        # the same for every red cell look a canvas draws (healthy and infected alike): a source's look then does not
        # stand for "infected"; 0: off
        "rbc_stain": 0.0,
        "rbc_texture": 0.0,
        "plasma": [[236, 222, 210]],  # plasma (background) colours; each canvas picks one
        "background_tone": 0.04,  # per-canvas plasma colour variation
        "illumination": 0.08,  # strength of a smooth illumination gradient
        "blur": [0.0, 0.6],  # Gaussian blur sigma range (px)
        "noise": 2.0,  # Gaussian pixel noise, std in grey levels
        # a microscope's and camera's optics (composer/optics.py); all zero: off
        "optics": {"defocus": [0.0, 0.0], "chromatic": [0.0, 0.0], "vignetting": [0.0, 0.0], "vignetting_offset": 0.3,
                   "read_noise": [0.0, 0.0], "shot_noise": [0.0, 0.0], "jpeg": [75, 95], "jpeg_p": 0.0},
    },
    "builtin_per_class": 24,  # sprites per class when no bank is given (the built-in default)
}


SIGNED = {"canvas.overlap"}  # keys that may be negative
AT_MOST_ONE = {"canvas.infected_share"}  # ranges of shares
RANGE_OR_NUMBER = {"canvas.density", "canvas.overlap", "canvas.infected_share", *(f"sizes.{c}" for c in NAMES[1:])}  # a number or [low, high]
CHOICES = {"look.blend": ("optical_density", "alpha"), "canvas.rbc_sources": ("any", "per_canvas"),
           "objects.coverage": ("none", "singles", "pairs"), "objects.sources": ("any", "balanced")}
SHARES = {"look.backgrounds", "look.faint", "canvas.platelets_on_rbc"}  # 0..1


def _number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check(user: dict, ref: dict, path: str, where: str) -> None:
    for k, v in user.items():
        if k not in ref:
            raise BloodcellsError(f"{where}: unknown key '{path}{k}'; allowed here: {', '.join(map(str, ref))}")
        r = ref[k]
        key = f"{path}{k}"
        if key in CHOICES:
            if v not in CHOICES[key]:
                raise BloodcellsError(f"{where}: '{key}' must be one of {', '.join(CHOICES[key])}; got {v!r}")
            continue
        if key in RANGE_OR_NUMBER:
            low = -0.9 if key in SIGNED else 0
            ok = (_number(v) and v >= low) or (isinstance(v, list) and len(v) == 2 and all(_number(x) for x in v)
                                               and low <= v[0] <= v[1])
            if key in AT_MOST_ONE and ok and max(v if isinstance(v, list) else [v]) > 1:
                raise BloodcellsError(f"{where}: '{key}' is a share: a number or a range [low, high] between 0 and 1; "
                                      f"got {v!r}")
            if not ok or (key.startswith("sizes.") and min(v if isinstance(v, list) else [v]) <= 0):
                raise BloodcellsError(f"{where}: '{key}' must be a number or a range [low, high] "
                                      f"({'>= ' + str(low) if key in SIGNED else '> 0' if key.startswith('sizes.') else '>= 0'}), "
                                      f"e.g. {r}; got {v!r}")
            continue
        if key in SHARES:
            if not (_number(v) and 0 <= v <= 1):
                raise BloodcellsError(f"{where}: '{key}' must be a share between 0 and 1; got {v!r}")
            continue
        if isinstance(r, dict) and k != "weights":
            if not isinstance(v, dict):
                raise BloodcellsError(f"{where}: '{path}{k}' must be a mapping like {_brief(r)}")
            _check(v, r, f"{path}{k}.", where)
        elif isinstance(r, list) and k == "plasma":
            continue  # checked in validate
        elif isinstance(r, list):
            if not (isinstance(v, list) and len(v) == 2 and all(isinstance(x, (int, float)) for x in v) and v[0] <= v[1]):
                raise BloodcellsError(f"{where}: '{path}{k}' must be [low, high], e.g. {r}")
        elif isinstance(r, (int, float)) and not isinstance(r, bool):
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0:
                raise BloodcellsError(f"{where}: '{path}{k}' must be a number >= 0, got {v!r}")


def _first_non_finite(value: Any, path: str = "") -> tuple[str, float] | None:
    """(key path, value) of the first NaN or infinite number anywhere in a recipe (YAML .nan / .inf), else None."""
    if isinstance(value, float) and not math.isfinite(value):
        return path.rstrip("."), value
    if isinstance(value, dict):
        items = ((f"{path}{k}.", v) for k, v in value.items())
    elif isinstance(value, list):
        items = ((f"{path.rstrip('.')}[{i}].", v) for i, v in enumerate(value))
    else:
        return None
    for sub, v in items:
        found = _first_non_finite(v, sub)
        if found is not None:
            return found
    return None


def _brief(d: dict) -> str:
    return "{" + ", ".join(f"{k}: ..." for k in list(d)[:3]) + "}"


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "weights" else v
    return out


def resolve_path(name: str | Path) -> Path:
    """A recipe file, or a bare name found in recipes/ (with or without .yaml)."""
    p = Path(name)
    if p.is_file():
        return p
    for cand in (RECIPES_DIR / p.name, RECIPES_DIR / f"{p.name}.yaml"):
        if cand.is_file():
            return cand
    known = ", ".join(sorted(f.name for f in RECIPES_DIR.glob("*.yaml")))
    raise BloodcellsError(f"{name}: no such recipe; give a YAML path or one of: {known}")


def _read_user(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """A recipe file's keys, on top of those of its `base:` recipe (recursively)."""
    if path.resolve() in seen:
        raise BloodcellsError(f"{path}: 'base:' recipes form a cycle ({' -> '.join(p.name for p in seen)} -> "
                              f"{path.name}); remove one of the base: lines")
    try:
        user = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise BloodcellsError(f"{path}: not valid YAML{at} ({getattr(e, 'problem', e)}); fix the syntax") from None
    if user is None or user == {}:
        raise BloodcellsError(f"{path}: the recipe is empty; give at least its scenes (e.g. scenes: {{train: 100, "
                              "val: 10, test: 10}), or start from one in recipes/ such as tiny.yaml")
    if not isinstance(user, dict):
        raise BloodcellsError(f"{path}: a recipe must be a mapping of keys (seed:, scenes:, ...)")
    base = user.pop("base", None)
    if base is None:
        return user
    if not isinstance(base, str):
        raise BloodcellsError(f"{path}: 'base' must name a recipe (a YAML path or a name in recipes/), got {base!r}")
    beside = path.parent / base  # a relative path is read from the recipe's own folder first
    inherited = _read_user(beside if beside.is_file() else resolve_path(base), seen + (path.resolve(),))
    inherited.pop("name", None)  # a recipe's name is its own (or its file's)
    return _merge(inherited, user)


def load_recipe(name: str | Path, overrides: dict | None = None) -> dict:
    """Read, validate and resolve a recipe against the defaults (and its `base:` recipe, if it names one)."""
    path = resolve_path(name)
    return validate(_merge(_read_user(path), overrides or {}), str(path), stem=path.stem)


def validate(user: dict, where: str = "recipe", stem: str = "custom") -> dict:
    bad = _first_non_finite(user)
    if bad is not None:
        raise BloodcellsError(f"{where}: '{bad[0]}' is {bad[1]}; every number in a recipe must be finite")
    _check(user, DEFAULTS, "", where)
    r = _merge(DEFAULTS, user)
    if user.get("name") is None:  # named after the file, made a plain folder name
        r["name"] = re.sub(r"[^A-Za-z0-9_.-]", "_", stem).lstrip(".") or "custom"
    elif not isinstance(r["name"], str) or not SAFE_NAME.fullmatch(r["name"]):
        raise BloodcellsError(f"{where}: name {r['name']!r} must be a plain folder name (letters, digits, '_', '.', "
                              "'-'; no '/'), since it names the default output folder data/<name>; e.g. name: my-set")
    w = r["objects"]["weights"]
    if not isinstance(w, dict):
        raise BloodcellsError(f"{where}: 'objects.weights' must map class names to numbers")
    for k, v in w.items():
        if k not in OBJECT_CLASSES:
            raise BloodcellsError(f"{where}: unknown class '{k}' in objects.weights; use: {', '.join(OBJECT_CLASSES)}")
        if not isinstance(v, (int, float)) or v < 0:
            raise BloodcellsError(f"{where}: objects.weights.{k} must be a number >= 0")
    r["objects"]["weights"] = {c: float(w.get(c, 0.0)) for c in OBJECT_CLASSES}
    for s, n in r["scenes"].items():
        if s not in ("train", "val", "test") or not isinstance(n, int) or n < 0:
            raise BloodcellsError(f"{where}: scenes.{s} must be a whole number >= 0 for train, val or test")
    if sum(r["canvas"]["kinds"].values()) <= 0:
        raise BloodcellsError(f"{where}: canvas.kinds needs at least one positive share")
    if r["scene_size"] < 32 or r["canvas"]["size"] < r["scene_size"]:
        raise BloodcellsError(f"{where}: need 32 <= scene_size <= canvas.size")
    if not 1 <= r["clumps"]["min"] <= r["clumps"]["max"]:
        raise BloodcellsError(f"{where}: clumps needs 1 <= min <= max")
    pl = r["look"]["plasma"]
    if not (isinstance(pl, list) and pl and all(isinstance(c, list) and len(c) == 3 and
                                                all(isinstance(v, (int, float)) and 0 <= v <= 255 for v in c) for c in pl)):
        raise BloodcellsError(f"{where}: look.plasma must be a list of RGB colours, e.g. [[236, 222, 210], [205, 206, 202]]")
    for who in ("cell", "rbc"):
        if not r["look"][f"{who}_stain"] < 1:
            raise BloodcellsError(f"{where}: look.{who}_stain must be >= 0 and below 1 (0.25: strong); "
                                  f"got {r['look'][f'{who}_stain']!r}")
        if not r["look"][f"{who}_texture"] <= 4:
            raise BloodcellsError(f"{where}: look.{who}_texture must be between 0 and 4 (1: blur up to 1.5 px or "
                                  f"sharpen up to 2x); got {r['look'][f'{who}_texture']!r}")
    if not r["look"]["cell_hue"] <= 180:
        raise BloodcellsError(f"{where}: look.cell_hue must be between 0 and 180 degrees (30: a lab's stain to "
                              f"another's); got {r['look']['cell_hue']!r}")
    r["look"]["optics"] = resolve_optics(r["look"]["optics"], f"{where}: look.optics")
    if not isinstance(r["seed"], int):
        raise BloodcellsError(f"{where}: seed must be a whole number")
    r["canvas"]["windows"] = max(1, int(r["canvas"]["windows"]))
    r["objects"]["count"] = [int(x) for x in r["objects"]["count"]]
    return r
