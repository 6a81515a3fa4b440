"""Instance export: COCO masks equal the instance maps pixel for pixel; YOLO polygons fill back to them."""
from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from pycocotools import mask as cocomask
from pycocotools.coco import COCO
from scipy import ndimage
from typer.testing import CliRunner

from bloodcells.classes import CLASSES, NAMES, PALETTE, PLASMA_RGB
from bloodcells.composer import export as export_mod
from bloodcells.composer.export import export, export_coco, export_yolo, instance_polygon
from bloodcells.errors import BloodcellsError
from bloodcells.formats import SPLITS, scene_paths, split_ids, write_json
from bloodcells.imageio import write_bytes_atomic, write_png

# pycocotools' decode trips a numpy 2 deprecation inside the library itself
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

ROOT = Path(__file__).resolve().parents[1]
H, W = 120, 160  # not square, so that a swapped x/y shows


# ---- datasets written by hand in the composer's layout --------------------------------------------

def _raster(shape: tuple, hw: tuple[int, int]) -> np.ndarray:
    m = np.zeros(hw, np.uint8)
    kind, *p = shape
    if kind == "circle":
        cv2.circle(m, (p[0], p[1]), p[2], 1, -1)
    elif kind == "ellipse":
        cv2.ellipse(m, (p[0], p[1]), (p[2], p[3]), p[4], 0, 360, 1, -1)
    else:
        cv2.rectangle(m, (p[0], p[1]), (p[2] - 1, p[3] - 1), 1, -1)
    return m.astype(bool)


def write_scene(root: Path, split: str, sid: str, cells: list[tuple[str, tuple]], hw: tuple[int, int] = (H, W)) -> None:
    """Paint cells bottom to top (the top-most owns a pixel) and write image, label, instances and annotation."""
    owner = np.full(hw, -1)
    for j, (_, shape) in enumerate(cells):
        owner[_raster(shape, hw)] = j
    visible = [j for j in range(len(cells)) if (owner == j).any()]  # fully hidden cells are not listed
    lut = np.zeros(len(cells) + 1, np.uint16)
    lut[[j + 1 for j in visible]] = np.arange(1, len(visible) + 1)
    inst = lut[owner + 1]
    cls_lut = np.array([0] + [NAMES.index(c) for c, _ in cells], np.uint8)
    label = cls_lut[owner + 1]
    objects = []
    for k, j in enumerate(visible, 1):
        ys, xs = np.nonzero(inst == k)
        objects.append({"class": cells[j][0], "bbox": [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1],
                        "instance": k, "pixels": int(xs.size), "centre": [float(xs.mean()), float(ys.mean())],
                        "rotation": 0.0, "flip": False, "scale": 1.0, "sprite": f"hand-{j}", "source": "test"})
    rng = np.random.default_rng(len(objects))
    img = np.where(label[..., None] > 0, PALETTE[label], np.array(PLASMA_RGB, np.uint8))
    img = np.clip(img.astype(int) + rng.integers(-8, 9, img.shape), 0, 255).astype(np.uint8)
    p = scene_paths(root, split, sid)
    write_png(p.image, img)
    write_png(p.label, label)
    ok, buf = cv2.imencode(".png", inst)
    write_bytes_atomic(p.instances, buf.tobytes())
    write_json(p.annotation, {"id": sid, "split": split, "kind": "mixed", "objects": objects,
                              "pixels": np.bincount(label.ravel(), minlength=len(NAMES)).tolist()})


def write_dataset_json(root: Path, sprites: dict | None = None) -> None:
    counts = {s: len(split_ids(root, s)) if (root / s).is_dir() else 0 for s in SPLITS}
    write_json(root / "dataset.json", {"name": "hand", "seed": 7, "format": 2, "classes": list(NAMES), "counts": counts,
                                       "mean": [0.8, 0.7, 0.7], "std": [0.1, 0.1, 0.1], "instances": True,
                                       "sprites": sprites or {"bank": "hand", "id": "hand-0001"}})


