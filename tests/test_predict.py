"""Prediction on real smears: tiling, scale, counting, rendering, the predict / colorize / evaluate-real commands."""
from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from bloodcells.classes import CLASSES, NAMES, NUM_CLASSES, colorize, index_of
from bloodcells.errors import BloodcellsError
from bloodcells.formats import Box, detect_box_layout, read_json, read_voc, read_wbc_subtypes, read_yolo
from bloodcells.imageio import read_gray, read_rgb, write_png
from bloodcells.segmenter.checkpoint import load_model, save_checkpoint
from bloodcells.segmenter.count import count_cells, expected_areas, resolve_areas, table_areas
from bloodcells.segmenter.infer import (Prediction, blend_window, estimate_rbc_diameter, parse_scale, predict,
                                        predict_logits, resize_image, tile_starts)
from bloodcells.segmenter.instances import CELL_COLUMNS, components
from bloodcells.segmenter.models import create_model
from bloodcells.segmenter.predict import COUNTS_HEADER, expand_inputs, output_stems
from bloodcells.segmenter.realeval import greedy_match, iou_matrix, score_image, subtype_of
from bloodcells.segmenter.render import side_by_side, video_info, write_mp4

HEALTHY = index_of("healthy_rbc")
PLAIN = {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A randomly initialised width-4 U-Net saved as a real checkpoint."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "best.pt"
    save_checkpoint(path, create_model("unet", width=4), [0.7, 0.6, 0.6], [0.2, 0.2, 0.2], meta={})
    return path


def pixelwise(seed: int = 0) -> nn.Module:
    """A 1x1 convolution: translation-equivariant, so tiling must not change its output."""
    torch.manual_seed(seed)
    return nn.Conv2d(3, NUM_CLASSES, 1).eval()


def colour_model() -> nn.Module:
    """A hand-set 1x1 convolution: red pixels -> healthy_rbc, white -> background (inputs 0..1, mean 0, std 1)."""
    conv = nn.Conv2d(3, NUM_CLASSES, 1)
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.fill_(-100.0)
        conv.weight[0, :, 0, 0] = torch.tensor([0.0, 10.0, 0.0])
        conv.bias[0] = 0.0
        conv.weight[HEALTHY, :, 0, 0] = torch.tensor([10.0, -10.0, 0.0])
        conv.bias[HEALTHY] = 0.0
    return conv.eval()


def direct(model: nn.Module, image: np.ndarray, meta: dict) -> np.ndarray:
    """Softmax of the model applied once to the whole image, in fp32."""
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255.0
    x = (x - torch.tensor(meta["mean"]).view(1, 3, 1, 1)) / torch.tensor(meta["std"]).view(1, 3, 1, 1)
    with torch.inference_mode():
        return torch.softmax(model(x), dim=1)[0].numpy()


def disks(size: tuple[int, int], centres: list[tuple[float, float]], radius: float, scale: int = 4) -> np.ndarray:
    """White RGB image with red discs, drawn anti-aliased (supersampled)."""
    h, w = size
    img = np.full((h * scale, w * scale, 3), 255, np.uint8)
    for x, y in centres:
        cv2.circle(img, (int(x * scale), int(y * scale)), int(radius * scale), (255, 0, 0), -1)
    return cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)


# ---- tiling ---------------------------------------------------------------------------------

def test_tile_layout_covers_every_pixel() -> None:
    assert tile_starts(224, 224, 0.25) == [0]
    s = tile_starts(500, 224, 0.25)
    assert s[0] == 0 and s[-1] == 500 - 224 and all(b - a <= 168 for a, b in zip(s, s[1:]))
    w = blend_window(224)
    assert w.shape == (224, 224) and w.max() <= 1.0 and w.min() > 0.01  # corners: 0.135^2
    assert w[112, 112] > 7 * w[0, 112] * 0.99


def test_single_tile_equals_direct_prediction(checkpoint) -> None:
    from bloodcells.segmenter.checkpoint import load_model

    model, meta = load_model(checkpoint)
    image = np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    ref = direct(model, image, meta)
    got = predict_logits(model, meta, image, precision="fp32")
    assert got.shape == (NUM_CLASSES, 224, 224) and got.dtype == np.float32
    np.testing.assert_allclose(got, ref, atol=1e-5)


@pytest.mark.parametrize("hw", [(380, 500), (100, 150), (225, 600), (224, 224)])
def test_tiling_equals_whole_image_for_a_translation_equivariant_model(hw) -> None:
    model = pixelwise()
    image = np.random.default_rng(1).integers(0, 256, (*hw, 3), dtype=np.uint8)
    got = predict_logits(model, PLAIN, image, tile=224, overlap=0.3, batch=3, precision="fp32")
    assert got.shape == (NUM_CLASSES, *hw)
    np.testing.assert_allclose(got, direct(model, image, PLAIN), atol=1e-5)
    np.testing.assert_allclose(got.sum(axis=0), 1.0, atol=1e-5)


def test_bf16_autocast_stays_close_to_fp32(checkpoint, scenes) -> None:
    from bloodcells.segmenter.checkpoint import load_model

    model, meta = load_model(checkpoint)
    image = read_rgb(next((scenes / "test" / "images").glob("*.png")))
    image = np.vstack([image, image[:100]])  # 324 x 224: two tiles with blending
    ref = predict_logits(model, meta, image, precision="fp32")
    low = predict_logits(model, meta, image, precision="bf16")
    diff = np.abs(low - ref)  # bf16 keeps 8 mantissa bits: small differences, a few near-ties flip
    assert diff.mean() < 0.002 and np.percentile(diff, 99) < 0.02 and diff.max() < 0.15
    assert (low.argmax(0) == ref.argmax(0)).mean() > 0.97


# ---- scale ----------------------------------------------------------------------------------

def test_auto_scale_recovers_known_rescales_of_composed_scenes(scenes) -> None:
    for path in sorted((scenes / "test" / "images").glob("*.png"))[:6]:
        image = read_rgb(path)
        d0 = estimate_rbc_diameter(image)
        assert 37 * 0.85 < d0 < 37 * 1.15, (path.name, d0)
        for f in (0.5, 1.6):
            ratio = estimate_rbc_diameter(resize_image(image, f)) / d0
            assert abs(ratio / f - 1) < 0.10, (path.name, f, ratio)


