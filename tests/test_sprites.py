"""Sprite bank: real imports of every source kind, layouts on made-up fixtures, bad input."""
from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest

from bloodcells.errors import BloodcellsError
from bloodcells.composer.aliases import AliasTable
from bloodcells.composer.bank import SpriteBank, assign_split, parse_fractions
from bloodcells.composer.sources import list_items

ROOT = Path(__file__).resolve().parents[1]
WBC = {"eosinophil", "basophil", "neutrophil", "lymphocyte", "monocyte"}


# ---- the real bank (built once; the composer tests reuse it) ------------------------------

def test_real_bank_has_every_cell_class(real_bank):
    bank, summaries = real_bank
    recs = bank.records()
    classes = {r["class"] for r in recs}
    assert classes == {"eosinophil", "basophil", "neutrophil", "lymphocyte", "monocyte", "thrombocyte",
                       "infected_rbc", "healthy_rbc"}
    train = Counter(r["class"] for r in recs if r["split"] == "train")
    for cls in classes - {"basophil"}:
        assert train[cls] >= 20, (cls, train[cls])
    assert train["basophil"] >= 1
    # every importer contributed
    assert {r["source"].split(":")[0] for r in recs} == {"kaggle", "masked", "crops", "mamic"}


def test_real_masks_have_plausible_coverage(real_bank):
    bank, _ = real_bank
    recs = bank.records()
    rng = np.random.default_rng(0)
    by_cls: dict[str, list[float]] = {}
    for i in rng.choice(len(recs), size=400, replace=False):
        r = recs[i]
        a = cv2.imread(str(bank.root / r["path"]), cv2.IMREAD_UNCHANGED)[..., 3]
        by_cls.setdefault(r["class"], []).append(float((a > 127).mean()))
    for cls, fr in by_cls.items():
        med = float(np.median(fr))
        # a round cell fills ~pi/4 of its bounding box; far less means a stray shape, more a box
        assert 0.55 < med < 0.95, (cls, med)
    # native diameters: thrombocytes are the smallest cells of every source
    med_d = {c: np.median([r["diameter"] for r in recs if r["class"] == c]) for c in {r["class"] for r in recs}}
    assert med_d["thrombocyte"] < min(med_d[c] for c in WBC)


def test_real_infected_crops_mostly_show_a_parasite(real_bank):
    """The malaria set's Parasitized crops nearly all show a stained body, a few do not (what `--min-parasite`
    rejects); its Uninfected crops almost never show one. By default every infected crop is kept."""
    from bloodcells.composer.cutter import NO_PARASITE, SUGGESTED_MIN_PARASITE
    from bloodcells.composer.masks import parasite_share

    bank, summaries = real_bank
    kaggle = next(s for s in summaries if s.source.startswith("kaggle"))
    assert kaggle.accepted["infected_rbc"] == 400 and kaggle.rejected[NO_PARASITE] == 0
    shares = {"infected_rbc": [], "healthy_rbc": []}
    for r in bank.records():
        if r["source"].startswith("kaggle"):
            a = cv2.cvtColor(cv2.imread(str(bank.root / r["path"]), cv2.IMREAD_UNCHANGED), cv2.COLOR_BGRA2RGBA)
            shares[r["class"]].append(parasite_share(a[..., :3], a[..., 3] > 127))
    unseen = np.mean(np.array(shares["infected_rbc"]) < SUGGESTED_MIN_PARASITE)
    assert 0.01 < unseen < 0.1, unseen
    assert np.mean(np.array(shares["healthy_rbc"]) >= SUGGESTED_MIN_PARASITE) < 0.05


def test_splits_are_per_source_image_and_stable(real_bank):
    bank, _ = real_bank
    for e in bank.entries():
        assert e["split"] == assign_split(e["key"])
    shares = Counter(e["split"] for e in bank.entries())
    n = sum(shares.values())
    assert abs(shares["train"] / n - 0.8) < 0.04 and abs(shares["test"] / n - 0.1) < 0.03


