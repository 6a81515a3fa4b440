"""Export a composed dataset's instances: COCO instances (one JSON file) or Ultralytics YOLO segmentation (a folder).

Both read only the on-disk contract (`bloodcells.formats`): each scene's uint16 instance map, where k is the
k-th object of its annotation, and that object's class. COCO masks are exact (compressed RLE of `instances == k`);
YOLO polygons trace each instance's outline and are close but not pixel-exact (see `instance_polygon`).
"""
from __future__ import annotations

import errno
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import cv2
import numpy as np
import yaml
from pycocotools import mask as cocomask
from scipy import ndimage
from scipy.spatial.distance import cdist
from tqdm import tqdm

import bloodcells
from bloodcells.classes import CLASSES, NAMES
from bloodcells.errors import BloodcellsError, disk_errors
from bloodcells.formats import DATASET_FILE, SPLITS, DatasetInfo, read_json, scene_paths, split_ids
from bloodcells.imageio import write_bytes_atomic

FORMATS = ("coco", "yolo-seg")
CELL_CLASSES = CLASSES[1:]  # background is no category
_OWN_FIELDS = ("class", "bbox", "instance", "pixels")  # object fields the formats already carry
_STACK_BYTES = 64 << 20  # cap on one (H, W, n) mask stack handed to pycocotools


@dataclass
class ExportSummary:
    """What an export wrote: scenes per split, instances per class."""

    format: str
    out: Path
    scenes: dict[str, int] = field(default_factory=dict)
    per_class: dict[str, int] = field(default_factory=lambda: {c.name: 0 for c in CELL_CLASSES})

    @property
    def instances(self) -> int:
        return sum(self.per_class.values())


@dataclass(frozen=True)
class Scene:
    """One scene as the exporters need it: its instance map and the objects it numbers."""

    split: str
    sid: str
    instances: np.ndarray  # (H, W) uint16, k = objects[k - 1]
    objects: list[dict]
    annotation: dict
    slices: list[tuple[slice, slice]]  # bounding box of instance k at position k - 1


# ---- reading the dataset ----------------------------------------------------------------------------

def dataset_scenes(root: str | Path, split: str = "all") -> tuple[DatasetInfo, list[tuple[str, str]]]:
    """dataset.json and every (split, id) to export; fails before writing anything if a scene lacks a file."""
    root = Path(root)
    if split not in (*SPLITS, "all"):
        raise BloodcellsError(f"--split '{split}': unknown; use one of {', '.join(SPLITS)} or all")
    if not (root / DATASET_FILE).is_file():
        what = "the folder does not exist" if not root.is_dir() else "it is not a composed dataset"
        raise BloodcellsError(f"{root / DATASET_FILE}: not found ({what}); give a folder written by 'cli compose'")
    info = DatasetInfo.read(root)
    splits = [split] if split != "all" else [s for s in SPLITS if (root / s / "images").is_dir()]
    if not splits:
        raise BloodcellsError(f"{root}: no split folders ({', '.join(SPLITS)}); re-compose the dataset")
    scenes = [(s, sid) for s in splits for sid in split_ids(root, s)]
    for s, sid in scenes:
        p = scene_paths(root, s, sid)
        if not p.instances.is_file():
            n = sum(not scene_paths(root, s2, i2).instances.is_file() for s2, i2 in scenes)
            raise BloodcellsError(f"{p.instances}: missing ({n} of {len(scenes)} scenes have no instance map; the "
                                  "dataset was composed by an older version); re-compose with this version")
        if not p.annotation.is_file():
            raise BloodcellsError(f"{p.annotation}: missing (the compose was interrupted); run the same "
                                  "'cli compose' again to finish it")
    return info, scenes