def test_auto_scale_on_real_bccd_smears_is_near_the_box_size(datasets) -> None:
    root = datasets / "bccd" / "BCCD"
    for im in read_voc(root, "test")[:3]:
        sides = [max(b.xyxy[2] - b.xyxy[0], b.xyxy[3] - b.xyxy[1]) for b in im.boxes if b.group == "rbc"]
        d = estimate_rbc_diameter(read_rgb(im.path))
        assert 0.65 < d / np.median(sides) < 1.25, (im.path.name, d, np.median(sides))


def test_auto_scale_refuses_crops_around_one_cell(datasets) -> None:
    """A crop filled by one white cell (Tecom's) shows no red cells: --scale auto says so instead of taking the
    white cell for a red one (a factor of about 0.46 instead of about 1); crops with red cells around are measured."""
    tecom = sorted((datasets / "wbc_tecom" / "Dataset 1").glob("*.bmp"))[:3]
    for path in tecom:
        with pytest.raises(BloodcellsError, match=r"120x120 px.*too few.*--scale FACTOR"):
            estimate_rbc_diameter(read_rgb(path))
    for path in sorted((datasets / "pbc" / "PBC_dataset_normal_DIB" / "neutrophil").glob("*.jpg"))[:3]:
        assert 60 < estimate_rbc_diameter(read_rgb(path)) < 130  # PBC's red cells, ~100 px at its 100x


def test_auto_scale_measures_large_smears_on_reduced_copies(scenes, monkeypatch) -> None:
    import bloodcells.segmenter.infer as infer

    from bloodcells.composer.dataset import Composer, sprite_pools
    from bloodcells.composer.recipe import validate

    # a 40x smear larger than the first look (RBCs of 37 px become small there) and the same smear enlarged 2.5x
    recipe = validate({"scene_size": 640, "canvas": {"size": 640, "windows": 1}, "builtin_per_class": 6,
                       "scenes": {"train": 1, "val": 0, "test": 0}})
    smear = Composer(recipe, "train", sprite_pools(None, recipe)[0]["train"]).scene(0)[0][:480]
    seen: list[int] = []
    signal = infer.cell_signal
    monkeypatch.setattr(infer, "cell_signal", lambda img: seen.append(img.shape[0] * img.shape[1]) or signal(img))
    d = estimate_rbc_diameter(smear)
    assert 37 * 0.9 < d < 37 * 1.1
    seen.clear()
    big = resize_image(smear, 2.5)
    assert abs(estimate_rbc_diameter(big) / d / 2.5 - 1) < 0.05
    # the enlarged smear's cells are large enough to be measured on copies of a fraction of its pixels
    assert seen and max(seen) < 0.2 * big.shape[0] * big.shape[1]


def test_scale_parsing_and_labels_at_input_size() -> None:
    assert parse_scale("auto") is None and parse_scale("0.36") == pytest.approx(0.36)
    for bad in ("0", "-1", "abc", "nan"):
        with pytest.raises(BloodcellsError, match="--scale"):
            parse_scale(bad)
    image = disks((150, 210), [(60, 70), (150, 80)], 37)
    p = predict(colour_model(), PLAIN, image, scale=0.5, precision="fp32")
    assert p.labels.shape == (150, 210) and p.model_labels.shape == (75, 105) and p.scale == 0.5
    truth = predict(colour_model(), PLAIN, image, scale=1.0, precision="fp32").labels
    assert (p.labels == truth).mean() > 0.98


# ---- counting -------------------------------------------------------------------------------

def test_counts_on_a_hand_made_map() -> None:
    lab = np.zeros((200, 240), np.uint8)
    cv2.circle(lab, (40, 40), 18, HEALTHY, -1)
    cv2.circle(lab, (110, 40), 18, HEALTHY, -1)  # two touching cells: one component of twice the area
    cv2.circle(lab, (147, 40), 18, HEALTHY, -1)
    cv2.circle(lab, (60, 140), 36, index_of("lymphocyte"), -1)
    cv2.circle(lab, (200, 150), 9, index_of("thrombocyte"), -1)
    lab[190:192, 10:12] = index_of("thrombocyte")  # a speck: far below 15% of a thrombocyte
    lab[5:7, 230:232] = index_of("monocyte")
    n, _ = cv2.connectedComponents((lab == HEALTHY).astype(np.uint8), connectivity=8)
    assert n - 1 == 2  # the touching pair really is one component
    counts = count_cells(lab)
    assert list(counts) == list(NAMES)
    assert counts["healthy_rbc"] == 3 and counts["lymphocyte"] == 1 and counts["thrombocyte"] == 1
    assert sum(counts.values()) == 5
    # with a learned (smaller, visible) area the touching pair splits into more cells
    assert count_cells(lab, {HEALTHY: 500.0})["healthy_rbc"] == 2 + 4


def test_expected_areas_from_dataset_json_and_fallbacks(scenes, tmp_path) -> None:
    ds = read_json(scenes / "dataset.json")
    areas = expected_areas(ds)
    px, obj = ds["class_pixels"]["train"], ds["object_counts"]["train"]
    assert areas[HEALTHY] == pytest.approx(px[HEALTHY] / obj[HEALTHY])
    assert areas[HEALTHY] < table_areas()[HEALTHY]  # visible area: overlaps hide part of each cell
    fake = {"class_pixels": {"train": [0] * 10}, "object_counts": {"train": [0] * 10}}
    assert expected_areas(fake) == table_areas()
    a, src = resolve_areas({"cell_area": {"healthy_rbc": 700}})
    assert src == "checkpoint" and a[HEALTHY] == 700 and a[1] == table_areas()[1]
    a, src = resolve_areas({}, scenes)
    assert src.startswith("dataset") and a == areas
    assert resolve_areas({})[1] == "class table"
    with pytest.raises(BloodcellsError, match="dataset.json"):
        resolve_areas({}, tmp_path)


def test_counts_are_taken_at_model_scale() -> None:
    centres = [(40, 40), (120, 40), (40, 130), (150, 120), (187, 120)]  # the last two touch
    small = disks((180, 240), centres, 18.5)
    model = colour_model()
    base = count_cells(predict(model, PLAIN, small, scale=1.0, precision="fp32").model_labels)
    assert base["healthy_rbc"] == 5
    big = resize_image(small, 2.0)  # the same smear at twice the magnification
    p = predict(model, PLAIN, big, scale=0.5, precision="fp32")
    assert p.labels.shape == big.shape[:2]
    assert count_cells(p.model_labels)["healthy_rbc"] == 5
    assert count_cells(p.labels)["healthy_rbc"] > 5  # the input-size map would need areas scaled by 1/factor^2