# Scene train/000000, bottom to top. Cell indices are those of this list, not instance numbers.
CRAFTED = [
    ("healthy_rbc", ("circle", 30, 30, 18)),           # 0: cut in two pieces by cell 3
    ("infected_rbc", ("circle", 67, 30, 18)),          # 1: touches cell 0 (adjacent columns 48 | 49)
    ("neutrophil", ("ellipse", 150, 90, 25, 18, 20)),  # 2: cut by the right border
    ("lymphocyte", ("ellipse", 30, 30, 4, 40, 0)),     # 3: a bar across cell 0
    ("healthy_rbc", ("circle", 100, 80, 20)),          # 4: has a hole: cell 5 lies wholly on it
    ("thrombocyte", ("circle", 100, 80, 6)),           # 5
    ("platelet_clump", ("ellipse", 40, 95, 22, 12, 30)),  # 6
    ("basophil", ("circle", 60, 100, 14)),             # 7: overlaps cell 6
    ("monocyte", ("circle", 120, 20, 10)),             # 8: hidden entirely by cell 9, so not listed
    ("eosinophil", ("circle", 120, 20, 12)),           # 9
    ("infected_rbc", ("rect", 0, 110, 1, 111)),        # 10: a single pixel in the corner
]


def random_cells(rng: np.random.Generator, n: int) -> list[tuple[str, tuple]]:
    cells = []
    for _ in range(n):
        cls = NAMES[int(rng.integers(1, len(NAMES)))]
        r = max(3, int(CLASSES[NAMES.index(cls)].diameter_40x * rng.uniform(0.25, 0.45)))
        cx, cy = int(rng.integers(-5, W + 5)), int(rng.integers(-5, H + 5))
        cells.append((cls, ("ellipse", cx, cy, r, max(2, int(r * rng.uniform(0.6, 1.0))), float(rng.uniform(0, 180)))))
    return cells


def build_hand_set(root: Path, sprites: dict | None = None) -> Path:
    rng = np.random.default_rng(0)
    write_scene(root, "train", "000000", CRAFTED)
    write_scene(root, "train", "000001", [])  # no cells at all
    for i in range(2, 6):
        write_scene(root, "train", f"{i:06d}", random_cells(rng, 14))
    write_scene(root, "val", "000000", random_cells(rng, 14))
    write_scene(root, "test", "000000", random_cells(rng, 14))
    write_dataset_json(root, sprites)
    return root


@pytest.fixture(scope="module")
def hand_set(tmp_path_factory) -> Path:
    return build_hand_set(tmp_path_factory.mktemp("hand") / "data")


def _scenes(root: Path):
    """(split, id, instance map, objects) of every scene, read the way a user of the format would."""
    for split in SPLITS:
        for sid in split_ids(root, split):
            p = scene_paths(root, split, sid)
            inst = cv2.imread(str(p.instances), cv2.IMREAD_UNCHANGED)
            assert inst.dtype == np.uint16
            yield split, sid, inst, json.loads(p.annotation.read_text())["objects"]


def test_the_crafted_scene_has_the_cases_it_claims(hand_set):
    p = scene_paths(hand_set, "train", "000000")
    inst = cv2.imread(str(p.instances), cv2.IMREAD_UNCHANGED)
    objs = json.loads(p.annotation.read_text())["objects"]
    assert [o["sprite"] for o in objs] == [f"hand-{j}" for j in range(len(CRAFTED)) if j != 8]
    k = {o["sprite"]: o["instance"] for o in objs}
    label = cv2.imread(str(p.label), cv2.IMREAD_UNCHANGED)
    assert ((inst > 0) == (label > 0)).all()
    assert ndimage.label(inst == k["hand-0"])[1] == 2  # two visible pieces
    dil = ndimage.binary_dilation(inst == k["hand-0"])
    assert (dil & (inst == k["hand-1"])).any()  # touching
    assert (inst[:, -1] == k["hand-2"]).any()  # cut by the border
    rbc = inst == k["hand-4"]
    assert (ndimage.binary_fill_holes(rbc) & ~rbc).sum() == (inst == k["hand-5"]).sum() > 0  # a hole
    assert (inst == k["hand-10"]).sum() == 1


