"""Scene composer: exact labels, coverage, split purity, determinism, resume, recipe errors."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from bloodcells.classes import NAMES, index_of
from bloodcells.errors import BloodcellsError
from bloodcells.composer.dataset import Composer, check_pools, compose, plan_split, required_combos, sprite_pools
from bloodcells.composer.recipe import OBJECT_CLASSES, load_recipe, validate
from bloodcells.composer.scene import Prepared, feather, paste, transform
from bloodcells.composer.sprite import Sprite

ROOT = Path(__file__).resolve().parents[1]
TINY = {"scenes": {"train": 24, "val": 8, "test": 8}}


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.startswith(".")}


@pytest.fixture(scope="module")
def builtin():
    r = load_recipe("tiny", TINY)
    return r, *sprite_pools(None, r)


@pytest.fixture(scope="module")
def tiny_set(builtin, tmp_path_factory):
    r, pools, info = builtin
    out = tmp_path_factory.mktemp("tiny") / "d"
    compose(r, pools, out, info, workers=1, progress=False)
    return out


# ---- pasting is exact -------------------------------------------------------------------

def _disk_sprite(r: int = 10, cls: str = "lymphocyte", sid: str = "x") -> Sprite:
    rgba = np.zeros((2 * r + 5, 2 * r + 5, 4), np.uint8)
    cv2.circle(rgba, (r + 2, r + 2), r, (90, 40, 150, 255), -1)
    return Sprite(sid, cls, rgba, float(2 * np.sqrt((rgba[..., 3] > 127).sum() / np.pi)))


def test_paste_labels_exactly_the_visible_sprite_pixels():
    img = np.full((64, 64, 3), 200, np.float32)
    label = np.zeros((64, 64), np.uint8)
    s = _disk_sprite()
    pm, _ = Prepared(soft_edge=0.8).get(s, s.diameter)
    a = transform(pm, 1.0, 0.0, False)
    bbox = paste(img, label, a, 4, 20, 20)
    expect = np.zeros_like(label)
    h, w = a.mask.shape
    x0, y0 = int(round(20 - (w - 1) / 2)), int(round(20 - (h - 1) / 2))
    expect[y0:y0 + h, x0:x0 + w][a.mask] = 4
    assert np.array_equal(label, expect)
    assert (label == 4).sum() == pytest.approx(np.pi * 10 ** 2, rel=0.08)
    # a second sprite on top takes the overlap (top-most wins); the first keeps the rest
    b = transform(pm, 1.0, 45.0, True)
    paste(img, label, b, 9, 30, 20)
    assert (label == 9).sum() == b.mask.sum()
    assert 0 < (label == 4).sum() < a.mask.sum()
    # cut by the border: only the inside part is labelled, and the bbox is clipped
    lab2 = np.zeros((64, 64), np.uint8)
    bb = paste(np.zeros((64, 64, 3), np.float32), lab2, a, 4, 0, 0)
    assert bb[0] == 0 and bb[1] == 0 and 0 < (lab2 == 4).sum() < a.mask.sum()
    # the returned boxes are the tight boxes (x0, y0, x1, y1; x1, y1 exclusive) of the pixels labelled
    assert bbox == _tight_box(expect == 4) and bb == _tight_box(lab2 == 4)


def _tight_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def test_feathering_never_changes_the_label():
    s = _disk_sprite(14)
    hard, _ = Prepared(0.0).get(s, s.diameter)
    soft, _ = Prepared(1.5).get(s, s.diameter)
    m_hard = transform(hard, 1.3, 30.0, False).mask
    m_soft = transform(soft, 1.3, 30.0, False).mask
    pad = (m_soft.shape[0] - m_hard.shape[0]) // 2
    assert np.array_equal(m_soft[pad:pad + m_hard.shape[0], pad:pad + m_hard.shape[1]], m_hard)
    assert feather(np.zeros((4, 4, 4), np.float32), 1.0).shape[2] == 5


# ---- composed scenes --------------------------------------------------------------------

def test_files_and_label_values(tiny_set):
    info = json.loads((tiny_set / "dataset.json").read_text())
    assert info["counts"] == {"train": 24, "val": 8, "test": 8}
    assert info["sprites"]["bank"] == "builtin"
    assert len(info["class_weights"]) == 10 and abs(sum(info["class_frequencies"]) - 1) < 1e-6
    for split, n in info["counts"].items():
        ids = sorted(p.stem for p in (tiny_set / split / "labels").glob("*.png"))
        assert len(ids) == n
        for sid in ids[:4]:
            lab = cv2.imread(str(tiny_set / split / "labels" / f"{sid}.png"), cv2.IMREAD_UNCHANGED)
            img = cv2.imread(str(tiny_set / split / "images" / f"{sid}.png"), cv2.IMREAD_UNCHANGED)
            assert lab.dtype == np.uint8 and lab.shape == (224, 224) and lab.max() <= 9
            assert img.shape == (224, 224, 3)


def test_annotations_match_the_label_map(tiny_set):
    """Every labelled pixel of a class lies in the bbox of an annotated object of that class, and
    every annotated object shows pixels of its class inside its bbox."""
    for ap in sorted((tiny_set / "train" / "annotations").glob("*.json"))[:12]:
        ann = json.loads(ap.read_text())
        lab = cv2.imread(str(tiny_set / "train" / "labels" / f"{ann['id']}.png"), cv2.IMREAD_UNCHANGED)
        assert np.bincount(lab.ravel(), minlength=10).tolist() == ann["pixels"]
        cover = np.zeros((10,) + lab.shape, bool)
        for o in ann["objects"]:
            x0, y0, x1, y1 = o["bbox"]
            c = index_of(o["class"])
            assert (lab[y0:y1, x0:x1] == c).any()
            cover[c, y0:y1, x0:x1] = True
        for c in range(1, 10):
            assert cover[c][lab == c].all(), (ann["id"], NAMES[c])


def test_balanced_covers_every_pair_on_every_background(builtin, tmp_path):
    r = load_recipe("balanced", {"scenes": {"train": 96, "val": 0, "test": 0}})
    combos = required_combos(r)
    assert len(combos) == 7 + 21
    plans = plan_split(r, "train")
    seen = {(p.kind, p.required) for p in plans if p.required}
    assert seen == {(k, c) for k in ("healthy", "infected", "mixed") for c in combos}
    _, pools, info = builtin
    compose(r, pools, tmp_path, info, workers=2, progress=False)
    d = json.loads((tmp_path / "dataset.json").read_text())
    assert all(n > 0 for n in d["class_pixels"]["train"]), d["class_pixels"]
    shown = 0
    for p in plans:
        if p.required:
            lab = cv2.imread(str(tmp_path / "train" / "labels" / f"{p.index:06d}.png"), cv2.IMREAD_UNCHANGED)
            shown += all((lab == index_of(c)).any() for c in p.required)
    assert shown >= 0.9 * len(seen)  # a later object may hide an earlier one entirely


def test_clumps_are_built_from_thrombocytes(tiny_set):
    clumps = [o for ap in (tiny_set / "train" / "annotations").glob("*.json")
              for o in json.loads(ap.read_text())["objects"] if o["class"] == "platelet_clump"]
    assert clumps
    for o in clumps:
        assert o["built"] and 3 <= len(o["parts"]) <= 10 and o["source"] == "built"
        assert all(pid.startswith("builtin-thrombocyte") for pid in o["parts"])


def test_same_files_for_any_workers_and_shards(builtin, tiny_set, tmp_path):
    r, pools, info = builtin
    ref = _hashes(tiny_set)
    compose(r, pools, tmp_path / "w2", info, workers=2, progress=False)
    assert _hashes(tmp_path / "w2") == ref
    for i in range(3):
        s = compose(r, pools, tmp_path / "sh", info, workers=1, shard=(i, 3), progress=False)
        assert s["complete"] == (i == 2)
    assert _hashes(tmp_path / "sh") == ref


def test_resume_after_kill(builtin, tmp_path):
    """Kill a real compose mid-run; a re-run completes it with the same bytes as an unbroken run."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\nscenes: {train: 160, val: 0, test: 0}\ncanvas: {size: 448, windows: 4}\n")
    out = tmp_path / "killed"
    cmd = [sys.executable, str(ROOT / "cli.py"), "compose", "--recipe", str(recipe), "--out", str(out), "--workers", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    ann = out / "train" / "annotations"
    while time.time() < deadline and (not ann.is_dir() or len(list(ann.glob("*.json"))) < 20):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    n_done = len(list(ann.glob("*.json")))
    assert 20 <= n_done < 160 and not (out / "dataset.json").exists()
    # a half-written scene: image present but no annotation, and a stray temp file
    (out / "train" / "images" / "000159.png").write_bytes(b"half")
    (out / "train" / "images" / ".000158.png.123.tmp").write_bytes(b"tmp")
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert f"{n_done} already there" in r.stdout
    ref = tmp_path / "ref"
    r2 = subprocess.run(cmd[:-4] + ["--out", str(ref), "--workers", "2"], capture_output=True, text=True)
    assert r2.returncode == 0, r2.stderr
    assert _hashes(out) == _hashes(ref)


def test_builtin_sprites_never_cross_splits(builtin, tiny_set):
    r, pools, _ = builtin
    split_of = {sp.id: split for split, by_cls in pools.items() for sprites in by_cls.values() for sp in sprites}
    assert len(set(split_of.values())) == 3  # every split has its own sprites
    used = {split: set() for split in ("train", "val", "test")}
    for split in used:
        for ap in (tiny_set / split / "annotations").glob("*.json"):
            for o in json.loads(ap.read_text())["objects"]:
                used[split].update(o.get("parts") or [o["sprite"]])
    for split, ids in used.items():
        assert ids and {split_of[i] for i in ids} == {split}, split  # RBCs, WBCs, platelets and clump parts
    assert sum(len(v) for v in used.values()) > 50


def test_real_sprites_never_cross_splits(real_bank, tmp_path):
    bank, _ = real_bank
    r = load_recipe("balanced", {"scenes": {"train": 32, "val": 32, "test": 32}, "canvas": {"windows": 8}})
    pools, info = sprite_pools(bank.root, r)
    compose(r, pools, tmp_path, info, workers=2, progress=False)
    split_of = {rec["id"]: rec["split"] for rec in bank.records()}
    n = 0
    for split in ("train", "val", "test"):
        for ap in (tmp_path / split / "annotations").glob("*.json"):
            for o in json.loads(ap.read_text())["objects"]:
                for sid in o.get("parts") or [o["sprite"]]:
                    assert split_of[sid] == split
                    n += 1
    assert n > 500
    d = json.loads((tmp_path / "dataset.json").read_text())
    assert d["sprites"]["id"] == bank.bank_id() and all(x > 0 for x in d["class_pixels"]["train"])


# ---- errors a user can cause --------------------------------------------------------------

def test_recipe_errors_name_the_key_and_fix(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("scenes: {train: 10\n")
    with pytest.raises(BloodcellsError, match="not valid YAML at line"):
        load_recipe(bad)
    bad.write_text("canvas: {sise: 1000}\n")
    with pytest.raises(BloodcellsError, match=r"unknown key 'canvas.sise'; allowed here: size"):
        load_recipe(bad)
    with pytest.raises(BloodcellsError, match="unknown class 'platelets' in objects.weights"):
        validate({"objects": {"weights": {"platelets": 1}}})
    with pytest.raises(BloodcellsError, match="must be a number >= 0"):
        validate({"look": {"noise": -1}})
    with pytest.raises(BloodcellsError, match="must be \\[low, high\\]"):
        validate({"look": {"blur": 3}})
    with pytest.raises(BloodcellsError, match="look.plasma must be a list of RGB colours"):
        validate({"look": {"plasma": [[300, 0, 0]]}})
    with pytest.raises(BloodcellsError, match="no such recipe; give a YAML path or one of: .*balanced.yaml"):
        load_recipe("nope")
    assert load_recipe("balanced.yaml")["name"] == "balanced"


def test_empty_class_is_a_clear_error(builtin):
    r, pools, _ = builtin
    broken = {s: {c: v for c, v in d.items() if c != "basophil"} for s, d in pools.items()}
    with pytest.raises(BloodcellsError, match="split 'train' has no basophil sprites.*objects.weights.basophil: 0"):
        check_pools(r, broken, "bank/")
    r2 = validate({**TINY, "objects": {"weights": {"basophil": 0}}})
    check_pools(r2, broken, "bank/")  # not needed: fine


def test_refuses_to_mix_recipes_in_one_folder(builtin, tiny_set):
    r, pools, info = builtin
    other = validate({**TINY, "seed": 7})
    with pytest.raises(BloodcellsError, match="another recipe, seed or sprite bank"):
        compose(other, pools, tiny_set, info, workers=1, progress=False)


def test_refuses_scenes_copied_without_their_recipe_record(builtin, tiny_set, tmp_path):
    r, pools, info = builtin
    copy = tmp_path / "copy"
    for split in ("train", "val", "test"):
        shutil.copytree(tiny_set / split, copy / split)  # the scenes, not the hidden .compose.json
    other = validate({**TINY, "seed": 7})
    with pytest.raises(BloodcellsError, match="holds scenes but no record of the recipe"):
        compose(other, pools, copy, info, workers=1, progress=False)
    assert not (copy / "dataset.json").exists() and not (copy / ".compose.json").exists()
    shutil.rmtree(copy / "train")  # one split's scenes are enough to refuse, also for the same recipe
    shutil.rmtree(copy / "test")
    with pytest.raises(BloodcellsError, match="holds scenes but no record"):
        compose(r, pools, copy, info, workers=1, progress=False)


def test_recipe_rejects_unsafe_names_non_finite_numbers_and_empty_files(tmp_path):
    for name in ("../../x", "/abs", "a/b", "..", ".hidden", 123):
        with pytest.raises(BloodcellsError, match="must be a plain folder name"):
            validate({**TINY, "name": name})
    assert validate({**TINY, "name": "my-set_2.1"})["name"] == "my-set_2.1"
    odd = tmp_path / "my recipe (v2).yaml"
    odd.write_text("scenes: {train: 1, val: 0, test: 0}\n")
    assert load_recipe(odd)["name"] == "my_recipe__v2_"  # named after the file, as a plain folder name
    for text, key in (("canvas: {density: .nan}", "canvas.density' is nan"),
                      ("canvas: {density: .inf}", "canvas.density' is inf"),
                      ("look: {blur: [0, -.inf]}", r"look.blur\[1\]' is -inf"),
                      ("look: {plasma: [[236, 222, .nan]]}", r"look.plasma\[0\]\[2\]' is nan"),
                      ("objects: {weights: {basophil: .inf}}", "objects.weights.basophil' is inf")):
        bad = tmp_path / "bad.yaml"
        bad.write_text(text + "\n")
        with pytest.raises(BloodcellsError, match=key):
            load_recipe(bad)
    for text in ("", "# only a comment\n", "{}\n"):
        bad.write_text(text)
        with pytest.raises(BloodcellsError, match="bad.yaml: the recipe is empty"):
            load_recipe(bad)


def test_cli_compose_and_show(tmp_path):
    out = tmp_path / "d"
    r = subprocess.run([sys.executable, str(ROOT / "cli.py"), "compose", "--recipe", "tiny", "--out", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "built-in default" in r.stdout and "healthy_rbc" in r.stdout
    r = subprocess.run([sys.executable, str(ROOT / "cli.py"), "show", str(out), "--n", "4", "--out",
                        str(tmp_path / "g.png")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    g = cv2.imread(str(tmp_path / "g.png"))
    assert g.shape[1] == 4 * (2 * 224 + 4 + 8)
    r = subprocess.run([sys.executable, str(ROOT / "cli.py"), "compose", "--recipe", "nope.yaml", "--out", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.startswith("error: nope.yaml: no such recipe")


def test_composer_is_deterministic_in_memory(builtin):
    r, pools, _ = builtin
    a = Composer(r, "train", pools["train"]).scene(5)
    b = Composer(r, "train", pools["train"]).scene(5)
    assert all(np.array_equal(x, y) for x, y in zip(a[:3], b[:3])) and a[3] == b[3]


def test_plasma_colours_vary_the_background_only(builtin):
    r, pools, _ = builtin
    grey = validate({**TINY, "look": {"plasma": [[205, 206, 202]], "background_tone": 0, "illumination": 0,
                                      "noise": 0, "blur": [0, 0]}})
    img, lab, _, _ = Composer(grey, "train", pools["train"]).scene(0)
    bg = img[lab == 0]
    assert np.abs(np.median(bg, axis=0) - [205, 206, 202]).max() <= 2
    cream = validate({**grey, "look": {**grey["look"], "plasma": [[236, 222, 210]]}})
    img2, lab2, _, _ = Composer(cream, "train", pools["train"]).scene(0)
    assert np.array_equal(lab, lab2)  # the label map does not depend on the background colour


# ---- instances ---------------------------------------------------------------------------

def _scene_files(root: Path, split: str, sid: str):
    lab = cv2.imread(str(root / split / "labels" / f"{sid}.png"), cv2.IMREAD_UNCHANGED)
    inst = cv2.imread(str(root / split / "instances" / f"{sid}.png"), cv2.IMREAD_UNCHANGED)
    ann = json.loads((root / split / "annotations" / f"{sid}.json").read_text())
    return lab, inst, ann


def test_instance_maps_follow_the_label_rule(tiny_set):
    """k = the k-th object; every pixel with an instance has that instance's class; every cell pixel has one;
    each object's pixel count and bbox are exactly those of its instance."""
    checked = 0
    for split in ("train", "val", "test"):
        for ap in sorted((tiny_set / split / "annotations").glob("*.json")):
            lab, inst, ann = _scene_files(tiny_set, split, ap.stem)
            assert inst.dtype == np.uint16 and inst.shape == lab.shape
            objs = ann["objects"]
            assert [o["instance"] for o in objs] == list(range(1, len(objs) + 1))
            cls = np.array([0] + [index_of(o["class"]) for o in objs])
            assert int(inst.max()) == len(objs)
            assert np.array_equal(cls[inst], lab)  # instance -> class, and background where no instance
            counts = np.bincount(inst.ravel(), minlength=len(objs) + 1)
            assert counts[1:].tolist() == [o["pixels"] for o in objs] and (counts[1:] > 0).all()
            for o in objs:
                ys, xs = np.nonzero(inst == o["instance"])
                assert o["bbox"] == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            checked += 1
    assert checked == 40


def test_instances_separate_touching_cells_of_one_class(tiny_set):
    """Touching RBCs of one class form one label component but several instances."""
    merged = 0
    for ap in sorted((tiny_set / "train" / "annotations").glob("*.json"))[:8]:
        lab, inst, ann = _scene_files(tiny_set, "train", ap.stem)
        n, cc = cv2.connectedComponents((lab == index_of("healthy_rbc")).astype(np.uint8))
        for k in range(1, n):
            merged += len(np.unique(inst[cc == k])) > 1
    assert merged > 0


def test_dataset_json_records_instances(tiny_set):
    d = json.loads((tiny_set / "dataset.json").read_text())
    assert d["format"] == 2
    n_train = [len(json.loads(p.read_text())["objects"]) for p in (tiny_set / "train" / "annotations").glob("*.json")]
    assert d["instances_per_scene"]["train"] == {"mean": round(float(np.mean(n_train)), 2), "min": min(n_train),
                                                 "max": max(n_train)}
    assert sum(d["object_counts"]["train"]) == sum(n_train)


# ---- how scenes are formed ----------------------------------------------------------------

def test_optical_density_overlaps_are_darker_than_either_cell():
    """Beer-Lambert: where two cells overlap their densities add; alpha compositing shows only the top one."""
    from bloodcells.composer.scene import to_colour

    s1, s2 = _disk_sprite(10, sid="a"), _disk_sprite(10, sid="b")
    s1 = Sprite("a", "healthy_rbc", s1.rgba, s1.diameter, background=(240.0, 240.0, 240.0))
    s2 = Sprite("b", "healthy_rbc", s2.rgba, s2.diameter, background=(240.0, 240.0, 240.0))
    plasma = np.array([236, 222, 210], np.float32)
    results = {}
    for blend in ("optical_density", "alpha"):
        prep = Prepared(0.0, blend)
        img = np.zeros((48, 64, 3), np.float32) if blend == "optical_density" else np.tile(plasma, (48, 64, 1))
        lab = np.zeros((48, 64), np.uint8)
        inst = np.zeros((48, 64), np.int32)
        for k, (s, x) in enumerate(((s1, 22), (s2, 38)), start=1):
            pm, _ = prep.get(s, s.diameter)
            paste(img, lab, transform(pm, 1.0, 0.0, False), 9, x, 24, inst, k, prep.additive)
        rgb = to_colour(img, plasma) if blend == "optical_density" else img
        results[blend] = (rgb[24, 30].mean(), rgb[24, 16].mean(), rgb[24, 44].mean(), inst, rgb[2, 2])
    overlap, left, right, inst, bg = results["optical_density"]
    assert overlap < left - 20 and overlap < right - 20  # darker than either cell alone
    assert np.abs(bg - plasma).max() < 1e-3  # no cell: the plasma exactly
    assert inst[24, 30] == 2 and inst[24, 16] == 1  # the top-most cell owns the overlap
    a_overlap, a_left, _, _, _ = results["alpha"]
    assert abs(a_overlap - a_left) < 3  # alpha: the top cell just covers the one below


def test_density_ranges_and_sizes_drawn_per_canvas(builtin):
    r, pools, _ = builtin
    sparse = validate({**TINY, "canvas": {"density": [0.25, 0.3], "overlap": [-0.5, -0.4], "size": 448, "windows": 8}})
    dense = validate({**TINY, "canvas": {"density": [0.95, 1.0], "overlap": [0.15, 0.2], "size": 448, "windows": 8}})
    n_sparse = [len(Composer(sparse, "train", pools["train"]).scene(i)[3]["objects"]) for i in (0, 8, 16)]
    n_dense = [len(Composer(dense, "train", pools["train"]).scene(i)[3]["objects"]) for i in (0, 8, 16)]
    assert max(n_sparse) * 2 < min(n_dense), (n_sparse, n_dense)
    ann = Composer(sparse, "train", pools["train"]).scene(0)[3]
    assert 0.25 <= ann["rbc_density"] <= 0.3 and -0.5 <= ann["rbc_overlap"] <= -0.4
    small = validate({**TINY, "sizes": {"thrombocyte": [8, 10]}, "objects": {"weights": {"thrombocyte": 1}}})
    c = Composer(small, "train", pools["train"])
    plts = [o for i in range(8) for o in c.scene(i)[3]["objects"] if o["class"] == "thrombocyte"]
    assert plts and all(o["pixels"] <= np.pi * 5.3 ** 2 for o in plts)
    with pytest.raises(BloodcellsError, match="canvas.density"):
        validate({"canvas": {"density": [0.9, 0.2]}})


def test_parasitemia_range_drawn_per_mixed_canvas(builtin):
    """canvas.infected_share as [low, high]: each mixed canvas's share of infected red cells is drawn in it."""
    _, pools, _ = builtin
    shares = {}
    for rng_ in ([0.02, 0.08], [0.85, 0.95]):
        rec = validate({**TINY, "canvas": {"kinds": {"healthy": 0, "infected": 0, "mixed": 1},
                                           "infected_share": rng_, "size": 448, "windows": 8}})
        comp = Composer(rec, "train", pools["train"])
        per_canvas = []
        for i in (0, 8, 16):
            objs = comp.scene(i)[3]["objects"]
            rbc = [o["class"] for o in objs if o["class"].endswith("_rbc")]
            per_canvas.append(rbc.count("infected_rbc") / len(rbc))
        shares[tuple(rng_)] = per_canvas
    assert max(shares[(0.02, 0.08)]) < 0.25 and min(shares[(0.85, 0.95)]) > 0.7, shares
    with pytest.raises(BloodcellsError, match="canvas.infected_share"):
        validate({"canvas": {"infected_share": [0.5, 1.2]}})
    with pytest.raises(BloodcellsError, match="canvas.infected_share"):
        validate({"canvas": {"infected_share": [0.4, 0.1]}})


def test_platelets_lie_on_red_cells_when_asked(builtin):
    """canvas.platelets_on_rbc: a platelet inside a share of the red cells, labelled thrombocyte, its own object."""
    _, pools, _ = builtin
    no_objects = {"coverage": "none", "count": [0, 0]}
    on = validate({**TINY, "objects": no_objects, "canvas": {"platelets_on_rbc": 0.5, "size": 448, "windows": 8}})
    off = validate({**TINY, "objects": no_objects, "canvas": {"size": 448, "windows": 8}})
    img_on, lab_on, inst_on, ann_on = Composer(on, "train", pools["train"]).scene(0)
    img_off, lab_off, _, ann_off = Composer(off, "train", pools["train"]).scene(0)
    plts = [o for o in ann_on["objects"] if o["class"] == "thrombocyte"]
    rbcs = [o for o in ann_on["objects"] if o["class"].endswith("_rbc")]
    assert not [o for o in ann_off["objects"] if o["class"] == "thrombocyte"]
    assert 0.25 * len(rbcs) < len(plts) < 0.8 * len(rbcs), (len(plts), len(rbcs))
    thr = NAMES.index("thrombocyte")
    for o in plts:  # each platelet is its own object, on red-cell pixels of the scene without it
        x0, y0, x1, y1 = o["bbox"]
        own = inst_on[y0:y1, x0:x1] == o["instance"]
        assert own.sum() == o["pixels"] and (lab_on[y0:y1, x0:x1][own] == thr).all()
    under = lab_off[lab_on == thr]
    assert np.isin(under, [NAMES.index("healthy_rbc"), NAMES.index("infected_rbc")]).mean() > 0.8
    with pytest.raises(BloodcellsError, match="platelets_on_rbc"):
        validate({"canvas": {"platelets_on_rbc": 1.5}})


def _from_source(sprites, source: str) -> list[Sprite]:
    """The same sprites, as if imported from another source."""
    return [Sprite(f"{s.id}-{source}", s.cls, s.rgba, s.diameter, s.split, source, s.background) for s in sprites]


def test_rbcs_of_a_canvas_come_from_one_source_per_canvas():
    """rbc_sources per_canvas: one source per canvas, so a source with both classes shows on healthy canvases too."""
    r = load_recipe("tiny", {**TINY, "canvas": {"rbc_sources": "per_canvas"}})
    pools, _ = sprite_pools(None, r)
    for cls in ("healthy_rbc", "infected_rbc"):  # two sources: one with both classes, one with healthy cells only
        pools["train"][cls] = _from_source(pools["train"][cls], "kaggle")
    pools["train"]["healthy_rbc"] += _from_source(pools["train"]["healthy_rbc"], "bccd")
    comp = Composer(r, "train", pools["train"])
    seen = {}
    for i in range(0, 24, 8):
        ann = comp.scene(i)[3]
        rbc_sources = {o["source"] for o in ann["objects"] if o["class"].endswith("_rbc")}
        assert rbc_sources == {ann["rbc_source"]}
        seen.setdefault(ann["kind"], set()).add(ann["rbc_source"])
    assert seen.get("infected", {"kaggle"}) == {"kaggle"}  # only kaggle has infected cells


def test_balanced_sources_draw_each_source_of_a_class_equally():
    """objects.sources balanced: a source with few cells of a type shows as often as one with many."""
    shares = {}
    for mode in ("any", "balanced"):
        r = load_recipe("tiny", {**TINY, "objects": {"sources": mode, "coverage": "none", "count": [3, 3],
                                                      "weights": {c: float(c == "neutrophil") for c in OBJECT_CLASSES}}})
        pools, _ = sprite_pools(None, r)
        neu = pools["train"]["neutrophil"]
        pools["train"]["neutrophil"] = _from_source(neu * 4, "many") + _from_source(neu[:2], "few")
        comp = Composer(r, "train", pools["train"])
        got = [o["source"] for i in range(24) for o in comp.scene(i)[3]["objects"] if o["class"] == "neutrophil"]
        assert len(got) >= 48, len(got)
        shares[mode] = got.count("few") / len(got)
    assert shares["any"] < 0.15 and 0.35 < shares["balanced"] < 0.65, shares
    with pytest.raises(BloodcellsError, match="objects.sources"):
        validate({"objects": {"sources": "even"}})


def test_background_fields_from_real_smears_become_the_plasma(builtin):
    """Canvases on a plasma field take its colour and gradient; labels do not change."""
    r, pools, _ = builtin
    field_rgba = np.zeros((64, 64, 4), np.uint8)
    field_rgba[..., 0] = np.linspace(150, 250, 64, dtype=np.uint8)[None, :]
    field_rgba[..., 1:3] = 200
    field_rgba[..., 3] = 255
    fields = {**pools["train"], "background": [Sprite("f", "background", field_rgba, 0.0)]}
    look = {"backgrounds": 1.0, "background_tone": 0, "illumination": 0, "noise": 0, "blur": [0, 0]}
    rec = validate({**TINY, "look": look})
    img, lab, _, _ = Composer(rec, "train", fields).scene(0)
    plain, lab2, _, _ = Composer(validate({**TINY, "look": {**look, "backgrounds": 0.0}}), "train",
                                 pools["train"]).scene(0)
    assert np.array_equal(lab, lab2)
    far = cv2.erode((lab == 0).astype(np.uint8), np.ones((7, 7), np.uint8)) > 0  # plasma away from cell edges
    spread = [np.subtract(*np.percentile(x[..., 0][far].astype(float), [95, 5])) for x in (img, plain)]
    assert spread[0] > 12 and spread[1] < 4, spread


def test_recipe_base_inherits_and_overrides(tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text("base: varied\nlook: {blend: alpha}\nscenes: {train: 5}\n")
    r = load_recipe(child)
    base = load_recipe("varied")
    assert r["name"] == "child" and r["look"]["blend"] == "alpha" and r["scenes"]["train"] == 5
    assert r["look"]["plasma"] == base["look"]["plasma"] and r["scenes"]["val"] == base["scenes"]["val"]
    loop = tmp_path / "loop.yaml"
    loop.write_text(f"base: {loop}\n")
    with pytest.raises(BloodcellsError, match="cycle"):
        load_recipe(loop)


def test_white_cells_cover_red_cells_and_black_rims_do_not_darken():
    """In optical density, a white cell hides the red cell below it (it pushes it aside), while red cells add;
    a crop cut out on black leaves no dark ring at its edge."""
    from bloodcells.composer.scene import place_sprite, sprite_density, to_colour

    rbc = _disk_sprite(10, cls="healthy_rbc", sid="r")
    rbc = Sprite("r", "healthy_rbc", rbc.rgba, rbc.diameter, background=(240.0, 240.0, 240.0))
    wbc = _disk_sprite(10, cls="lymphocyte", sid="w")
    wbc = Sprite("w", "lymphocyte", wbc.rgba, wbc.diameter, background=(240.0, 240.0, 240.0))
    prep = Prepared(0.0, "optical_density")
    look = {"stain_jitter": 0.0, "faint": 0.0}
    sizes = {"jitter": 0.0, "healthy_rbc": rbc.diameter, "lymphocyte": wbc.diameter}
    plasma = np.array([236, 222, 210], np.float32)
    alone = np.zeros((48, 48, 3), np.float32)
    place_sprite(alone, np.zeros((48, 48), np.uint8), np.random.default_rng(0), prep, wbc, sizes, look, 24, 24)
    stacked = np.zeros((48, 48, 3), np.float32)
    lab = np.zeros((48, 48), np.uint8)
    for s in (rbc, wbc):
        place_sprite(stacked, lab, np.random.default_rng(0), prep, s, sizes, look, 24, 24)
    assert np.allclose(to_colour(stacked, plasma)[24, 24], to_colour(alone, plasma)[24, 24], atol=0.5)
    assert lab[24, 24] == index_of("lymphocyte")
    # a cell cut out on black: its soft rim mixes in black; its density there stays within the cell's own
    rgba = np.zeros((30, 30, 4), np.uint8)
    cv2.circle(rgba, (15, 15), 10, (200, 150, 150, 255), -1)
    rgba[..., 3] = cv2.GaussianBlur(rgba[..., 3], (0, 0), 1.0)
    rgba[..., :3] = (rgba[..., :3].astype(np.float32) * (rgba[..., 3:] / 255.0)).astype(np.uint8)  # fades to black
    od = sprite_density(Sprite("k", "healthy_rbc", rgba, 20.0))
    inside = rgba[..., 3] >= 250
    assert od[rgba[..., 3] > 0].max() <= od[inside].max() + 1e-6


def test_show_puts_the_same_scenes_of_two_datasets_side_by_side(tiny_set, tmp_path):
    """One row per scene, one column per dataset (e.g. the same recipe with two blends)."""
    from bloodcells.composer.show import grid

    r = load_recipe("tiny", {**TINY, "look": {"blend": "alpha"}})
    pools, info = sprite_pools(None, r)
    compose(r, pools, tmp_path / "alpha", info, workers=1, progress=False)
    g = grid([tiny_set, tmp_path / "alpha"], "train", n=3)
    tile_w, tile_h, caption = 224 * 2 + 4 + 8, 224 + 8, 22
    assert g.shape[1] == 2 * tile_w and g.shape[0] > caption + 3 * tile_h
    left = g[caption:caption + tile_h, :tile_w]
    right = g[caption:caption + tile_h, tile_w:]
    assert not np.array_equal(left[4:228, 4:228], right[4:228, 4:228])  # the images differ (the blend) ...
    assert np.array_equal(left[4:228, 232:456], right[4:228, 232:456])  # ... their label maps are the same scene


def _textured_sprite(r: int = 14) -> Sprite:
    """A disc with a speckled inside (a chromatin-like texture), on no background."""
    rng = np.random.default_rng(3)
    rgba = np.zeros((2 * r + 5, 2 * r + 5, 4), np.uint8)
    cv2.circle(rgba, (r + 2, r + 2), r, (255, 255, 255, 255), -1)
    speckle = rng.integers(40, 160, (2 * r + 5, 2 * r + 5, 1)) * np.array([[[1.0, 0.6, 1.2]]])
    rgba[..., :3] = np.clip(speckle, 0, 255).astype(np.uint8) * (rgba[..., 3:] > 0)
    return Sprite("t", "lymphocyte", rgba, float(2 * r), background=(245.0, 245.0, 245.0))


@pytest.mark.parametrize("blend", ["optical_density", "alpha"])
def test_cell_look_changes_a_cells_stain_and_texture_but_never_its_outline(blend):
    """look.cell_stain / cell_texture: each object's own stain (HED) and blur or sharpening, inside the cell only."""
    from bloodcells.composer.scene import cell_look

    prep = Prepared(0.8, blend)
    pm, _ = prep.get(_textured_sprite(), 28.0)
    base = transform(pm, 1.0, 0.0, False)
    inside = base.alpha > 0.98
    same = cell_look(base, np.random.default_rng(0), 0.0, 0.0, prep.additive)
    assert np.allclose(same.rgb, base.rgb, atol=1e-3)  # both off: the cell as it was
    means, spreads = [], []
    for seed in range(16):
        out = cell_look(base, np.random.default_rng(seed), 0.25, 1.0, prep.additive)
        assert out.mask is base.mask and np.array_equal(out.alpha, base.alpha)  # the label cannot move
        assert not out.rgb[base.alpha <= 1e-3].any()  # nothing painted outside the cell
        assert np.isfinite(out.rgb).all() and (prep.additive or out.rgb.max() <= 255.0 + 1e-3)
        col = out.rgb[inside] / out.alpha[inside][:, None]
        means.append(col.mean(0))
        spreads.append(col.std(0).mean())
    ref = (base.rgb[inside] / base.alpha[inside][:, None])
    ref_spread = ref.std(0).mean()
    # stains differ from cell to cell; some cells come out smoother (blurred), some crisper (sharpened)
    assert np.ptp(np.array(means), axis=0).max() > 0.1 * (np.abs(ref.mean(0)).max() + 1e-6)
    assert min(spreads) < 0.8 * ref_spread and max(spreads) > 1.2 * ref_spread


def test_cell_look_is_off_by_default_and_checked(builtin, tmp_path):
    r, pools, _ = builtin
    assert r["look"]["cell_stain"] == 0 and r["look"]["cell_texture"] == 0
    on = load_recipe("tiny", {**TINY, "look": {"cell_stain": 0.25, "cell_texture": 1.0}})
    a = Composer(r, "train", pools["train"]).scene(0)
    b = Composer(on, "train", pools["train"]).scene(0)
    assert not np.array_equal(a[0], b[0])  # the recipe keys reach the scenes
    assert r["look"]["cell_hue"] == 0
    turned = Composer(load_recipe("tiny", {**TINY, "look": {"cell_hue": 30}}), "train", pools["train"]).scene(0)
    assert not np.array_equal(a[0], turned[0])
    for bad in ({"cell_stain": 1.0}, {"cell_stain": -0.1}, {"cell_texture": 5}):
        with pytest.raises(BloodcellsError, match="look.cell_"):
            validate({"look": bad})


@pytest.mark.parametrize("blend", ["optical_density", "alpha"])
def test_cell_hue_turns_a_cells_colours_about_the_grey_axis_within_its_range(blend):
    """look.cell_hue: each object's colours turned by up to that many degrees; brightness, alpha and mask kept."""
    from bloodcells.composer.scene import cell_look, hue_rotation

    yiq = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    assert np.allclose(hue_rotation(20.0) @ hue_rotation(-20.0), np.eye(3), atol=1e-5)
    assert np.allclose(hue_rotation(45.0) @ np.full(3, 100.0), 100.0, atol=1e-3)  # grey stays grey
    prep = Prepared(0.8, blend)
    pm, _ = prep.get(_textured_sprite(), 28.0)
    base = transform(pm, 1.0, 0.0, False)
    inside = base.alpha > 0.98

    def colour(layer):  # mean RGB inside the cell
        col = layer.rgb[inside] / layer.alpha[inside][:, None]
        return (256.0 * np.exp(-col) - 1.0 if prep.additive else col).mean(0)

    def angle(rgb):
        _, i, q = yiq @ rgb
        return np.degrees(np.arctan2(q, i))

    ref = colour(base)
    turns = []
    for seed in range(24):
        out = cell_look(base, np.random.default_rng(seed), 0.0, 0.0, prep.additive, hue=30.0)
        assert out.mask is base.mask and np.array_equal(out.alpha, base.alpha)  # the label cannot move
        assert not out.rgb[base.alpha <= 1e-3].any()
        c = colour(out)
        assert abs((yiq @ c)[0] - (yiq @ ref)[0]) < 3.0  # brightness kept
        turns.append((angle(c) - angle(ref) + 180.0) % 360.0 - 180.0)
    assert max(np.abs(turns)) <= 31.0 and min(turns) < -15.0 and max(turns) > 15.0, turns
    for bad in ({"cell_hue": 200}, {"cell_hue": -1}):
        with pytest.raises(BloodcellsError, match="look.cell_hue"):
            validate({"look": bad})


def test_rbc_look_gives_each_red_cell_look_its_own_stain_and_keeps_the_labels():
    """look.rbc_stain / rbc_texture: the red-cell looks a canvas draws get their own stain and sharpness, so a
    source's look does not stand for infected or healthy; the cells' outlines, so the labels, do not move."""
    from bloodcells.composer.scene import rbc_canvas

    spreads, labels = [], []
    for extra in ({}, {"rbc_stain": 0.25, "rbc_texture": 1.0}):
        rec = validate({**TINY, "canvas": {"density": 1.0, "overlap": -0.3},
                        "look": {"blend": "alpha", "stain_jitter": 0.0, **extra}})
        pools, _ = sprite_pools(None, rec)
        one = pools["train"]["healthy_rbc"][:1]  # one sprite: without the keys every cell looks the same
        c = rbc_canvas(np.random.default_rng(0), Prepared(0.8, "alpha"), 160, "healthy", one, [], rec)
        whole = [k for k, p in enumerate(c.placed, 1) if min(p.bbox[:2]) > 0 and max(p.bbox[2:]) < 160]
        means = np.array([c.img[c.inst == k].mean(0) for k in whole])
        spreads.append(float(means.std(0).max()))
        labels.append(int((c.label > 0).sum()))
    assert spreads[1] > 3 * spreads[0] + 1.0, spreads
    assert abs(labels[1] - labels[0]) < 0.1 * labels[0]  # the same density of cells; each keeps its outline
    for bad in ({"rbc_stain": 1.0}, {"rbc_stain": -0.1}, {"rbc_texture": 5}):
        with pytest.raises(BloodcellsError, match="look.rbc_"):
            validate({"look": bad})