def test_bccd_test_split_is_never_cut(real_bank, datasets):
    bank, _ = real_bank
    test = set((datasets / "bccd/BCCD/ImageSets/Main/test.txt").read_text().split())
    cut = {Path(r["source_file"]).stem for r in bank.records() if r["source"].startswith("mamic")}
    assert cut and not (cut & test)


def test_reimport_adds_nothing(real_bank, datasets):
    bank, _ = real_bank
    before = bank.index_path.read_bytes()
    items = list_items("kaggle", datasets / "kaggle_malaria/cell_images", AliasTable())
    s = bank.import_items(items, "kaggle:cell_images", workers=1, progress=False)
    assert s.already == len(items) and not s.accepted
    assert bank.index_path.read_bytes() == before


# ---- layouts on fixtures the tests make ----------------------------------------------------

def _cell_image(rng, size=96, r=28, colour=(120, 40, 160)) -> tuple[np.ndarray, np.ndarray]:
    """A light smear patch with one stained round cell; returns (rgb, mask 0/255)."""
    img = np.full((size, size, 3), (235, 220, 205), np.uint8)
    img = np.clip(img + rng.normal(0, 3, img.shape), 0, 255).astype(np.uint8)
    mask = np.zeros((size, size), np.uint8)
    c = (size // 2 + int(rng.integers(-4, 5)), size // 2 + int(rng.integers(-4, 5)))
    cv2.circle(mask, c, r, 255, -1)
    img[mask > 0] = colour
    return img, mask


def _write(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), arr[..., ::-1] if arr.ndim == 3 else arr)


def test_lisc_layout(tmp_path):
    rng = np.random.default_rng(1)
    root = tmp_path / "LISC"
    for cls in ("Baso", "neut", "mixt"):
        for i in range(3):
            img, mask = _cell_image(rng)
            _write(root / "Main Dataset" / cls / f"{i}.bmp", img)
            _write(root / "Ground Truth Segmentation" / cls / "areaforexpert1" / f"{i}_expert.bmp", mask)
    bank = SpriteBank(tmp_path / "bank")
    s = bank.import_items(list_items("lisc", root, AliasTable()), "lisc:LISC", workers=1, progress=False)
    assert s.accepted == Counter({"basophil": 3, "neutrophil": 3})
    assert s.rejected["not a single cell type ('mixt')"] == 3
    for r in bank.records():
        assert r["mask"] == "given"
        assert abs(r["diameter"] - 57) < 3  # the given circle of radius 28


def test_masked_layout_with_csv_and_bad_files(tmp_path):
    rng = np.random.default_rng(2)
    root = tmp_path / "IUMC"
    for i in range(1, 5):
        img, mask = _cell_image(rng)
        _write(root / f"{i:03d}.bmp", img)
        _write(root / f"{i:03d}.png", mask)
    _write(root / "004.png", np.zeros((50, 50), np.uint8))  # mask of the wrong size
    (root / "005.bmp").write_bytes(b"not an image")  # corrupt image
    _write(root / "005.png", np.zeros((96, 96), np.uint8))
    (tmp_path / "labels.csv").write_text("image ID,class label\n1,2\n2,Baso\n3,weird\n4,1\n5,1\n")
    items = list_items("masked", root, AliasTable(), labels=tmp_path / "labels.csv")
    bank = SpriteBank(tmp_path / "bank")
    s = bank.import_items(items, "masked:IUMC", workers=1, progress=False)
    assert s.accepted == Counter({"lymphocyte": 1, "basophil": 1})
    assert s.rejected["mask size 50x50 differs from image 96x96"] == 1
    assert s.rejected["unreadable image"] == 1
    assert any(r.startswith("unknown class 'weird'") for r in s.rejected)


