"""Compose a dataset from a recipe: plan, render scenes in workers, write files, finalise stats.

Every scene depends only on (recipe, seed, split, index) and the split's sprites, so the
files are byte-identical for any number of workers and any sharding. A scene is done when
its annotation JSON exists (written last, atomically): an interrupted run resumes there.
"""
from __future__ import annotations

import fnmatch
import hashlib
import itertools
import json
import multiprocessing as mp
import platform
from collections import Counter
from dataclasses import dataclass
from typing import Sequence
from pathlib import Path

import cv2
import numpy as np
from scipy import ndimage
from tqdm import tqdm

import bloodcells
from bloodcells.classes import NAMES, NUM_CLASSES, index_of
from bloodcells.errors import BloodcellsError, check_out_folder, disk_errors
from bloodcells.formats import (DATASET_FILE, DATASET_FORMAT, SPLIT_ID, SPLITS, DatasetInfo, median_frequency_weights,
                                read_json, scene_id, scene_paths, write_json)
from bloodcells.imageio import encode_png, write_bytes_atomic

from .licence import BUILTIN_LICENCE, UNKNOWN
from .recipe import KINDS, OBJECT_CLASSES
from .scene import (Canvas, Placed, Prepared, build_clump, draw_size, feather, finish_look, jitter_gains, paste,
                    place_sprite, rbc_canvas, to_colour, transform)
from .sprite import Sprite


@dataclass(frozen=True)
class ScenePlan:
    index: int
    canvas: int
    kind: str
    required: tuple[str, ...]


def required_combos(recipe: dict) -> list[tuple[str, ...]]:
    """Every single object class, and with coverage 'pairs' every pair, of those with weight > 0."""
    cov = recipe["objects"]["coverage"]
    active = [c for c in OBJECT_CLASSES if recipe["objects"]["weights"][c] > 0]
    if cov == "none":
        return []
    combos = [(c,) for c in active]
    if cov == "pairs":
        combos += list(itertools.combinations(active, 2))
    return combos


