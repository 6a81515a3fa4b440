"""The Python API (bloodcells.load_model / predict / compose / train) on the built-in 'tiny' scenes."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import bloodcells as bc
from bloodcells.classes import NAMES
from bloodcells.errors import BloodcellsError
from bloodcells.formats import read_json
from bloodcells.imageio import read_rgb
from bloodcells.segmenter.infer import predict as infer_predict

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("tiny")
    return out, bc.compose("tiny", out)


@pytest.fixture(scope="module")
def run(scenes, tmp_path_factory) -> dict:
    data, _ = scenes
    return bc.train(data=data, out=tmp_path_factory.mktemp("runs") / "unet", epochs=1, width=8, steps_per_epoch=2,
                    batch_size=4, precision="fp32", progress=False)


@pytest.fixture(scope="module")
def model(run) -> bc.Model:
    return bc.load_model(run["best_path"], precision="fp32")


def test_compose_by_name_and_by_dict(scenes, tmp_path):
    data, summary = scenes
    assert summary["complete"] and summary["rendered"] == 80
    d = read_json(data / "dataset.json")
    assert d["counts"] == {"train": 48, "val": 16, "test": 16} and d["sprites"]["bank"] == "builtin"
    assert summary["dataset"]["class_weights"] == d["class_weights"]
    again = bc.compose("tiny", data)  # resumes: nothing left to render
    assert again["rendered"] == 0 and again["resumed_from"] == 80
    small = bc.compose({"name": "mini", "scenes": {"train": 2, "val": 1, "test": 1}, "canvas": {"size": 256,
                        "windows": 2}, "objects": {"coverage": "none"}}, tmp_path / "mini", seed=5)
    d = small["dataset"]
    assert d["name"] == "mini" and d["seed"] == 5 and d["counts"] == {"train": 2, "val": 1, "test": 1}
    with pytest.raises(BloodcellsError, match="no such recipe"):
        bc.compose("no-such-recipe", tmp_path / "x")


def test_train_summary_and_bad_settings(run, tmp_path):
    assert Path(run["best_path"]).is_file() and Path(run["last_path"]).is_file()
    assert run["epoch"] == 1 and run["global_step"] == 2 and len(run["history"]) == 1
    with pytest.raises(BloodcellsError, match=r"unknown setting\(s\) epoch; allowed: arch, width"):
        bc.train(data="x", out=tmp_path, epoch=3)
    with pytest.raises(BloodcellsError, match="dataset.json: not found"):
        bc.train(data=tmp_path / "none", out=tmp_path / "r", epochs=1)


def test_load_model_exposes_module_and_meta(model, scenes, run):
    data, _ = scenes
    d = read_json(data / "dataset.json")
    assert isinstance(model.module, torch.nn.Module) and not model.module.training
    assert model.config["arch"] == "unet" and model.config["width"] == 8
    assert model.mean == pytest.approx(tuple(d["mean"])) and model.std == pytest.approx(tuple(d["std"]))
    # the trainer stores the mean visible area per cell of the train split: healthy RBCs are ~37 px discs, partly hidden
    assert set(model.cell_area) == set(NAMES[1:])
    assert 300 < model.cell_area["healthy_rbc"] < 1100
    assert model.meta["best"]["epoch"] == run["best"]["epoch"]
    with pytest.raises(BloodcellsError, match="no such checkpoint"):
        bc.load_model(data / "missing.pt")


def test_predict_is_the_cli_prediction(model, scenes):
    data, _ = scenes
    image = read_rgb(data / "test" / "images" / "000003.png")
    r = bc.predict(model, image, scale=1)
    ref = infer_predict(model.module, model.meta, image, scale=1.0, precision="fp32", cell_area=model.predictor.areas)
    assert r.labels.dtype == np.uint8 and r.labels.shape == image.shape[:2]
    assert np.array_equal(r.labels, ref.labels) and r.scale == 1.0 and r.rbc_diameter is None
    assert r.counts == ref.counts and np.array_equal(r.instances, ref.cells.instances)
    assert list(r.counts) == list(r.class_names) and r.counts["background"] == 0
    # a file path, and a view with negative strides (as a flip or a BGR -> RGB slice makes), give the same answer
    assert np.array_equal(bc.predict(model, data / "test" / "images" / "000003.png", scale=1).labels, r.labels)
    view = np.ascontiguousarray(image[:, ::-1])[:, ::-1]
    assert view.strides[1] < 0 and np.array_equal(bc.predict(model, view, scale=1).labels, r.labels)


def test_absent_classes_are_never_predicted_and_nothing_else_changes(model, run, scenes):
    data, _ = scenes
    image = read_rgb(data / "test" / "images" / "000003.png")
    plain = bc.predict(model, image, scale=1)
    cls = np.bincount(plain.model_labels.ravel(), minlength=len(plain.class_names))
    cls[0] = 0
    absent = plain.class_names[int(cls.argmax())]  # the cell class the model predicts most here
    assert cls.max() > 0
    held = bc.predict(bc.load_model(run["best_path"], precision="fp32", absent=absent), image, scale=1)
    k = plain.class_names.index(absent)
    assert not (held.model_labels == k).any() and not (held.labels == k).any() and held.counts[absent] == 0
    assert all(c["class"] != absent for c in held.cells)
    elsewhere = plain.model_labels != k  # the other classes keep their order: the argmax stays where it was
    assert np.array_equal(held.model_labels[elsewhere], plain.model_labels[elsewhere])
    for bad, msg in (("nope", "unknown class 'nope'"), ("background", "unknown class")):
        with pytest.raises(BloodcellsError, match=msg):
            bc.load_model(run["best_path"], absent=bad)


def test_predict_other_sizes_and_auto_scale(model, scenes):
    data, _ = scenes
    image = read_rgb(data / "test" / "images" / "000001.png")
    big = cv2.resize(image, (358, 358), interpolation=cv2.INTER_LINEAR)  # RBCs 1.6x larger
    r = bc.predict(model, big, scale="auto")
    assert r.labels.shape == (358, 358) and r.model_labels is not None
    assert r.rbc_diameter is not None and 0.45 < r.scale < 0.8  # back towards 37 px RBCs
    assert set(np.unique(r.labels)) <= set(range(10))
    r2 = bc.predict(model, big, scale=0.5)
    assert r2.scale == 0.5 and r2.model_labels.shape == (179, 179)
    # one object per cell: the counts are the cells found, each with its row and its pixels in the instance map
    assert r2.method == "distance" and r2.instances.shape == (358, 358)
    assert r2.counts == {n: sum(c["class"] == n for c in r2.cells) for n in NAMES}
    assert [c["area_px"] for c in r2.cells] == np.bincount(r2.instances.ravel())[1:].tolist()
    assert r2.rbc_total == r2.counts["healthy_rbc"] + r2.counts["infected_rbc"]


@pytest.mark.parametrize("bad, message", [
    (np.zeros((64, 64, 3), np.float32), "expected uint8 pixels"),
    (np.zeros((64, 64), np.uint8), "grey image"),
    (np.zeros((64, 64, 1), np.uint8), "grey image"),
    (np.zeros((64, 64, 4), np.uint8), "drop the alpha channel"),
    (np.zeros((64, 64, 2), np.uint8), r"expected an RGB array \(H, W, 3\)"),
    ([[0, 0, 0]], "expected an RGB image as a numpy array"),
])
def test_bad_images_are_one_clear_error(model, bad, message):
    with pytest.raises(BloodcellsError, match=message) as e:
        bc.predict(model, bad)
    assert "\n" not in str(e.value)


def test_predict_needs_a_model(scenes):
    with pytest.raises(BloodcellsError, match="bloodcells.load_model"):
        bc.predict("runs/unet/best.pt", np.zeros((8, 8, 3), np.uint8))


def test_result_fields_can_grow():
    fields = [f.name for f in dataclasses.fields(bc.Result)]
    assert fields[:3] == ["labels", "counts", "scale"]
    # keyword-only: a field added later cannot shift the meaning of positional arguments
    with pytest.raises(TypeError):
        bc.Result(np.zeros((2, 2), np.uint8), {}, 1.0)  # type: ignore[misc]
    r = bc.Result(labels=np.zeros((2, 2), np.uint8), counts={}, scale=1.0)
    assert r.rbc_diameter is None and r.model_labels is None