def read_instance_map(path: Path) -> np.ndarray:
    """A uint16 (H, W) instance map; anything else is an error naming the file."""
    data = np.fromfile(str(path), dtype=np.uint8)
    img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if img is None:
        raise BloodcellsError(f"{path}: not a readable PNG; re-compose the dataset")
    if img.dtype != np.uint16 or img.ndim != 2:
        raise BloodcellsError(f"{path}: expected a one-channel 16-bit instance map, got {img.dtype} "
                              f"{'x'.join(map(str, img.shape))}; re-compose with this version")
    return img


def load_scene(root: Path, split: str, sid: str) -> Scene:
    """Read one scene's instance map and annotation and check that they agree."""
    p = scene_paths(root, split, sid)
    inst = read_instance_map(p.instances)
    ann = read_json(p.annotation)
    objects = ann.get("objects") if isinstance(ann, dict) else None
    if not isinstance(objects, list):
        raise BloodcellsError(f"{p.annotation}: no 'objects' list; re-compose the dataset")
    for k, o in enumerate(objects, 1):
        if not isinstance(o, dict) or o.get("class") not in NAMES[1:] or o.get("instance", k) != k:
            raise BloodcellsError(f"{p.annotation}: object {k} is not a cell of a known class numbered {k} "
                                  f"({str(o)[:80]}); re-compose the dataset")
    top = int(inst.max()) if inst.size else 0
    if top > len(objects):
        raise BloodcellsError(f"{p.instances}: instance {top} but the annotation lists {len(objects)} objects; "
                              "re-compose the dataset")
    slices = ndimage.find_objects(inst, max_label=len(objects)) if objects else []
    empty = [k for k, s in enumerate(slices, 1) if s is None]
    if empty:
        raise BloodcellsError(f"{p.instances}: object {empty[0]} of the annotation has no pixels "
                              f"({len(empty)} such); re-compose the dataset")
    return Scene(split, sid, inst, objects, ann, slices)  # type: ignore[arg-type]


def iter_scenes(root: Path, scenes: Sequence[tuple[str, str]], desc: str, progress: bool) -> Iterator[Scene]:
    """Load the scenes one at a time, with a progress bar."""
    for split, sid in tqdm(scenes, desc=desc, unit="scene", disable=not progress):
        yield load_scene(root, split, sid)


# ---- COCO -------------------------------------------------------------------------------------------