# ---- COCO ---------------------------------------------------------------------------------------------

def test_coco_masks_equal_the_instance_maps_pixel_for_pixel(hand_set, tmp_path):
    out = tmp_path / "coco.json"
    s = export_coco(hand_set, out, progress=False)
    coco = json.loads(out.read_text())
    assert coco["categories"] == [{"id": i, "name": NAMES[i], "supercategory": CLASSES[i].group} for i in range(1, 10)]
    assert coco["info"]["dataset"] == "hand" and coco["info"]["seed"] == 7 and coco["info"]["sprites"] == "hand-0001"
    assert "licenses" not in coco
    images = {im["id"]: im for im in coco["images"]}
    assert len(images) == len(coco["images"]) == 8
    by_file = {im["file_name"]: im for im in coco["images"]}
    anns: dict[int, list[dict]] = {}
    for a in coco["annotations"]:
        anns.setdefault(a["image_id"], []).append(a)
    assert len({a["id"] for a in coco["annotations"]}) == len(coco["annotations"])
    total = 0
    for split, sid, inst, objects in _scenes(hand_set):
        im = by_file[f"{split}/images/{sid}.png"]
        assert (hand_set / im["file_name"]).is_file()
        assert (im["width"], im["height"], im["split"]) == (W, H, split)
        got = sorted(anns.get(im["id"], []), key=lambda a: a["instance"])
        assert [a["instance"] for a in got] == list(range(1, len(objects) + 1))
        union = np.zeros(inst.shape, bool)
        for a, o in zip(got, objects):
            k = a["instance"]
            m = cocomask.decode(a["segmentation"]).astype(bool)
            assert m.shape == inst.shape
            assert np.array_equal(m, inst == k), (split, sid, k)
            assert a["category_id"] == NAMES.index(o["class"])
            assert a["area"] == o["pixels"] == m.sum()
            x0, y0, x1, y1 = o["bbox"]
            assert a["bbox"] == [x0, y0, x1 - x0, y1 - y0]
            assert a["iscrowd"] == 0 and a["attributes"]["sprite"] == o["sprite"]
            union |= m
        assert np.array_equal(union, inst > 0)
        total += len(objects)
    assert len(coco["annotations"]) == total == s.instances
    assert s.scenes == {"train": 6, "val": 1, "test": 1}

    api = COCO(str(out))  # the reference loader takes it, and its own decoding agrees
    assert len(api.getAnnIds()) == total and [c["name"] for c in api.loadCats(api.getCatIds())] == list(NAMES[1:])
    a = api.loadAnns(api.getAnnIds(imgIds=[by_file["train/images/000000.png"]["id"]]))[0]
    assert np.array_equal(api.annToMask(a), cocomask.decode(a["segmentation"]))


def test_coco_licenses_come_from_the_sprites_entry(tmp_path):
    root = tmp_path / "d"
    write_scene(root, "val", "000000", CRAFTED[:2])
    write_dataset_json(root, {"id": "x", "license": {"name": "CC BY 4.0", "url": "https://creativecommons.org/licenses/by/4.0/"}})
    export_coco(root, tmp_path / "c.json", progress=False)
    coco = json.loads((tmp_path / "c.json").read_text())
    assert coco["licenses"] == [{"id": 1, "url": "https://creativecommons.org/licenses/by/4.0/", "name": "CC BY 4.0"}]
    assert [im["license"] for im in coco["images"]] == [1]


def test_coco_rle_stacks_in_chunks(hand_set, monkeypatch):
    from bloodcells.composer.export import encode_instances, load_scene

    sc = load_scene(hand_set, "train", "000000")
    whole = encode_instances(sc.instances, sc.slices)
    monkeypatch.setattr(export_mod, "_STACK_BYTES", 3 * H * W)  # three masks a call
    assert encode_instances(sc.instances, sc.slices) == whole and len(whole) == len(sc.objects)