def test_iumc_class_folders_and_alias_override(tmp_path):
    rng = np.random.default_rng(3)
    root = tmp_path / "iumc"
    for i in range(2):
        img, mask = _cell_image(rng)
        _write(root / "Seg" / f"c{i}.jpg", img)
        _write(root / "Seg" / "masks" / f"c{i}.png", mask)
    items = list_items("iumc", root, AliasTable(AliasTable.parse(["Seg=neutrophil"])))
    s = SpriteBank(tmp_path / "b").import_items(items, "iumc", workers=1, progress=False)
    assert s.accepted == Counter({"neutrophil": 2})
    with pytest.raises(BloodcellsError, match="not a class"):
        AliasTable(AliasTable.parse(["Seg=banana"]))


def test_yolo_and_csv_boxes(tmp_path):
    root = tmp_path / "smears"
    img = np.full((200, 300, 3), (235, 220, 205), np.uint8)
    for (x, y) in [(60, 60), (150, 100), (240, 140)]:
        cv2.circle(img, (x, y), 22, (215, 160, 160), -1)
    _write(root / "images" / "s1.png", img)
    h, w = img.shape[:2]
    lines = [f"0 {x / w} {y / h} {50 / w} {50 / h}" for (x, y) in [(60, 60), (150, 100), (240, 140)]]
    (root / "labels").mkdir(parents=True)
    (root / "labels" / "s1.txt").write_text("\n".join(lines))
    (root / "classes.txt").write_text("RBC\n")
    s = SpriteBank(tmp_path / "b").import_items(list_items("boxes", root, AliasTable()), "yolo", workers=1, progress=False)
    assert s.accepted == Counter({"healthy_rbc": 3})
    # the same cells from a CSV
    csv_root = tmp_path / "csvsmears"
    _write(csv_root / "s1.png", img)
    (csv_root / "boxes.csv").write_text("image,xmin,ymin,xmax,ymax,label\n" +
                                        "".join(f"s1.png,{x - 25},{y - 25},{x + 25},{y + 25},Uninfected\n"
                                                for (x, y) in [(60, 60), (150, 100), (240, 140)]))
    s2 = SpriteBank(tmp_path / "c").import_items(list_items("boxes", csv_root, AliasTable()), "csv", workers=1, progress=False)
    assert s2.accepted == Counter({"healthy_rbc": 3})
    d = [r["diameter"] for r in SpriteBank(tmp_path / "c").records()]
    assert all(abs(x - 45) < 4 for x in d)


def _red_cell(parasite: bool) -> np.ndarray:
    img = np.zeros((100, 100, 3), np.uint8)
    cv2.circle(img, (50, 50), 40, (200, 150, 150), -1)
    if parasite:  # a ring-stage parasite: a small dark purple body
        cv2.circle(img, (40, 60), 4, (110, 40, 140), -1)
    return img


def test_black_background_crops(tmp_path):
    root = tmp_path / "cells"
    for cls in ("Parasitized", "Uninfected"):
        for i in range(3):
            _write(root / cls / f"{i}.png", _red_cell(parasite=cls == "Parasitized"))
    bank = SpriteBank(tmp_path / "bank")
    s = bank.import_items(list_items("kaggle", root, AliasTable()), "k", workers=1, progress=False)
    assert s.accepted == Counter({"infected_rbc": 3, "healthy_rbc": 3})
    assert all(abs(r["diameter"] - 81) < 3 for r in bank.records())