def plan_split(recipe: dict, split: str) -> list[ScenePlan]:
    """Which canvas, background kind and required object combination each scene gets."""
    n = recipe["scenes"].get(split, 0)
    if n == 0:
        return []
    win = recipe["canvas"]["windows"]
    n_canvas = -(-n // win)
    weights = recipe["canvas"]["kinds"]
    active = [k for k in KINDS if weights.get(k, 0) > 0]
    combos = required_combos(recipe)
    need = -(-len(combos) // win)  # canvases per kind that cover every combination once
    rng = np.random.default_rng([recipe["seed"], SPLIT_ID[split], 0])
    p = np.array([weights[k] for k in active], float)
    kinds = [active[c % len(active)] if c < need * len(active) else active[rng.choice(len(active), p=p / p.sum())]
             for c in range(n_canvas)]
    seen = {k: 0 for k in active}
    plans = []
    for i in range(n):
        c = i // win
        k = kinds[c]
        j = seen[k]
        seen[k] += 1
        plans.append(ScenePlan(i, c, k, combos[j] if j < len(combos) else ()))
    return plans


def _as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def check_pools(recipe: dict, pools: dict[str, dict[str, list[Sprite]]], bank_name: str) -> None:
    """Every class the recipe needs must have sprites in every split that has scenes."""
    weights = recipe["objects"]["weights"]
    kinds = recipe["canvas"]["kinds"]
    need = set()
    if kinds.get("healthy", 0) > 0 or kinds.get("mixed", 0) > 0:
        need.add("healthy_rbc")
    if kinds.get("infected", 0) > 0 or (kinds.get("mixed", 0) > 0 and max(_as_list(recipe["canvas"]["infected_share"])) > 0):
        need.add("infected_rbc")
    need |= {c for c in OBJECT_CLASSES if weights[c] > 0 and c != "platelet_clump"}
    if weights["platelet_clump"] > 0 or recipe["canvas"]["platelets_on_rbc"] > 0:
        need.add("thrombocyte")
    for split, n in recipe["scenes"].items():
        if n == 0:
            continue
        for cls in sorted(need, key=NAMES.index):
            if not pools.get(split, {}).get(cls):
                fix = f"set objects.weights.{cls}: 0 in the recipe" if cls in OBJECT_CLASSES else \
                    "change canvas.kinds in the recipe"
                raise BloodcellsError(f"{bank_name}: split '{split}' has no {cls} sprites; import some "
                                      f"('cli sprites import ...') or {fix}")


class Composer:
    """Renders scenes of one split; keeps the last canvas and resized sprites between scenes."""

    def __init__(self, recipe: dict, split: str, pools: dict[str, list[Sprite]]):
        self.r, self.split, self.pools = recipe, split, pools
        self.prep = Prepared(recipe["look"]["soft_edge"], recipe["look"]["blend"])
        self._canvas: tuple[int, tuple[Canvas, np.ndarray]] | None = None
        self.plans = plan_split(recipe, split)
        # objects.sources 'balanced': each class's sprites by source (sources in name order, so the draw is reproducible)
        self._by_source: dict[str, list[list[Sprite]]] = {}
        if recipe["objects"]["sources"] == "balanced":
            for cls, pool in pools.items():
                groups: dict[str, list[Sprite]] = {}
                for s in pool:
                    groups.setdefault(s.source, []).append(s)
                self._by_source[cls] = [groups[k] for k in sorted(groups)]

    def canvas(self, plan: ScenePlan) -> tuple[Canvas, np.ndarray]:
        """The plan's RBC canvas (built once for all its windows) and its objects' boxes."""
        if self._canvas is None or self._canvas[0] != plan.canvas:
            rng = np.random.default_rng([self.r["seed"], SPLIT_ID[self.split], 1, plan.canvas])
            c = rbc_canvas(rng, self.prep, self.r["canvas"]["size"], plan.kind, self.pools.get("healthy_rbc", []),
                           self.pools.get("infected_rbc", []), self.r, self.pools.get("background", []),
                           self.pools.get("thrombocyte", []))
            boxes = np.array([p.bbox for p in c.placed], np.int64).reshape(-1, 4)
            self._canvas = (plan.canvas, (c, boxes))
        return self._canvas[1]

    def scene(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
        """(RGB uint8, label uint8, instances uint16, annotation dict) of one scene."""
        plan = self.plans[index]
        c, boxes = self.canvas(plan)
        r, S = self.r, self.r["scene_size"]
        rng = np.random.default_rng([r["seed"], SPLIT_ID[self.split], 2, index])
        size = c.img.shape[0]
        x0, y0 = (int(v) for v in rng.integers(0, size - S + 1, 2))
        win = (slice(y0, y0 + S), slice(x0, x0 + S))
        img, label, inst = c.img[win].copy(), c.label[win].copy(), c.inst[win].copy()
        # canvas object k keeps id k + 1 until the end; pasted objects take ids after the canvas's
        objects: dict[int, Placed] = {k + 1: self._shift(c.placed[k], x0, y0) for k in np.flatnonzero(
            (boxes[:, 0] < x0 + S) & (boxes[:, 2] > x0) & (boxes[:, 1] < y0 + S) & (boxes[:, 3] > y0))}
        next_id = len(c.placed) + 1
        lo, hi = r["objects"]["count"]
        w = r["objects"]["weights"]
        classes = list(plan.required)
        extra = int(rng.integers(lo, hi + 1))
        p = np.array([w[c_] for c_ in OBJECT_CLASSES])
        if extra and p.sum() > 0:
            classes += [OBJECT_CLASSES[i] for i in rng.choice(len(OBJECT_CLASSES), size=extra, p=p / p.sum())]
        rng.shuffle(classes)
        for cls in classes:
            cx, cy = rng.uniform(0, S, 2)
            placed = self._object(cls, rng, img, label, inst, next_id, float(cx), float(cy))
            if placed is not None:
                objects[next_id] = placed
                next_id += 1
        if self.prep.additive:
            img = to_colour(img, c.plasma[win] if c.plasma.ndim == 3 else c.plasma)
        out = finish_look(img, rng, r["look"])
        final, listed = number_instances(inst, objects, next_id)
        ann = {"id": scene_id(index), "split": self.split, "kind": plan.kind, "canvas": plan.canvas,
               "window": [x0, y0], "required": list(plan.required), "rbc_density": round(c.density, 3),
               "rbc_overlap": round(c.overlap, 3), "objects": listed}
        if c.rbc_source is not None:
            ann["rbc_source"] = c.rbc_source
        return out, label, final, ann

    @staticmethod
    def _shift(p: Placed, x0: int, y0: int) -> Placed:
        return Placed(p.cls, p.sprite, p.source, (p.centre[0] - x0, p.centre[1] - y0), p.bbox, p.rotation, p.flip,
                      p.scale)

    def _object(self, cls: str, rng, img, label, inst, inst_id: int, cx: float, cy: float) -> Placed | None:
        r, sizes, look = self.r, self.r["sizes"], self.r["look"]
        if cls != "platelet_clump":
            pool = self.pools[cls]
            if cls in self._by_source:  # a source first, then one of its sprites
                pool = self._by_source[cls][int(rng.integers(len(self._by_source[cls])))]
            s = pool[int(rng.integers(len(pool)))]
            return place_sprite(img, label, rng, self.prep, s, sizes, look, cx, cy, inst, inst_id)
        n = int(rng.integers(r["clumps"]["min"], r["clumps"]["max"] + 1))
        d = draw_size(rng, sizes, "platelet_clump")
        pm, parts, d0 = build_clump(rng, self.prep, self.pools["thrombocyte"], n, d * min(1.0, 0.45 + 0.08 * n),
                                    sizes, look)
        angle, flip = float(rng.uniform(0, 360)), bool(rng.integers(2))
        layer = transform(feather(pm, look["soft_edge"]), 1.0, angle, flip, jitter_gains(rng, look["stain_jitter"] * 0.5))
        bbox = paste(img, label, layer, index_of("platelet_clump"), cx, cy, inst, inst_id, self.prep.additive)
        if bbox is None:
            return None
        return Placed("platelet_clump", "clump-" + hashlib.sha1("".join(parts).encode()).hexdigest()[:12], "built",
                      (cx, cy), bbox, angle, flip, 1.0, parts=parts)


def number_instances(inst: np.ndarray, objects: dict[int, Placed], next_id: int) -> tuple[np.ndarray, list[dict]]:
    """Renumber the visible objects 1..n in id order (canvas RBCs first, then pasted objects in paste order):
    (uint16 instance map, annotation objects with their instance number, visible pixel count and visible bbox).
    Objects fully hidden by later ones are dropped."""
    counts = np.bincount(inst.ravel(), minlength=next_id)
    ids = np.flatnonzero(counts[1:]) + 1
    if len(ids) > np.iinfo(np.uint16).max:
        raise BloodcellsError(f"a scene holds {len(ids)} cells, more than a 16-bit instance map can number; "
                              "lower canvas.density or raise canvas.overlap in the recipe")
    lut = np.zeros(len(counts), np.uint16)
    lut[ids] = np.arange(1, len(ids) + 1, dtype=np.uint16)
    final = lut[inst]
    listed = []
    for k, sl in enumerate(ndimage.find_objects(final), start=1):
        o = objects[int(ids[k - 1])].to_json()
        o["bbox"] = [sl[1].start, sl[0].start, sl[1].stop, sl[0].stop]
        o["instance"] = k
        o["pixels"] = int(counts[ids[k - 1]])
        listed.append(o)
    return final, listed


# ---- writing -------------------------------------------------------------------------

_LEVELS = np.arange(256, dtype=np.int64)


def scene_stats(img: np.ndarray, label: np.ndarray) -> dict:
    """What dataset.json aggregates: class pixel counts and exact per-channel sums of values and squares."""
    hist = np.stack([np.bincount(img[..., c].ravel(), minlength=256) for c in range(3)]).astype(np.int64)
    return {"pixels": np.bincount(label.ravel(), minlength=NUM_CLASSES).tolist(),
            "sum": (hist @ _LEVELS).tolist(), "sumsq": (hist @ (_LEVELS * _LEVELS)).tolist()}


def write_scene_file(path: Path, data: bytes) -> None:
    """Write one of a scene's image files in place (making its folder on the first write into it)."""
    with disk_errors(path):
        try:
            f = open(path, "wb")
        except FileNotFoundError:
            path.parent.mkdir(parents=True, exist_ok=True)
            f = open(path, "wb")
        with f:
            f.write(data)


def encode_scene(img: np.ndarray, label: np.ndarray, inst: np.ndarray) -> tuple[bytes, bytes, bytes]:
    """PNG bytes of a scene's image, label map and instance map, with the fastest settings for each kind."""
    return (encode_png(img, level=1, png_filter="sub", strategy="rle"),
            encode_png(label, level=1, png_filter="none", strategy="rle"),
            encode_png(inst, level=1, png_filter="none"))


_STATE: dict = {}


def _init(out: str, recipe: dict, pools: dict) -> None:
    cv2.setNumThreads(1)
    _STATE.update(out=Path(out), recipe=recipe, pools=pools, composers={})


def _render_block(task: tuple[str, list[int]]) -> int:
    split, indices = task
    comp = _STATE["composers"].get(split)
    if comp is None:
        comp = _STATE["composers"][split] = Composer(_STATE["recipe"], split, _STATE["pools"][split])
    for i in indices:
        img, label, inst, ann = comp.scene(i)
        ann.update(scene_stats(img, label))
        paths = scene_paths(_STATE["out"], split, ann["id"])
        # only the annotation, written last, says a scene is done: the other files need no rename of their own
        # (a scene cut short has no annotation and is rendered and written again)
        for path, data in zip((paths.image, paths.label, paths.instances), encode_scene(img, label, inst)):
            write_scene_file(path, data)
        write_bytes_atomic(paths.annotation, (json.dumps(ann, separators=(",", ":")) + "\n").encode())
    return len(indices)


def parse_shard(text: str | None) -> tuple[int, int]:
    if not text:
        return 0, 1
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        i, n = -1, 0
    if n < 1 or not 0 <= i < n:
        raise BloodcellsError(f"--shard '{text}': expected i/n with 0 <= i < n, e.g. --shard 0/4")
    return i, n


def compose(recipe: dict, pools: dict[str, dict[str, list[Sprite]]], out: Path, sprites_info: dict,
            workers: int = 1, shard: tuple[int, int] = (0, 1), progress: bool = True) -> dict:
    """Render every missing scene of this shard; write dataset.json once all scenes exist."""
    out = check_out_folder(out)
    check_pools(recipe, pools, sprites_info.get("bank", "sprites"))
    _guard_same_recipe(out, recipe, sprites_info)
    win = recipe["canvas"]["windows"]
    tasks, total, skipped = [], 0, 0
    for split in SPLITS:
        n = recipe["scenes"].get(split, 0)
        # shards own whole canvases (blocks of `windows` scenes) so each canvas is built once
        for c in range(-(-n // win)):
            if c % shard[1] != shard[0]:
                continue
            block = [i for i in range(c * win, min(n, (c + 1) * win))]
            total += len(block)
            todo = [i for i in block if not scene_paths(out, split, scene_id(i)).annotation.exists()]
            skipped += len(block) - len(todo)
            if todo:
                tasks.append((split, todo))
    done = 0
    if tasks:
        if workers > 1 and len(tasks) > 1:
            ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
            with ctx.Pool(workers, initializer=_init, initargs=(str(out), recipe, pools)) as pool:
                with tqdm(total=total - skipped, desc="compose", unit="scene", disable=not progress) as bar:
                    for k in pool.imap_unordered(_render_block, tasks):
                        done += k
                        bar.update(k)
        else:
            _init(str(out), recipe, pools)
            with tqdm(total=total - skipped, desc="compose", unit="scene", disable=not progress) as bar:
                for t in tasks:
                    k = _render_block(t)
                    done += k
                    bar.update(k)
    summary = {"rendered": done, "resumed_from": skipped, "shard": f"{shard[0]}/{shard[1]}", "complete": False}
    if all(scene_paths(out, s, scene_id(i)).annotation.exists() for s in SPLITS for i in range(recipe["scenes"].get(s, 0))):
        summary["dataset"] = finalise(out, recipe, sprites_info)
        summary["complete"] = True
    return summary


def _holds_scenes(out: Path) -> bool:
    """Whether a folder already holds a dataset.json or any scene file."""
    if (out / DATASET_FILE).exists():
        return True
    return any(next((out / split / sub).glob("*"), None) is not None
               for split in SPLITS for sub in ("annotations", "images", "labels", "instances"))


def _guard_same_recipe(out: Path, recipe: dict, sprites_info: dict) -> None:
    """Resuming into a folder made from another recipe or bank would mix datasets: refuse.

    The record of what made a folder's scenes (.compose.json) is written before the first scene; scenes
    without it (copied, or the record deleted) cannot be checked, so they are refused too rather than
    counted as done."""
    marker = out / ".compose.json"
    mine = {"recipe": recipe, "sprites": sprites_info.get("id")}
    if marker.exists():
        try:
            theirs = json.loads(marker.read_text())
        except json.JSONDecodeError:
            theirs = None
        if theirs != json.loads(json.dumps(mine)):
            raise BloodcellsError(f"{out}: already holds scenes from another recipe, seed or sprite bank; "
                                  "choose a new --out or delete that folder")
    elif _holds_scenes(out):
        raise BloodcellsError(f"{out}: holds scenes but no record of the recipe, seed and sprites that made them "
                              f"({marker.name}); compose into a new --out, or delete that folder")
    else:
        write_json(marker, mine)


def finalise(out: Path, recipe: dict, sprites_info: dict) -> dict:
    """Aggregate every scene's stats into dataset.json."""
    counts, pixels = {}, {}
    s1, s2, npx = np.zeros(3, np.int64), np.zeros(3, np.int64), 0
    objects, per_scene = {}, {}
    for split in SPLITS:
        n = recipe["scenes"].get(split, 0)
        counts[split] = n
        px = np.zeros(NUM_CLASSES, np.int64)
        oc = np.zeros(NUM_CLASSES, np.int64)
        n_inst = np.zeros(n, np.int64)
        for i in range(n):
            ann = json.loads(scene_paths(out, split, scene_id(i)).annotation.read_text())
            px += np.array(ann["pixels"], np.int64)
            n_inst[i] = len(ann["objects"])
            for o in ann["objects"]:
                oc[NAMES.index(o["class"])] += 1
        if n:
            per_scene[split] = {"mean": round(float(n_inst.mean()), 2), "min": int(n_inst.min()),
                                "max": int(n_inst.max())}
            if split == "train":
                s1 += np.array(ann["sum"], np.int64)
                s2 += np.array(ann["sumsq"], np.int64)
        pixels[split] = px.tolist()
        objects[split] = oc.tolist()
        if split == "train":
            npx = int(px.sum())
    ref = "train" if counts["train"] else max(counts, key=counts.get)
    freq = np.array(pixels[ref], float) / max(1, sum(pixels[ref]))
    if npx == 0:  # no train split: fall back to all scenes' look
        npx = 1
    mean = s1 / npx / 255.0
    std = np.sqrt(np.maximum(s2 / npx / 255.0 ** 2 - mean ** 2, 1e-12))
    info = DatasetInfo(
        root=out, name=recipe["name"], seed=recipe["seed"], format=DATASET_FORMAT, counts=counts,
        class_pixels=pixels, object_counts=objects, instances_per_scene=per_scene,
        class_frequencies=[round(float(f), 8) for f in freq],
        class_weights=[round(float(w), 6) for w in median_frequency_weights(freq)],
        mean=tuple(round(float(m), 6) for m in mean), std=tuple(round(float(s), 6) for s in std),
        raw={"recipe": recipe, "scene_size": recipe["scene_size"], "sprites": sprites_info,
             "versions": {"bloodcells": bloodcells.__version__, "numpy": np.__version__, "opencv": cv2.__version__,
                          "python": platform.python_version()}})
    info.write()
    info = read_json(info.path)
    return info


def sprite_pools(bank: Path | None, recipe: dict, exclude: Sequence[str] = ()
                 ) -> tuple[dict[str, dict[str, list[Sprite]]], dict]:
    """Sprites by split and class, from a bank or (bank None) the built-in procedural default.

    exclude: source names (or shell patterns, case-insensitive) whose sprites and plasma fields are left out, e.g.
    to check a model on a source it never saw."""
    if bank is None:
        from .procedural import builtin_sprites

        sprites = builtin_sprites(per_class=int(recipe["builtin_per_class"]), seed=0)
        digest = hashlib.sha1(b"".join(s.rgba.tobytes() for s in sprites)).hexdigest()[:16]
        info = {"bank": "builtin", "id": f"builtin-{digest}", "kind": "built-in default (procedural sprites)"}
        licences = {"builtin": {"licence": BUILTIN_LICENCE, "from": "pyproject.toml"}}
    else:
        from .bank import SpriteBank

        b = SpriteBank(bank)
        if not b.index_path.is_file():
            raise BloodcellsError(f"{bank}: no sprite bank here (no index.jsonl); create one with 'cli sprites import'")
        sprites = b.load()
        info = {"bank": str(bank), "id": b.bank_id(), "kind": "sprite bank"}
        licences = b.sources()
    if exclude:
        names = sorted({s.source for s in sprites})
        gone = {n for n in names if any(fnmatch.fnmatch(n.lower(), p.lower()) for p in exclude)}
        unmatched = [p for p in exclude if not any(fnmatch.fnmatch(n.lower(), p.lower()) for n in names)]
        if unmatched:
            raise BloodcellsError(f"--exclude-source {unmatched[0]!r} matches no source of {info['bank']}; its sources: "
                                  f"{', '.join(names)}")
        sprites = [s for s in sprites if s.source not in gone]
        info["excluded"] = sorted(gone)
        info["id"] = info["id"] + "-without-" + hashlib.sha1("\n".join(sorted(gone)).encode()).hexdigest()[:8]
    pools: dict[str, dict[str, list[Sprite]]] = {s: {} for s in SPLITS}
    for s in sprites:
        pools.setdefault(s.split, {}).setdefault(s.cls, []).append(s)
    info["per_split"] = {sp: {c: len(v) for c, v in sorted(d.items(), key=lambda kv: NAMES.index(kv[0]))}
                         for sp, d in pools.items()}
    # what a model card lists: every source's licence travels with the dataset into the checkpoints
    per_source = Counter(s.source for s in sprites)
    info["sources"] = {name: {**licences.get(name, {"licence": UNKNOWN, "from": None}), "sprites": n}
                       for name, n in sorted(per_source.items())}
    return pools, info