# ---- YOLO segmentation ------------------------------------------------------------------------------

def _fill(line: str, hw: tuple[int, int]) -> tuple[int, np.ndarray]:
    """(class id, the polygon filled at the image size), undoing the pixel-centre normalisation."""
    v = line.split()
    xy = np.array(v[1:], float).reshape(-1, 2) * (hw[1], hw[0]) - 0.5
    m = np.zeros(hw, np.uint8)
    cv2.fillPoly(m, [np.round(xy).astype(np.int32)], 1)
    return int(v[0]), m.astype(bool)


def test_yolo_polygons_fill_back_to_the_instance_maps(hand_set, tmp_path):
    out = tmp_path / "yolo"
    s = export_yolo(hand_set, out, progress=False)
    checked = exact = holes = 0
    for split, sid, inst, objects in _scenes(hand_set):
        img = out / "images" / split / f"{sid}.png"
        assert os.stat(img).st_ino == os.stat(scene_paths(hand_set, split, sid).image).st_ino  # a hard link
        lines = (out / "labels" / split / f"{sid}.txt").read_text().splitlines()
        assert len(lines) == len(objects)
        for k, (line, o) in enumerate(zip(lines, objects), 1):
            cls, filled = _fill(line, inst.shape)
            assert cls == NAMES.index(o["class"]) - 1
            m = inst == k
            if m.sum() >= 30:
                assert (m & filled).sum() / (m | filled).sum() >= 0.9, (split, sid, k)
                checked += 1
            if ndimage.label(m, np.ones((3, 3)))[1] == 1:
                assert np.array_equal(filled, m), (split, sid, k)  # one piece, holes or not: exact
                exact += 1
                holes += (ndimage.binary_fill_holes(m) & ~m).any()
    assert checked > 50 and exact > 40 and holes >= 1
    assert s.instances == sum(len(o) for *_, o in _scenes(hand_set))
    d = yaml.safe_load((out / "data.yaml").read_text())
    assert d == {"path": str(out.resolve()), "train": "images/train", "val": "images/val", "test": "images/test",
                 "names": {i - 1: NAMES[i] for i in range(1, 10)}}
    assert (out / "labels" / "train" / "000001.txt").read_text() == ""  # a scene with no cells


def test_yolo_keeps_both_pieces_and_the_hole(hand_set, tmp_path):
    export_yolo(hand_set, tmp_path / "y", split="train", progress=False)
    p = scene_paths(hand_set, "train", "000000")
    inst = cv2.imread(str(p.instances), cv2.IMREAD_UNCHANGED)
    k = {o["sprite"]: o["instance"] for o in json.loads(p.annotation.read_text())["objects"]}
    lines = (tmp_path / "y" / "labels" / "train" / "000000.txt").read_text().splitlines()
    _, split_cell = _fill(lines[k["hand-0"] - 1], inst.shape)
    pieces, n = ndimage.label(inst == k["hand-0"])
    assert n == 2 and all((split_cell & (pieces == i)).sum() == (pieces == i).sum() for i in (1, 2))
    bridge = split_cell & (inst != k["hand-0"])
    assert 0 < bridge.sum() <= 12  # one line across the bar on top, no more
    _, holed = _fill(lines[k["hand-4"] - 1], inst.shape)
    assert np.array_equal(holed, inst == k["hand-4"])  # the thrombocyte on top stays out, the bridge adds nothing
    _, dot = _fill(lines[k["hand-10"] - 1], inst.shape)
    assert np.array_equal(dot, inst == k["hand-10"])  # a one-pixel cell still gets a valid 3-vertex line
    assert len(lines[k["hand-10"] - 1].split()) == 7