def test_an_infected_crop_without_a_parasite_is_rejected(tmp_path):
    from bloodcells.composer.cutter import NO_PARASITE
    from bloodcells.composer.masks import parasite_share

    cell = _red_cell(parasite=True)
    inside = cell.max(axis=2) > 12
    assert 0.005 < parasite_share(cell, inside) < 0.02  # the body: about 49 of 5,000 px
    assert parasite_share(_red_cell(parasite=False), inside) == 0.0
    for colour in ((90, 90, 90), (120, 70, 50), (150, 60, 60)):  # dark but not purple: debris, pigment, a fold
        speck = _red_cell(parasite=False)
        cv2.circle(speck, (40, 60), 4, colour, -1)
        assert parasite_share(speck, inside) == 0.0, colour
    root = tmp_path / "cells"
    _write(root / "Parasitized" / "seen.png", cell)
    _write(root / "Parasitized" / "unseen.png", _red_cell(parasite=False))
    _write(root / "Uninfected" / "clean.png", _red_cell(parasite=False))
    items = list_items("kaggle", root, AliasTable())
    s = SpriteBank(tmp_path / "bank").import_items(items, "k", workers=1, progress=False, min_parasite=0.002)
    assert s.accepted == Counter({"infected_rbc": 1, "healthy_rbc": 1})
    assert s.rejected == Counter({NO_PARASITE: 1})
    rejected = [e for e in SpriteBank(tmp_path / "bank").entries() if e["rejected"]]
    assert [Path(e["file"]).name for e in rejected] == ["unseen.png"]
    # from the command line too; by default (0) every infected crop is kept
    for bank, extra, infected in (("cli", ["--min-parasite", "0.002"], 1), ("all", [], 2)):
        r = subprocess.run([sys.executable, str(ROOT / "cli.py"), "sprites", "import", "kaggle", str(root), "--bank",
                            str(tmp_path / bank), "--workers", "1", *extra], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert Counter(rec["class"] for rec in SpriteBank(tmp_path / bank).records()) == \
            Counter({"infected_rbc": infected, "healthy_rbc": 1}), bank


def test_empty_and_missing_folders_are_clear_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(BloodcellsError, match="no images in class folders"):
        list_items("crops", tmp_path / "empty", AliasTable())
    with pytest.raises(BloodcellsError, match="no such folder"):
        list_items("kaggle", tmp_path / "nope", AliasTable())
    with pytest.raises(BloodcellsError, match="unknown importer"):
        list_items("zip", tmp_path / "empty", AliasTable())
    (tmp_path / "empty" / "Weird").mkdir()
    (tmp_path / "empty" / "Weird" / "a.png").write_bytes(b"junk")
    with pytest.raises(BloodcellsError, match="nothing usable"):
        SpriteBank(tmp_path / "b").import_items(list_items("crops", tmp_path / "empty", AliasTable()), "x",
                                                workers=1, progress=False)


def test_interrupted_import_resumes_consistently(tmp_path):
    root = tmp_path / "cells"
    for i in range(6):
        img = np.zeros((80, 80, 3), np.uint8)
        cv2.circle(img, (40, 40), 30, (200, 150, 150), -1)
        _write(root / "Uninfected" / f"{i}.png", img)
    items = list_items("kaggle", root, AliasTable())
    bank = SpriteBank(tmp_path / "bank")
    bank.import_items(items[:4], "k", workers=1, progress=False)
    # a crash mid-write: a torn last line, and an orphan PNG without its record
    with open(bank.index_path, "ab") as f:
        f.write(b'{"key": "cells/Uninfected/4.png", "spri')
    assert len(bank.entries()) == 4
    s = bank.import_items(items, "k", workers=1, progress=False)
    assert s.already == 4 and sum(s.accepted.values()) == 2
    assert len(bank.entries()) == 6 and len(bank.records()) == 6
    assert all(line.strip() for line in bank.index_path.read_text().splitlines())
    assert len({r["id"] for r in bank.records()}) == 6


def test_fractions_and_split_hash():
    assert parse_fractions("80/10/10") == (0.8, 0.1, 0.1)
    with pytest.raises(BloodcellsError, match="--split"):
        parse_fractions("80/20")
    keys = [f"ds/img{i}.png" for i in range(3000)]
    c = Counter(assign_split(k) for k in keys)
    assert abs(c["train"] / 3000 - 0.8) < 0.03
    # the split depends on the key alone, the same in every process and version (a salted hash would move them)
    assert "".join(assign_split(k)[0] for k in keys[:40]) == "tttvtttttvtttttvtttttvvttttvtttttvtttvtt"


def test_adding_a_source_moves_no_sprite_to_another_split(tmp_path):
    for src in ("a", "b"):
        for i in range(12):
            img = np.zeros((80, 80, 3), np.uint8)
            cv2.circle(img, (40, 40), 30, (200, 150, 150), -1)
            _write(tmp_path / src / "Uninfected" / f"{i}.png", img)
    a, b = (list_items("kaggle", tmp_path / src, AliasTable()) for src in ("a", "b"))
    alone, mixed = SpriteBank(tmp_path / "alone"), SpriteBank(tmp_path / "mixed")
    alone.import_items(a, "a", workers=1, fractions=(0.5, 0.25, 0.25), progress=False)
    mixed.import_items(b, "b", workers=1, fractions=(0.5, 0.25, 0.25), progress=False)
    mixed.import_items(a, "a", workers=1, fractions=(0.5, 0.25, 0.25), progress=False)
    split_of = {e["key"]: e["split"] for e in alone.entries()}
    assert len(split_of) == 12 and len(set(split_of.values())) > 1
    assert {e["key"]: e["split"] for e in mixed.entries() if e["key"] in split_of} == split_of


def test_cli_error_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "cli.py"), "sprites", "import", "crops", str(tmp_path / "missing"),
                        "--bank", str(tmp_path / "b")], capture_output=True, text=True)
    assert r.returncode == 1
    assert r.stderr.strip().count("\n") == 0 and "no such folder" in r.stderr