def encode_instances(inst: np.ndarray, slices: Sequence[tuple[slice, slice]]) -> list[dict]:
    """COCO compressed RLE of `inst == k` for k = 1..len(slices), counts as str.

    Masks are compared only inside each instance's box and stacked (H, W, n) in Fortran order for one
    pycocotools call per chunk, so the Python work grows with instance areas, not instances x pixels."""
    h, w = inst.shape
    per_chunk = max(1, _STACK_BYTES // max(1, h * w))
    rles: list[dict] = []
    for start in range(0, len(slices), per_chunk):
        chunk = slices[start:start + per_chunk]
        stack = np.zeros((h, w, len(chunk)), dtype=np.uint8, order="F")
        for j, (sy, sx) in enumerate(chunk, start):
            stack[sy, sx, j - start] = inst[sy, sx] == j + 1
        for r in cocomask.encode(stack):
            rles.append({"size": [int(v) for v in r["size"]], "counts": r["counts"].decode("ascii")})
    return rles


def coco_categories() -> list[dict]:
    """The nine cell classes as COCO categories: id = class index, supercategory = its group."""
    return [{"id": c.index, "name": c.name, "supercategory": c.group} for c in CELL_CLASSES]


def sprite_licenses(sprites: Any) -> list[dict]:
    """COCO `licenses` from dataset.json's `sprites` entry (a name, a dict or a list of them); [] when absent."""
    if not isinstance(sprites, Mapping):
        return []
    raw = next((sprites[k] for k in ("licenses", "licences", "license", "licence") if sprites.get(k)), None)
    if raw is None:
        return []
    out = []
    for item in raw if isinstance(raw, list) else [raw]:
        d = {"name": item} if isinstance(item, str) else dict(item) if isinstance(item, Mapping) else None
        if d is not None:
            out.append({"id": len(out) + 1, "url": "", **d})
    return out


def coco_instances(root: Path, info: DatasetInfo, scenes: Sequence[tuple[str, str]], summary: ExportSummary,
                   progress: bool = True) -> dict:
    """The COCO instances dict of the given scenes (ids numbered from 1 in split, then id order)."""
    sprites = info.raw.get("sprites") if isinstance(info.raw.get("sprites"), Mapping) else {}
    licenses = sprite_licenses(sprites)
    images, annotations = [], []
    for image_id, sc in enumerate(iter_scenes(root, scenes, "export coco", progress), 1):
        h, w = sc.instances.shape
        image = {"id": image_id, "file_name": f"{sc.split}/images/{sc.sid}.png", "width": w, "height": h,
                 "split": sc.split}
        if "kind" in sc.annotation:
            image["background"] = sc.annotation["kind"]
        if len(licenses) == 1:
            image["license"] = licenses[0]["id"]
        images.append(image)
        for k, (o, (sy, sx), rle) in enumerate(zip(sc.objects, sc.slices, encode_instances(sc.instances, sc.slices)), 1):
            area = int(np.count_nonzero(sc.instances[sy, sx] == k))
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": NAMES.index(o["class"]),
                "segmentation": rle, "area": area,
                "bbox": [sx.start, sy.start, sx.stop - sx.start, sy.stop - sy.start], "iscrowd": 0,
                "instance": k, "attributes": {key: v for key, v in o.items() if key not in _OWN_FIELDS}})
            summary.per_class[o["class"]] += 1
        summary.scenes[sc.split] = summary.scenes.get(sc.split, 0) + 1
    # no creation date: the same dataset exports to the same bytes
    coco = {"info": {"description": f"bloodcells synthetic blood-smear scenes: {info.name or root.name}",
                     "version": bloodcells.__version__, "dataset": info.name, "seed": info.seed,
                     "sprites": sprites.get("id"),
                     "contributor": "bloodcells", "url": ""},
            "images": images, "annotations": annotations, "categories": coco_categories()}
    if licenses:
        coco["licenses"] = licenses
    return coco


def export_coco(root: str | Path, out: str | Path, split: str = "all", progress: bool = True) -> ExportSummary:
    """Write the COCO instances JSON of a composed dataset to `out` (atomically)."""
    root, out = Path(root), Path(out)
    if out.is_dir():
        raise BloodcellsError(f"{out}: is a folder; --out for coco is a JSON file, e.g. {out / 'coco.json'}")
    info, scenes = dataset_scenes(root, split)
    summary = ExportSummary("coco", out)
    coco = coco_instances(root, info, scenes, summary, progress)
    # compact like the official COCO files: formats.write_json indents, which takes Python's pure encoder
    # (about 6x slower here) and doubles the size
    write_bytes_atomic(out, (json.dumps(coco, separators=(",", ":")) + "\n").encode())
    return summary


# ---- YOLO segmentation ------------------------------------------------------------------------------

def _drop_collinear(poly: np.ndarray) -> np.ndarray:
    """Remove vertices whose incoming and outgoing steps are equal (midpoints of straight runs); the shape is unchanged."""
    if len(poly) <= 3:
        return poly
    step = np.roll(poly, -1, axis=0) - poly
    keep = (step != np.roll(step, 1, axis=0)).any(axis=1)
    return poly[keep] if keep.sum() >= 3 else poly