def test_instance_polygon_joins_near_pieces_and_holes_and_drops_far_specks():
    m = np.zeros((40, 60), bool)
    m[5:15, 5:15] = m[5:15, 18:28] = True  # two squares 3 px apart
    m[8:11, 8:11] = False  # a hole
    m[35:37, 55:57] = True  # a 4-pixel speck far away: a bridge would cost more than it brings
    poly = instance_polygon(m)
    filled = np.zeros(m.shape, np.uint8)
    cv2.fillPoly(filled, [poly.astype(np.int32)], 1)
    filled = filled.astype(bool)
    assert filled[5:15, 5:15].sum() == 100 - 9 and filled[5:15, 18:28].all()
    assert not filled[8:11, 8:11].any() and not filled[35:37, 55:57].any()
    extra = filled & ~m
    assert extra.sum() == 3 and extra[:, 15:18].sum() == 3  # the one bridge between the squares


def test_yolo_copies_when_hard_links_fail(hand_set, tmp_path, monkeypatch):
    def no_link(src, dst):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(export_mod.os, "link", no_link)
    export_yolo(hand_set, tmp_path / "y", split="val", progress=False)
    src, dst = scene_paths(hand_set, "val", "000000").image, tmp_path / "y" / "images" / "val" / "000000.png"
    assert os.stat(src).st_ino != os.stat(dst).st_ino and src.read_bytes() == dst.read_bytes()
    assert [p.name for p in (tmp_path / "y" / "images" / "val").iterdir()] == ["000000.png"]  # no temporary left


def test_split_option_and_data_yaml_grow_with_each_split(hand_set, tmp_path):
    export_coco(hand_set, tmp_path / "val.json", split="val", progress=False)
    coco = json.loads((tmp_path / "val.json").read_text())
    assert [im["file_name"] for im in coco["images"]] == ["val/images/000000.png"]
    y = tmp_path / "y"
    export_yolo(hand_set, y, split="val", progress=False)
    assert set(yaml.safe_load((y / "data.yaml").read_text())) == {"path", "val", "names"}
    export_yolo(hand_set, y, split="train", progress=False)
    assert set(yaml.safe_load((y / "data.yaml").read_text())) == {"path", "train", "val", "names"}
    assert sorted(p.name for p in (y / "labels").iterdir()) == ["train", "val"]


# ---- errors -------------------------------------------------------------------------------------------