def test_cli_stats_and_sheet(real_bank, tmp_path):
    bank, _ = real_bank
    r = subprocess.run([sys.executable, str(ROOT / "cli.py"), "sprites", "stats", str(bank.root)],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "healthy_rbc" in r.stdout and "reserved" in r.stdout
    table = {ln.split("  ")[0].strip(): ln.split() for ln in r.stdout.splitlines() if ln.strip()}
    cells = sum(1 for rec in bank.records() if rec["class"] != "background")
    fields = sum(1 for rec in bank.records(fields=True) if rec["class"] == "background")
    assert fields > 0 and "total cells" in table and "plasma fields" in table
    assert int(table["total cells"][5]) == cells  # class, total, cells: train val test total
    assert int(table["plasma fields"][5]) == fields
    out = tmp_path / "sheet.png"
    r = subprocess.run([sys.executable, str(ROOT / "cli.py"), "sprites", "sheet", str(bank.root), "--out", str(out),
                        "--per-class", "4"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    sheet = cv2.imread(str(out))
    assert sheet.shape[0] >= 8 * 72  # a row per class present


def test_real_smears_give_plasma_fields_and_their_colour(real_bank):
    """Smears and crops on plasma (not cells cut out on black) record the plasma colour their cells were seen
    against, and give a cell-free background field per source image, split like its sprites."""
    bank, _ = real_bank
    recs = bank.records(fields=True)
    fields = [r for r in recs if r["class"] == "background"]
    by_source = Counter(r["source"].split(":")[0] for r in fields)
    assert by_source["mamic"] > 100 and by_source["crops"] > 100 and by_source["masked"] > 50
    assert "kaggle" not in by_source
    assert {r["split"] for r in fields} == {"train", "val", "test"}
    cells = [r for r in recs if r["class"] != "background"]
    assert all(r["background"] is None for r in cells if r["source"].startswith("kaggle"))
    coloured = [r for r in cells if not r["source"].startswith("kaggle")]
    assert all(r["background"] is not None for r in coloured)
    bccd = np.array([r["background"] for r in coloured if r["source"].startswith("mamic")])
    assert np.all(bccd.mean(axis=0) > 180)  # a light plasma, not a cell colour
    for r in fields[:20]:
        f = cv2.imread(str(bank.root / r["path"]), cv2.IMREAD_UNCHANGED)
        assert f.shape[2] == 4 and max(f.shape[:2]) == 96 and (f[..., 3] == 255).all()
        rgb = f[..., :3][..., ::-1].reshape(-1, 3).astype(float)
        assert np.abs(np.median(rgb, axis=0) - r["background"]).max() < 25  # the field is the plasma's colour