def merge_rings(rings: Sequence[np.ndarray]) -> np.ndarray:
    """One closed polygon through every ring (outlines of pieces and of holes), joined by zero-width bridges.

    The rings are linked by a minimum spanning tree over their closest vertex pairs (so bridges are as short as
    possible, the idea of Ultralytics' `merge_multi_segment`), and the tree is walked depth-first: along a ring,
    at each bridge into a child ring, around the child and back. A bridge is traversed once each way, so it
    encloses no area; filled, it adds only the pixels on the bridge line."""
    rings = [np.asarray(r) for r in rings]
    if len(rings) == 1:
        return rings[0]
    n = len(rings)
    dist = np.full((n, n), np.inf)
    pair: dict[tuple[int, int], tuple[int, int]] = {}
    for a in range(n):
        for b in range(a + 1, n):
            d = cdist(rings[a], rings[b])
            ia, ib = np.unravel_index(int(np.argmin(d)), d.shape)
            dist[a, b] = dist[b, a] = d[ia, ib]
            pair[a, b], pair[b, a] = (int(ia), int(ib)), (int(ib), int(ia))
    children: dict[int, list[tuple[int, int, int]]] = {i: [] for i in range(n)}  # ring -> (at vertex, child, entry)
    inside, best = {0}, dist[0].copy()
    parent = np.zeros(n, int)
    while len(inside) < n:  # Prim
        c = min((i for i in range(n) if i not in inside), key=lambda i: best[i])
        p = int(parent[c])
        at, entry = pair[p, c]
        children[p].append((at, c, entry))
        inside.add(c)
        closer = dist[c] < best
        best[closer], parent[closer] = dist[c][closer], c

    def walk(r: int, start: int, closed: bool) -> list[np.ndarray]:
        pts = np.roll(rings[r], -start, axis=0)
        parts, prev = [], 0
        for at, c, entry in sorted(children[r], key=lambda t: (t[0] - start) % len(pts)):
            off = (at - start) % len(pts)
            parts += [pts[prev:off + 1], *walk(c, entry, False), pts[off:off + 1]]
            prev = off + 1
        parts.append(pts[prev:])
        if not closed:
            parts.append(pts[:1])  # back to the entry, then over the bridge to the parent
        return parts

    return np.concatenate(walk(0, 0, True))


def _fill_iou(poly: np.ndarray, mask: np.ndarray) -> float:
    """IoU of a boolean mask with the polygon filled the way Ultralytics rasterises it (`cv2.fillPoly`)."""
    filled = np.zeros(mask.shape, np.uint8)
    cv2.fillPoly(filled, [poly.astype(np.int32)], 1)
    filled = filled.astype(bool)
    return float((filled & mask).sum() / max(1, (filled | mask).sum()))