def test_errors_name_the_file_and_the_fix(hand_set, tmp_path):
    with pytest.raises(BloodcellsError, match=r"nowhere/dataset.json: not found .*'cli compose'"):
        export(tmp_path / "nowhere", "coco", tmp_path / "c.json")
    with pytest.raises(BloodcellsError, match=r"--format 'voc': unknown; use one of coco, yolo-seg"):
        export(hand_set, "voc", tmp_path / "c.json")
    with pytest.raises(BloodcellsError, match=r"--split 'dev': unknown"):
        export(hand_set, "coco", tmp_path / "c.json", split="dev")
    with pytest.raises(BloodcellsError, match=r"is a folder; --out for coco is a JSON file"):
        export(hand_set, "coco", tmp_path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(BloodcellsError, match=r"file: is a file; --out for yolo-seg is a folder"):
        export(hand_set, "yolo-seg", tmp_path / "file")

    old = tmp_path / "old"
    shutil.copytree(hand_set, old)
    shutil.rmtree(old / "val" / "instances")
    for fmt, out in (("coco", tmp_path / "o.json"), ("yolo-seg", tmp_path / "o")):
        with pytest.raises(BloodcellsError, match=r"val/instances/000000.png: missing \(1 of 8 .*re-compose with this version"):
            export(old, fmt, out)
        assert not out.exists()  # checked before anything is written

    eight = tmp_path / "eight"
    shutil.copytree(hand_set, eight)
    cv2.imwrite(str(scene_paths(eight, "test", "000000").instances), np.zeros((H, W), np.uint8))
    with pytest.raises(BloodcellsError, match=r"test/instances/000000.png: expected a one-channel 16-bit instance map"):
        export(eight, "coco", tmp_path / "e.json")


def test_instance_maps_that_disagree_with_the_annotation_are_refused(hand_set, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(hand_set, bad)
    p = scene_paths(bad, "val", "000000")
    ann = json.loads(p.annotation.read_text())
    write_json(p.annotation, {**ann, "objects": ann["objects"][:-1]})
    with pytest.raises(BloodcellsError, match=r"val/instances/000000.png: instance \d+ but the annotation lists"):
        export(bad, "coco", tmp_path / "b.json")
    write_json(p.annotation, ann)
    inst = cv2.imread(str(p.instances), cv2.IMREAD_UNCHANGED)
    inst[inst == 2] = 0
    cv2.imwrite(str(p.instances), inst)
    with pytest.raises(BloodcellsError, match=r"val/instances/000000.png: object 2 of the annotation has no pixels"):
        export(bad, "yolo-seg", tmp_path / "y")


# ---- command line -------------------------------------------------------------------------------------

def test_cli_export_both_formats(hand_set, tmp_path):
    from bloodcells.cli import app

    r = CliRunner().invoke(app, ["export", str(hand_set), "--format", "coco", "--out", str(tmp_path / "c.json"), "--no-progress"])
    assert r.exit_code == 0, r.output
    n = sum(len(o) for *_, o in _scenes(hand_set))
    assert f"8 scenes (train 6, val 1, test 1), {n} instances" in r.output
    r = CliRunner().invoke(app, ["export", str(hand_set), "--format", "yolo-seg", "--out", str(tmp_path / "y"),
                                 "--split", "test", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "1 scenes (test 1)" in r.output and "data.yaml" in r.output


def test_cli_export_error_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "cli.py"), "export", str(tmp_path / "none"), "--format", "coco",
                        "--out", str(tmp_path / "c.json")], capture_output=True, text=True)
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and "none/dataset.json" in r.stderr


def test_a_composed_dataset_exports_exactly(tmp_path):
    """The composer's own instance maps round-trip through COCO pixel for pixel, and through YOLO polygons closely."""
    from bloodcells.composer.dataset import compose, sprite_pools
    from bloodcells.composer.recipe import load_recipe

    r = load_recipe("tiny", {"scenes": {"train": 8, "val": 0, "test": 8}})
    pools, info = sprite_pools(None, r)
    data = tmp_path / "d"
    compose(r, pools, data, info, workers=1, progress=False)
    export_coco(data, tmp_path / "coco.json", progress=False)
    coco = COCO(str(tmp_path / "coco.json"))
    assert len(coco.getImgIds()) == 16
    n = 0
    for img in coco.loadImgs(coco.getImgIds()):
        split, _, name = img["file_name"].split("/")
        inst = cv2.imread(str(scene_paths(data, split, Path(name).stem).instances), cv2.IMREAD_UNCHANGED)
        ann = json.loads(scene_paths(data, split, Path(name).stem).annotation.read_text())
        anns = coco.loadAnns(coco.getAnnIds(imgIds=img["id"]))
        assert sorted(a["instance"] for a in anns) == list(range(1, len(ann["objects"]) + 1))
        for a in anns:
            obj = ann["objects"][a["instance"] - 1]
            assert np.array_equal(coco.annToMask(a).astype(bool), inst == a["instance"])
            assert a["category_id"] == NAMES.index(obj["class"]) and a["area"] == obj["pixels"]
            n += 1
    assert n > 16 * 20  # dozens of cells per scene
    export_yolo(data, tmp_path / "yolo", progress=False)
    ious = []
    for txt in (tmp_path / "yolo" / "labels" / "test").glob("*.txt"):
        inst = cv2.imread(str(scene_paths(data, "test", txt.stem).instances), cv2.IMREAD_UNCHANGED)
        lines = txt.read_text().splitlines()
        assert len(lines) == int(inst.max())
        for k, line in enumerate(lines, start=1):
            _, filled = _fill(line, inst.shape)
            truth = inst == k
            if truth.sum() >= 30:
                ious.append((filled & truth).sum() / (filled | truth).sum())
    assert np.mean(ious) > 0.95 and np.median(ious) > 0.97