# ---- predict command ------------------------------------------------------------------------

def run(*args: str):
    from bloodcells.cli import app

    return CliRunner().invoke(app, list(args))


def test_predict_cli_writes_the_contract_and_resumes(checkpoint, scenes, tmp_path) -> None:
    src = tmp_path / "in"
    rng = np.random.default_rng(2)
    write_png(src / "a" / "smear.png", read_rgb(next((scenes / "test" / "images").glob("*.png"))))
    write_png(src / "b" / "smear.png", rng.integers(0, 256, (260, 300, 3), dtype=np.uint8))
    cv2.imwrite(str(src / "b" / "big.jpg"), rng.integers(0, 256, (230, 410, 3), dtype=np.uint8))
    (src / "b" / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "preds"
    r = run("predict", "--model", str(checkpoint), str(src / "a"), str(src / "b"), str(src / "none*.png"),
            "--out", str(out), "--precision", "fp32", "--no-progress")
    assert r.exit_code == 0, r.output
    assert "predicted 3" in r.output and "broken.png" in r.output and "none*.png" in r.output
    with open(out / "counts.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert tuple(rows[0]) == COUNTS_HEADER == ("image", "scale", *NAMES, "rbc_total", "parasitemia_pct", "cells")
    assert sorted(r[0] for r in rows[1:]) == ["b_smear", "big", "smear"]
    sizes = {"smear": (224, 224), "b_smear": (260, 300), "big": (230, 410)}
    for row in rows[1:]:
        stem = row[0]
        lab = read_gray(out / f"{stem}.png")
        assert lab.shape == sizes[stem] and lab.max() < NUM_CLASSES
        assert np.array_equal(read_rgb(out / f"{stem}_color.png"), colorize(lab))
        assert float(row[1]) == 1.0 and row[2] == "0" and all(v.isdigit() for v in row[2:12])
        assert int(row[12]) == int(row[10]) + int(row[11]) and row[14] == "area"  # a model without instance output
        inst = cv2.imread(str(out / f"{stem}_instances.png"), cv2.IMREAD_UNCHANGED)
        assert inst.dtype == np.uint16 and inst.shape == sizes[stem]
        with open(out / f"{stem}_cells.csv", newline="") as f:
            cells = list(csv.DictReader(f))
        assert len(cells) == int(inst.max()) and [int(c["id"]) for c in cells] == list(range(1, len(cells) + 1))
        for c in cells:  # each cell's pixels carry its class in the class map, its area and box are its pixels'
            ys, xs = np.nonzero(inst == int(c["id"]))
            assert int(c["area_px"]) == len(ys) and (lab[ys, xs] == NAMES.index(c["class"])).all()
            assert [int(c[k]) for k in ("x0", "y0", "x1", "y1")] == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        assert ((lab > 0) == (inst > 0)).all()
    # a re-run skips what is done; --force predicts again
    r = run("predict", "--model", str(checkpoint), str(src / "a"), str(src / "b" / "big.jpg"), "--out", str(out),
            "--no-progress")
    assert r.exit_code == 0 and "predicted 0, already done 2" in r.output, r.output
    r = run("predict", "--model", str(checkpoint), str(src / "b" / "big.jpg"), "--out", str(out), "--force",
            "--scale", "0.5", "--no-progress")
    assert "predicted 1" in r.output
    with open(out / "counts.csv", newline="") as f:
        rows = {r["image"]: r for r in csv.DictReader(f)}
    assert len(rows) == 3 and rows["big"]["scale"] == "0.5000"
    assert read_gray(out / "big.png").shape == (230, 410)
    assert not list(out.glob(".*tmp"))  # atomic writes leave no temporaries


def test_cells_of_a_model_with_an_instance_output(tmp_path, scenes) -> None:
    """A model with the distance output: its cells, counts, parasitaemia and outline rendering agree."""
    from bloodcells.segmenter.predict import load_predictor, predict_files

    torch.manual_seed(1)
    path = tmp_path / "inst.pt"
    save_checkpoint(path, create_model("unet", width=4, instance="distance"), [0.7, 0.6, 0.6], [0.2, 0.2, 0.2],
                    meta={})
    s = predict_files(path, [scenes / "test" / "images"], tmp_path / "p", precision="fp32", progress=False)
    assert len(s.done) == 16
    rows = _counts_rows(tmp_path / "p")
    for row in rows:
        with open(tmp_path / "p" / f"{row['image']}_cells.csv", newline="") as f:
            cells = list(csv.DictReader(f))
        assert row["cells"] == "distance"
        assert all(int(row[n]) == sum(c["class"] == n for c in cells) for n in NAMES[1:])
        rbc = int(row["infected_rbc"]) + int(row["healthy_rbc"])
        assert int(row["rbc_total"]) == rbc
        assert row["parasitemia_pct"] == ("" if rbc == 0 else str(round(100 * int(row["infected_rbc"]) / rbc, 2)))
    model, meta = load_model(path)
    image = read_rgb(scenes / "test" / "images" / "000002.png")
    pred = predict(model, meta, image, scale=1.0, precision="fp32")
    framed = side_by_side(image, pred.labels, layout="outline", instances=pred.cells.instances)
    drawn = np.any(framed[:224] != image, axis=2)
    assert drawn.any() and not drawn[pred.cells.instances == 0].any()  # outlines lie on the cells' own pixels
    # cells the model is less sure of than their class's limit are dropped, from the cells and the class map alike
    assert len(pred.cells) > 0
    unsure = predict(model, meta, image, scale=1.0, precision="fp32", min_confidence={c: 1.01 for c in range(1, 10)})
    assert len(unsure.cells) == 0 and not unsure.labels.any()
    # --sure-infected reaches the decoding (the least infected share of a red cell's probability)
    import bloodcells.segmenter.infer as infer

    seen = []
    real = infer.find_cells
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(infer, "find_cells", lambda *a, **k: seen.append(a[8]) or real(*a, **k))
        predict(model, meta, image, scale=1.0, precision="fp32")
        load_predictor(path, precision="fp32", sure_infected=0.6)(image, 1.0)
    assert seen == [None, 0.6]
    with pytest.raises(BloodcellsError, match="--sure-infected"):
        load_predictor(path, sure_infected=1.0)
    # --no-join and --platelet-confidence reach the decoding, and a folder predicted otherwise is predicted again
    seen.clear()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(infer, "find_cells", lambda *a, **k: seen.append(a[6:8]) or real(*a, **k))
        predict(model, meta, image, scale=1.0, precision="fp32")
        load_predictor(path, precision="fp32", join=False, platelet_confidence=0.5)(image, 1.0)
    platelets = {c.index for c in CLASSES if c.group == "platelet"}
    assert seen[0] == (None, None) and seen[1] == (False, {c: 0.5 for c in platelets})
    with pytest.raises(BloodcellsError, match="--platelet-confidence"):
        load_predictor(path, platelet_confidence=1.5)
    one = tmp_path / "one"
    one.mkdir()
    write_png(one / "a.png", image)
    r = run("predict", str(one), "--model", str(path), "--out", str(tmp_path / "q"), "--precision", "fp32",
            "--no-progress")
    assert r.exit_code == 0 and "predicted 1," in r.output, r.output
    r = run("predict", str(one), "--model", str(path), "--out", str(tmp_path / "q"), "--precision", "fp32",
            "--no-join", "--platelet-confidence", "0", "--no-progress")
    assert r.exit_code == 0 and "predicted 1," in r.output, r.output  # other settings: made again
    record = read_json(tmp_path / "q" / ".predict" / "a.json")
    assert record["key"]["join"] is False and record["key"]["platelet_confidence"] == 0


def test_instance_maps_beyond_16_bits_go_to_a_32_bit_tiff(tmp_path) -> None:
    from PIL import Image

    from bloodcells.segmenter.predict import write_instances

    few = np.arange(12, dtype=np.int32).reshape(3, 4)
    assert write_instances(tmp_path, "s", few) == "s_instances.png"
    many = np.arange(70000, dtype=np.int32).reshape(250, 280)
    assert write_instances(tmp_path, "s", many) == "s_instances.tif"
    assert not (tmp_path / "s_instances.png").exists()  # the stale 16-bit map is gone
    with Image.open(tmp_path / "s_instances.tif") as im:
        assert np.array_equal(np.asarray(im), many)


def _counts_rows(out: Path) -> list[dict[str, str]]:
    with open(out / "counts.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_predict_redoes_inputs_done_with_another_model_scale_or_options(checkpoint, tmp_path) -> None:
    from bloodcells.segmenter.predict import predict_files

    rng = np.random.default_rng(5)
    src = tmp_path / "in"
    for i in range(2):
        write_png(src / f"s{i}.png", rng.integers(0, 256, (96, 128, 3), dtype=np.uint8))
    out = tmp_path / "preds"
    torch.manual_seed(1)
    other = tmp_path / "other.pt"  # another model: same architecture and path length, other weights
    save_checkpoint(other, create_model("unet", width=4), [0.7, 0.6, 0.6], [0.2, 0.2, 0.2], meta={})
    go = dict(precision="fp32", progress=False)

    first = predict_files(checkpoint, [src], out, **go)
    assert sorted(first.done) == ["s0", "s1"] and not first.resumed
    maps = {s: read_gray(out / f"{s}.png") for s in ("s0", "s1")}
    assert sorted(predict_files(checkpoint, [src], out, **go).resumed) == ["s0", "s1"]
    # another checkpoint, scale or option: every input is predicted again and counts.csv follows
    assert sorted(predict_files(other, [src], out, **go).done) == ["s0", "s1"]
    assert any(not np.array_equal(read_gray(out / f"{s}.png"), maps[s]) for s in maps)
    assert sorted(predict_files(other, [src], out, scale="0.5", **go).done) == ["s0", "s1"]
    rows = _counts_rows(out)
    assert sorted(r["image"] for r in rows) == ["s0", "s1"] and {r["scale"] for r in rows} == {"0.5000"}
    assert sorted(predict_files(other, [src], out, scale="0.5", overlap=0.5, **go).done) == ["s0", "s1"]
    assert sorted(predict_files(other, [src], out, scale="0.5", overlap=0.5, balance=True, **go).done) == ["s0", "s1"]
    again = predict_files(other, [src], out, scale="0.5", overlap=0.5, balance=True, **go)
    assert not again.done and sorted(again.resumed) == ["s0", "s1"]
    # classes held absent change the maps: predicted again, and never in them
    dominant = int(np.bincount(read_gray(out / "s0.png").ravel(), minlength=NUM_CLASSES)[1:].argmax()) + 1
    held = predict_files(other, [src], out, scale="0.5", overlap=0.5, balance=True, absent=NAMES[dominant], **go)
    assert sorted(held.done) == ["s0", "s1"] and not (read_gray(out / "s0.png") == dominant).any()
    assert sorted(predict_files(other, [src], out, scale="0.5", overlap=0.5, balance=True, **go).done) == ["s0", "s1"]
    # a missing output file of one input makes only that input be predicted again
    (out / "s1_color.png").unlink()
    s = predict_files(other, [src], out, scale="0.5", overlap=0.5, balance=True, **go)
    assert s.done == ["s1"] and s.resumed == ["s0"]
    assert sorted(r["image"] for r in _counts_rows(out)) == ["s0", "s1"]


def test_counts_csv_is_written_per_run_not_per_image_and_survives_interruption(checkpoint, tmp_path,
                                                                               monkeypatch) -> None:
    import bloodcells.segmenter.predict as pred_mod

    rng = np.random.default_rng(6)
    src = tmp_path / "in"
    for i in range(5):
        write_png(src / f"s{i}.png", rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    out = tmp_path / "preds"
    writes = []
    atomic = pred_mod.write_bytes_atomic

    def counting(path, data):
        if Path(path).name == "counts.csv":
            writes.append(data.decode())
        atomic(path, data)

    monkeypatch.setattr(pred_mod, "write_bytes_atomic", counting)
    pred_mod.predict_files(checkpoint, [src], out, precision="fp32", progress=False)
    assert len(writes) <= 2  # once when the run starts (merging earlier records) and once at its end
    assert sorted(r["image"] for r in _counts_rows(out)) == [f"s{i}" for i in range(5)]

    # interrupted after two of five images of a new output folder
    calls = []
    cells_csv = pred_mod.cells_csv

    def interrupt(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return cells_csv(*args, **kwargs)

    monkeypatch.setattr(pred_mod, "cells_csv", interrupt)
    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        pred_mod.predict_files(checkpoint, [src], cut, precision="fp32", progress=False)
    monkeypatch.setattr(pred_mod, "cells_csv", cells_csv)
    s = pred_mod.predict_files(checkpoint, [src], cut, precision="fp32", progress=False)
    assert sorted(s.resumed) == ["s0", "s1"] and sorted(s.done) == ["s2", "s3", "s4"]
    rows = _counts_rows(cut)
    assert [r["image"] for r in rows] == [f"s{i}" for i in range(5)]  # each image once, in input order
    assert rows == _counts_rows(out)  # the same table as the uninterrupted run


def test_predict_cli_errors(checkpoint, tmp_path) -> None:
    r = run("predict", "--model", str(tmp_path / "missing.pt"), str(tmp_path), "--out", str(tmp_path / "o"))
    assert isinstance(r.exception, BloodcellsError) and "missing.pt: no such checkpoint" in str(r.exception)
    r = run("predict", "--model", str(checkpoint), str(tmp_path / "nothing*.png"), "--out", str(tmp_path / "o"))
    assert isinstance(r.exception, BloodcellsError) and "matches no image" in str(r.exception)
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 truncated")
    r = run("predict", "--model", str(checkpoint), str(tmp_path / "bad.jpg"), "--out", str(tmp_path / "o"))
    assert isinstance(r.exception, BloodcellsError) and "no input could be predicted" in str(r.exception)
    assert "bad.jpg: not a readable image" in r.output
    r = run("predict", "--model", str(checkpoint), str(tmp_path / "bad.jpg"), "--scale", "x")
    assert isinstance(r.exception, BloodcellsError) and "--scale" in str(r.exception)
    r = run("colorize", "--model", str(checkpoint), str(tmp_path), "--out", str(tmp_path / "r.avi"))
    assert isinstance(r.exception, BloodcellsError) and ".gif or .mp4" in str(r.exception)


def test_input_expansion_and_stems(tmp_path) -> None:
    for p in ("x/a.png", "x/b.jpg", "y/a.png", "y/notes.txt"):
        (tmp_path / p).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / p).write_bytes(b"")
    paths, problems = expand_inputs([tmp_path / "x", str(tmp_path / "y" / "*.png"), tmp_path / "x" / "a.png",
                                     tmp_path / "empty*.png"])
    assert [p.relative_to(tmp_path).as_posix() for p in paths] == ["x/a.png", "x/b.jpg", "y/a.png"]
    assert len(problems) == 1 and "empty*.png" in problems[0]
    assert output_stems(paths) == ["a", "b", "y_a"]
    assert output_stems([Path("a.png"), Path("a.jpg")]) == ["a", "a-2"]
    # stems are kept across runs: a source seen before keeps its stem, whatever else is given
    known = {"a": str(paths[2].resolve())}
    assert output_stems(paths[:2], known) == ["x_a", "b"]
    assert output_stems(paths, known) == ["x_a", "b", "a"]


# ---- rendering ------------------------------------------------------------------------------

def test_side_by_side_has_a_legend_of_present_classes() -> None:
    image = np.full((60, 80, 3), 200, np.uint8)
    lab = np.zeros((60, 80), np.uint8)
    lab[10:30, 10:30] = HEALTHY
    out = side_by_side(image, lab)
    assert out.shape[1] == 80 * 2 + 4 and out.shape[0] > 60
    assert np.array_equal(out[:60, 84:], colorize(lab))
    ov = side_by_side(image, lab, layout="overlay")
    assert ov.shape[1] == 80 and np.array_equal(ov[:10, :10], image[:10, :10])


def test_gif_keeps_class_colours_exact(tmp_path) -> None:
    from bloodcells.segmenter.render import write_gif

    rng = np.random.default_rng(5)
    lab = np.repeat(np.arange(NUM_CLASSES, dtype=np.uint8), 12)[None].repeat(40, axis=0)
    frames = [side_by_side(rng.integers(0, 256, (40, 120, 3), dtype=np.uint8), lab) for _ in range(2)]
    assert write_gif(tmp_path / "a.gif", frames, duration_ms=150) == 2
    with Image.open(tmp_path / "a.gif") as gif:
        assert gif.info["duration"] == 150
        back = np.array(gif.convert("RGB"))
    assert np.array_equal(back[:40, 124:], colorize(lab))  # the map half survives the 256-colour palette


def test_colorize_gif_mp4_and_video_input(checkpoint, tmp_path) -> None:
    rng = np.random.default_rng(3)
    src = tmp_path / "frames"
    for i, (h, w) in enumerate([(120, 160), (120, 160), (90, 200)]):
        write_png(src / f"f{i}.png", rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    common = ["--model", str(checkpoint), "--precision", "fp32", "--no-progress"]
    r = run("colorize", str(src), "--out", str(tmp_path / "r.gif"), "--fps", "5", *common)
    assert r.exit_code == 0 and "3 frames" in r.output, r.output
    with Image.open(tmp_path / "r.gif") as gif:
        assert gif.n_frames == 3 and gif.info.get("loop") == 0
        size = gif.size
        for k in range(3):
            gif.seek(k)
            assert gif.size == size and gif.info["duration"] == 200
    assert size[0] == 2 * 160 + 4
    r = run("colorize", str(src / "*.png"), "--out", str(tmp_path / "r.mp4"), "--fps", "4", *common)
    assert r.exit_code == 0, r.output
    n, fps, (w, h) = video_info(tmp_path / "r.mp4")
    assert n == 3 and fps == pytest.approx(4.0) and w == size[0] and h == size[1] + size[1] % 2
    cap = cv2.VideoCapture(str(tmp_path / "r.mp4"))
    ok, frame = cap.read()
    cap.release()
    assert ok and frame.shape[:2] == (h, w)
    # a video as input: every 2nd frame, at most 2 of them
    write_mp4(tmp_path / "clip.mp4", [rng.integers(0, 256, (64, 96, 3), dtype=np.uint8) for _ in range(7)], fps=10)
    assert video_info(tmp_path / "clip.mp4")[0] == 7
    r = run("colorize", str(tmp_path / "clip.mp4"), "--every", "2", "--max-frames", "2", "--out",
            str(tmp_path / "v.gif"), *common)
    assert r.exit_code == 0 and "2 frames" in r.output, r.output
    with Image.open(tmp_path / "v.gif") as gif:
        assert gif.n_frames == 2


# ---- evaluation on real smears ----------------------------------------------------------------

def test_matching_counts_on_a_hand_made_box_case() -> None:
    lab = np.zeros((200, 300), np.uint8)
    gt = [Box("RBC", (10, 10, 50, 50)), Box("RBC", (100, 10, 140, 50)),
          Box("RBC", (200, 10, 240, 50)), Box("WBC", (20, 100, 100, 180)), Box("Foo", (0, 0, 5, 5))]
    lab[12:50, 12:48] = HEALTHY  # matches box 1
    lab[10:52, 104:140] = index_of("infected_rbc")  # matches box 2 (same group)
    lab[150:190, 200:240] = HEALTHY  # a false positive; box 3 is missed
    lab[100:180, 20:100] = index_of("neutrophil")
    lab[100:120, 20:100] = index_of("lymphocyte")  # the majority stays neutrophil
    lab[195:197, 290:292] = HEALTHY  # a speck, dropped
    specks = {c.index: {"rbc": 50, "wbc": 100, "platelet": 10}[c.group] for c in CLASSES[1:]}
    s = score_image(components(lab, specks), gt, iou=0.3, subtype="neutrophil")
    assert s["rbc"] == {"tp": 2, "fp": 1, "fn": 1, "gt": 3, "pred": 3}
    assert s["wbc"] == {"tp": 1, "fp": 0, "fn": 0, "gt": 1, "pred": 1}
    assert s["platelet"]["gt"] == 0 and s["subtypes"] == [("neutrophil", "neutrophil")]
    from bloodcells.segmenter.realeval import rates
    r = rates(**{k: s["rbc"][k] for k in ("tp", "fp", "fn")})
    assert r["recall"] == pytest.approx(2 / 3) and r["precision"] == pytest.approx(2 / 3)
    assert r["f1"] == pytest.approx(2 / 3)


def test_iou_and_greedy_matching() -> None:
    a = np.array([[0, 0, 10, 10], [5, 0, 15, 10]], float)
    b = np.array([[0, 0, 10, 10], [20, 20, 30, 30]], float)
    iou = iou_matrix(a, b)
    assert iou[0, 0] == 1.0 and iou[1, 0] == pytest.approx(50 / 150) and iou[:, 1].max() == 0
    assert greedy_match(iou, 0.3) == [(0, 0)]
    assert greedy_match(np.array([[0.5, 0.6], [0.9, 0.0]]), 0.3) == [(1, 0), (0, 1)]
    assert iou_matrix(np.zeros((0, 4)), b).shape == (0, 2)


def test_voc_reading_subtypes_and_evaluate_real_cli(checkpoint, tmp_path, monkeypatch) -> None:
    root = tmp_path / "voc"
    rng = np.random.default_rng(4)
    objs = {"BloodImage_00003": [("RBC", 10, 10, 60, 60), ("WBC", 100, 80, 200, 180), ("Platelets", 5, 150, 25, 170)],
            "BloodImage_00010": [("RBC", 30, 30, 90, 90), ("Weird", 1, 1, 9, 9)]}
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (root / sub).mkdir(parents=True)
    for stem, boxes in objs.items():
        cv2.imwrite(str(root / "JPEGImages" / f"{stem}.jpg"), rng.integers(0, 256, (200, 240, 3), dtype=np.uint8))
        xml = "".join(f"<object><name>{n}</name><bndbox><xmin>{a}</xmin><ymin>{b}</ymin><xmax>{c}</xmax>"
                      f"<ymax>{d}</ymax></bndbox></object>" for n, a, b, c, d in boxes)
        (root / "Annotations" / f"{stem}.xml").write_text(
            f"<annotation><filename>{stem}.jpg</filename>{xml}</annotation>")
    (root / "ImageSets" / "Main" / "test.txt").write_text("BloodImage_00003\nBloodImage_00010\n")
    csv_path = tmp_path / "subtypes.csv"
    csv_path.write_text(',Image,Category\n,3,NEUTROPHIL\n,10,"NEUTROPHIL, EOSINOPHIL"\n,11,\n')
    images = read_voc(root, "test")
    assert [len(i.boxes) for i in images] == [3, 2] and images[1].boxes[1].group is None
    sub = read_wbc_subtypes(csv_path)
    assert subtype_of("BloodImage_00003.jpg", sub) == "neutrophil"
    assert subtype_of("BloodImage_00010.jpg", sub) is None and subtype_of("BloodImage_00011.jpg", sub) is None
    # a broken annotation costs its image, not the run
    (root / "Annotations" / "BloodImage_00020.xml").write_text("<annotation><object>")
    (root / "ImageSets" / "Main" / "test.txt").write_text("BloodImage_00003\nBloodImage_00010\nBloodImage_00020\n")
    out = tmp_path / "real"
    r = run("evaluate-real", "--model", str(checkpoint), "--voc", str(root), "--split", "test", "--scale", "1",
            "--wbc-labels", str(csv_path), "--out", str(out), "--precision", "fp32", "--no-progress")
    assert r.exit_code == 0, r.output
    assert "rbc" in r.output and "Weird 1" in r.output
    m = read_json(out / "metrics.json")
    assert m["images"] == 2 and m["unknown_labels"] == {"Weird": 1} and m["matching"]["iou"] == 0.3
    assert len(m["failed"]) == 1 and "BloodImage_00020.xml: unreadable VOC annotation" in m["failed"][0]
    assert {g: m["groups"][g]["gt"] for g in ("rbc", "wbc", "platelet")} == {"rbc": 2, "wbc": 1, "platelet": 1}

    # the same command with maps whose matches are known: per smear, in the order of test.txt
    def painted(stem: str) -> np.ndarray:
        lab = np.zeros((200, 240), np.uint8)
        if stem == "BloodImage_00003":
            lab[12:58, 12:58] = HEALTHY  # its RBC box: a match
            lab[82:178, 102:198] = index_of("neutrophil")  # its WBC box: a match, of the listed subtype
            lab[10:50, 180:220] = HEALTHY  # no box there: a false positive; its platelet box is missed
        else:
            lab[32:88, 32:88] = index_of("infected_rbc")  # its RBC box: a match (RBCs are one group)
            lab[150:160, 150:160] = index_of("thrombocyte")  # no platelet box there: a false positive
            lab[5:9, 200:204] = index_of("thrombocyte")  # a speck below the smallest platelet: ignored
        return lab

    class Painter:
        areas, areas_source, meta = table_areas(), "class table", {"config": {}}

        def __init__(self) -> None:
            self.stems = iter(["BloodImage_00003", "BloodImage_00010"])

        def __call__(self, image: np.ndarray, scale: float | None) -> Prediction:
            lab = painted(next(self.stems))
            cells = components(lab, {c: 0.15 * a for c, a in self.areas.items()})
            return Prediction(lab, lab, 1.0, cells=cells)

    import bloodcells.segmenter.realeval as realeval
    monkeypatch.setattr(realeval, "load_predictor", lambda *args, **kwargs: Painter())
    r = run("evaluate-real", "--model", str(checkpoint), "--voc", str(root), "--split", "test", "--scale", "1",
            "--wbc-labels", str(csv_path), "--out", str(out), "--no-progress")
    assert r.exit_code == 0, r.output
    m = read_json(out / "metrics.json")
    counts = {g: {k: m["groups"][g][k] for k in ("gt", "pred", "tp", "fp", "fn")} for g in ("rbc", "wbc", "platelet")}
    assert counts == {"rbc": {"gt": 2, "pred": 3, "tp": 2, "fp": 1, "fn": 0},
                      "wbc": {"gt": 1, "pred": 1, "tp": 1, "fp": 0, "fn": 0},
                      "platelet": {"gt": 1, "pred": 1, "tp": 0, "fp": 1, "fn": 1}}
    assert m["groups"]["rbc"]["precision"] == pytest.approx(2 / 3) and m["groups"]["platelet"]["f1"] == 0
    assert m["wbc_subtype"]["matched_with_subtype"] == 1 and m["wbc_subtype"]["correct"] == 1
    monkeypatch.undo()
    r = run("evaluate-real", "--model", str(checkpoint), "--voc", str(root), "--split", "nope")
    assert isinstance(r.exception, BloodcellsError) and "nope.txt" in str(r.exception)
    r = run("evaluate-real", "--model", str(checkpoint))
    assert isinstance(r.exception, BloodcellsError) and "--voc" in str(r.exception)


def test_bccd_layout_reads(datasets) -> None:
    root = datasets / "bccd" / "BCCD"
    images = read_voc(root, "test")
    assert len(images) == 72 and all(i.path.is_file() for i in images)
    groups = {b.group for i in images for b in i.boxes}
    assert groups <= {"rbc", "wbc", "platelet"}
    sub = read_wbc_subtypes(datasets / "bccd" / "wbc_subtype_labels_mooney.csv")
    named = {subtype_of(f"BloodImage_{int(k):05d}.jpg", sub) for k, s in sub.entries.items() if s.name}
    assert len([s for s in sub.entries.values() if s.name]) > 300
    assert named == {"neutrophil", "eosinophil", "lymphocyte", "monocyte", "basophil"}


def test_yolo_layout_reads_boxes_in_pixels(tmp_path) -> None:
    (tmp_path / "images" / "test").mkdir(parents=True)
    (tmp_path / "labels" / "test").mkdir(parents=True)
    (tmp_path / "classes.txt").write_text("Platelets\nRBC\nWBC\nblob\n")
    cv2.imwrite(str(tmp_path / "images" / "test" / "s1.png"), np.zeros((100, 200, 3), np.uint8))
    (tmp_path / "labels" / "test" / "s1.txt").write_text("1 0.5 0.5 0.2 0.4\n2 0.25 0.25 0.1 0.1\n3 0.1 0.1 0.1 0.1\n")
    assert detect_box_layout(tmp_path) == "yolo"
    (im,) = read_yolo(tmp_path, "test")
    assert [b.group for b in im.boxes] == ["rbc", "wbc", None]
    assert im.boxes[0].xyxy == pytest.approx((80, 30, 120, 70))
    with pytest.raises(BloodcellsError, match="--split all"):
        read_yolo(tmp_path, "val")


def test_predict_names_smears_on_a_tinted_ground_and_balance_silences_it(checkpoint, tmp_path) -> None:
    """A yellow ground (Tecom's, far from any plasma of the scenes) is named in the summary and the CLI's note;
    a cream one is not; with --balance none is. The tint ignores brightness."""
    from bloodcells.classes import PLASMA_RGB
    from bloodcells.segmenter.infer import TINT_LIMIT, plasma_tint
    from bloodcells.segmenter.predict import predict_files

    src = tmp_path / "in"
    for name, ground in (("cream", (230, 214, 205)), ("yellow", (250, 235, 152))):
        img = np.full((96, 128, 3), ground, np.uint8)
        cv2.circle(img, (40, 50), 18, (160, 90, 120), -1)
        write_png(src / f"{name}.png", img)
    plasma = np.full((40, 40, 3), PLASMA_RGB, np.uint8)
    assert plasma_tint(plasma) < 0.01 and plasma_tint((plasma * 0.6).astype(np.uint8)) < 0.02
    assert plasma_tint(read_rgb(src / "cream.png")) < TINT_LIMIT < plasma_tint(read_rgb(src / "yellow.png"))
    go = dict(precision="fp32", progress=False)
    assert predict_files(checkpoint, [src], tmp_path / "a", **go).tinted == ["yellow"]
    assert predict_files(checkpoint, [src], tmp_path / "b", balance=True, **go).tinted == []
    r = run("predict", str(src), "--model", str(checkpoint), "--out", str(tmp_path / "c"), "--no-progress",
            "--precision", "fp32")
    assert r.exit_code == 0 and "1 of 2 images (e.g. yellow)" in r.output and "--balance" in r.output


def test_balance_background_takes_the_plasma_colour():
    from bloodcells.classes import PLASMA_RGB
    from bloodcells.segmenter.infer import balance_background

    img = np.full((60, 80, 3), (200, 210, 230), np.uint8)  # a bluish smear background
    img[20:40, 20:40] = (150, 100, 120)  # a cell
    out = balance_background(img)
    assert np.abs(out[0, 0].astype(float) - np.array(PLASMA_RGB)).max() <= 1
    # the cell keeps its contrast to the background, channel by channel
    assert (out[30, 30] < out[0, 0]).all()


def test_tta_leaves_a_flip_invariant_model_unchanged_and_averages_others() -> None:
    from bloodcells.segmenter.infer import tta_logits
    from bloodcells.segmenter.runtime import Runtime

    image = np.random.default_rng(3).integers(0, 256, (96, 128, 3), dtype=np.uint8)
    plain = predict_logits(pixelwise(), PLAIN, image, tile=64, overlap=0.25, precision="fp32")
    tta = predict_logits(pixelwise(), PLAIN, image, tile=64, overlap=0.25, precision="fp32", tta=True)
    assert np.allclose(plain, tta, atol=1e-5)  # a 1x1 convolution does not care about flips or turns
    torch.manual_seed(0)
    unet = create_model("unet", width=4, instance="distance").eval()
    a = predict_logits(unet, PLAIN, image, tile=64, precision="fp32")
    b = predict_logits(unet, PLAIN, image, tile=64, precision="fp32", tta=True)
    assert a.shape == b.shape == (NUM_CLASSES + 1, 96, 128) and not np.allclose(a, b, atol=1e-3)
    assert np.allclose(b[:NUM_CLASSES].sum(axis=0), 1, atol=1e-4) and 0 <= b[NUM_CLASSES].min() <= b.max() <= 1
    x = torch.randn(2, 3, 64, 64)
    rt = Runtime(torch.device("cpu"), "fp32", channels_last=False)
    logits = tta_logits(unet, x, rt, NUM_CLASSES)  # what cli evaluate --tta scores: softmax gives the averages
    manual = torch.zeros(2, NUM_CLASSES, 64, 64)
    with torch.no_grad():
        for k in range(8):
            t = (x.flip(-1) if k & 1 else x).rot90(k >> 1, (-2, -1))
            p = torch.softmax(unet(t)[:, :NUM_CLASSES], 1).rot90(-(k >> 1), (-2, -1))
            manual += (p.flip(-1) if k & 1 else p) / 8
    assert torch.allclose(torch.softmax(logits[:, :NUM_CLASSES], 1), manual, atol=1e-5)


def test_a_smear_without_cells_is_an_empty_table(tmp_path) -> None:
    from bloodcells.segmenter.predict import predict_files

    torch.manual_seed(0)
    model = create_model("unet", width=4, instance="distance")
    with torch.no_grad():
        model.head.bias[0] = 50.0  # background everywhere
    save_checkpoint(tmp_path / "bg.pt", model, [0.7, 0.6, 0.6], [0.2, 0.2, 0.2], meta={})
    write_png(tmp_path / "in" / "blank.png", np.full((120, 160, 3), 230, np.uint8))
    s = predict_files(tmp_path / "bg.pt", [tmp_path / "in"], tmp_path / "out", precision="fp32", progress=False)
    assert s.done == ["blank"] and not s.failed
    assert (tmp_path / "out" / "blank_cells.csv").read_text().splitlines() == [",".join(CELL_COLUMNS)]
    assert cv2.imread(str(tmp_path / "out" / "blank_instances.png"), cv2.IMREAD_UNCHANGED).max() == 0
    row = _counts_rows(tmp_path / "out")[0]
    assert all(row[n] == "0" for n in NAMES) and row["rbc_total"] == "0" and row["parasitemia_pct"] == ""


def test_small_images_are_padded_with_their_plasma_not_a_mirror() -> None:
    """A smear smaller than a tile is padded with its plasma colour: mirrored, a cell cut by the edge would become
    a doubled cell that no training scene shows."""
    from bloodcells.segmenter.infer import pad_to_tile, plasma_colour

    plasma = (230, 220, 210)
    img = np.full((100, 150, 3), plasma, np.uint8)
    cv2.circle(img, (140, 92), 20, (120, 60, 150), -1)  # a cell cut by the bottom-right corner
    assert np.array_equal(plasma_colour(img), plasma)
    out = pad_to_tile(img, 224)
    assert out.shape == (224, 224, 3) and np.array_equal(out[:100, :150], img)
    assert (out[100:] == plasma).all() and (out[:, 150:] == plasma).all()
    assert pad_to_tile(np.zeros((224, 300, 3), np.uint8), 224).shape == (224, 300, 3)  # large enough: as it is


def test_crop_typing_scores_the_centre_cell_and_passes_white_balance(tmp_path, monkeypatch) -> None:
    """evaluate_crops (bench/loso.py's typing score): the white cell at each crop's centre, its type against the
    crop's; a crop whose centre holds no white cell counts as not found; an unreadable crop is listed, not fatal;
    `balance` reaches the predictor."""
    import bloodcells.segmenter.realeval as realeval

    shown = {"a": "neutrophil", "b": "lymphocyte", "c": "neutrophil", "d": None}  # what the "model" paints
    items = []
    for stem, truth in (("a", "neutrophil"), ("b", "neutrophil"), ("c", "neutrophil"), ("d", "lymphocyte")):
        write_png(tmp_path / f"{stem}.png", np.full((60, 60, 3), 200, np.uint8))
        items.append((tmp_path / f"{stem}.png", truth))
    (tmp_path / "e.png").write_bytes(b"not a png")
    items.append((tmp_path / "e.png", "monocyte"))
    seen: dict = {}

    class Painter:
        def __init__(self) -> None:
            self.stems = iter("abcd")

        def __call__(self, image: np.ndarray, scale: float | None) -> Prediction:
            lab = np.zeros(image.shape[:2], np.uint8)
            lab[5:15, 5:15] = HEALTHY  # a red cell in the corner, never the crop's cell
            cls = shown[next(self.stems)]
            if cls is not None:
                lab[15:45, 15:45] = index_of(cls)
            cells = components(lab, {c: 0.15 * a for c, a in table_areas().items()})
            return Prediction(lab, lab, 1.0, cells=cells)

    def loader(*args, **kwargs):
        seen.update(kwargs)
        return Painter()

    monkeypatch.setattr(realeval, "load_predictor", loader)
    r = realeval.evaluate_crops("m.pt", items, scale=1.0, progress=False, balance=True)
    assert seen["balance"] is True and r["balance"] is True
    assert r["images"] == 4 and len(r["failed"]) == 1 and "e.png" in r["failed"][0]
    assert r["accuracy"] == pytest.approx(0.5) and r["found"] == pytest.approx(0.75)
    assert r["per_class"] == {"neutrophil": {"n": 3, "accuracy": pytest.approx(2 / 3)},
                              "lymphocyte": {"n": 1, "accuracy": 0.0}}
    assert r["confusion"] == {"lymphocyte->none": 1, "neutrophil->lymphocyte": 1, "neutrophil->neutrophil": 2}