def instance_polygon(mask: np.ndarray) -> np.ndarray:
    """One polygon (m >= 3, 2) in pixel coordinates (x, y) tracing a binary mask's outline.

    The vertices are the centres of the outline pixels (`cv2.findContours`); filled with `cv2.fillPoly` the
    polygon gives back a one-piece mask exactly. Holes (a cell lying wholly on top of this one) and further
    pieces (a cell on top cutting this one in two) are joined by `merge_rings`: bridges to holes run over the
    cell's own pixels, bridges between pieces fill as one-pixel lines. A piece is left out when joining it
    would fill further from the mask (IoU), as a small piece far from the rest does."""
    mask = mask.astype(bool)
    u8 = mask.astype(np.uint8)
    contours, _ = cv2.findContours(u8, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if len(contours) == 1:
        poly = contours[0][:, 0, :]
    else:  # every outline pixel, so that bridges join the truly closest points; straight runs dropped after
        contours, hierarchy = cv2.findContours(u8, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
        rings = [c[:, 0, :] for c in contours]
        parent = hierarchy[0][:, 3]
        # a piece = an outer ring and its holes; largest first, the root the others hang from
        pieces = sorted(([int(i), *map(int, np.flatnonzero(parent == i))] for i in np.flatnonzero(parent < 0)),
                        key=lambda p: -cv2.contourArea(contours[p[0]]))

        def join(chosen: list[list[int]]) -> np.ndarray:
            return _drop_collinear(merge_rings([rings[i] for p in chosen for i in p]))

        chosen = pieces[:1]
        poly = join(chosen)
        score = _fill_iou(poly, mask)
        for piece in pieces[1:]:
            cand = join(chosen + [piece])
            s = _fill_iou(cand, mask)
            if s > score:
                chosen, poly, score = chosen + [piece], cand, s
    if len(poly) < 3:  # one or two pixels: repeat a vertex so every line is a valid polygon
        poly = np.concatenate([poly, np.repeat(poly[-1:], 3 - len(poly), axis=0)])
    return poly


def yolo_label_text(sc: Scene) -> str:
    """The Ultralytics segmentation label file of one scene: `cls x1 y1 x2 y2 ...` per instance, 0..1."""
    h, w = sc.instances.shape
    scale = np.array([w, h], np.float64)
    lines = []
    for k, (o, (sy, sx)) in enumerate(zip(sc.objects, sc.slices), 1):
        poly = instance_polygon(sc.instances[sy, sx] == k) + (sx.start, sy.start)
        xy = (poly + 0.5) / scale  # pixel centres: (x + 0.5) / width, robust to truncation when scaled back
        lines.append(("%d" + " %.6g" * xy.size + "\n") % (NAMES.index(o["class"]) - 1, *xy.ravel().tolist()))
    return "".join(lines)


def link_or_copy(src: Path, dst: Path) -> bool:
    """Put `src` at `dst` atomically: a hard link when on the same filesystem, else a copy; True if linked."""
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    with disk_errors(dst):
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            try:
                if tmp.exists():
                    tmp.unlink()
                os.link(src, tmp)
                linked = True
            except OSError as e:
                # another filesystem, or one without hard links
                if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP):
                    raise
                shutil.copyfile(src, tmp)
                linked = False
            os.replace(tmp, dst)
        finally:
            if tmp.exists():
                tmp.unlink()
    return linked


def yolo_data_yaml(out: Path, info: DatasetInfo) -> str:
    """data.yaml for Ultralytics: the absolute root, the split image folders present, the 0-based class names."""
    d: dict[str, Any] = {"path": str(out.resolve())}
    d.update({s: f"images/{s}" for s in SPLITS if (out / "images" / s).is_dir()})
    d["names"] = {c.index - 1: c.name for c in CELL_CLASSES}
    head = f"# bloodcells {bloodcells.__version__} export of {info.name or info.root.name} (seed {info.seed})\n"
    return head + yaml.safe_dump(d, sort_keys=False)


def export_yolo(root: str | Path, out: str | Path, split: str = "all", progress: bool = True) -> ExportSummary:
    """Write an Ultralytics YOLO segmentation dataset of a composed dataset into the folder `out`."""
    root, out = Path(root), Path(out)
    if out.exists() and not out.is_dir():
        raise BloodcellsError(f"{out}: is a file; --out for yolo-seg is a folder (created if missing)")
    info, scenes = dataset_scenes(root, split)
    summary = ExportSummary("yolo-seg", out)
    for sc in iter_scenes(root, scenes, "export yolo-seg", progress):
        link_or_copy(scene_paths(root, sc.split, sc.sid).image, out / "images" / sc.split / f"{sc.sid}.png")
        write_bytes_atomic(out / "labels" / sc.split / f"{sc.sid}.txt", yolo_label_text(sc).encode())
        for o in sc.objects:
            summary.per_class[o["class"]] += 1
        summary.scenes[sc.split] = summary.scenes.get(sc.split, 0) + 1
    write_bytes_atomic(out / "data.yaml", yolo_data_yaml(out, info).encode())
    return summary


def export(root: str | Path, fmt: str, out: str | Path, split: str = "all", progress: bool = True) -> ExportSummary:
    """Export a composed dataset's instances in one of FORMATS."""
    if fmt == "coco":
        return export_coco(root, out, split, progress)
    if fmt == "yolo-seg":
        return export_yolo(root, out, split, progress)
    raise BloodcellsError(f"--format '{fmt}': unknown; use one of {', '.join(FORMATS)}")
