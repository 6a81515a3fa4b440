"""ONNX export: ONNX Runtime gives the torch model's class map on composed scenes, at any size and batch."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from typer.testing import CliRunner

from bloodcells.classes import NAMES
from bloodcells.cli import app
from bloodcells.errors import BloodcellsError
from bloodcells.formats import DatasetInfo
from bloodcells.imageio import read_rgb
from bloodcells.segmenter.checkpoint import load_model, save_checkpoint
from bloodcells.segmenter.export import export_onnx
from bloodcells.segmenter.models import create_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def exported(scenes, tmp_path_factory) -> tuple[Path, Path]:
    """A random width-8 U-Net with the scenes' normalisation, saved as a checkpoint and exported by the CLI."""
    info = DatasetInfo.read(scenes)
    folder = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    save_checkpoint(folder / "best.pt", create_model("unet", width=8), info.mean, info.std, meta={})
    r = CliRunner().invoke(app, ["export-model", "--model", str(folder / "best.pt"), "--onnx", str(folder / "m.onnx")])
    assert r.exit_code == 0, r.output
    assert "channels 0..9 are the class logits" in r.output
    return folder / "best.pt", folder / "m.onnx"


def normalised(images: list[np.ndarray], mean: list[float], std: list[float]) -> np.ndarray:
    """What the graph takes: (N, 3, H, W) float32, RGB / 255 minus mean, divided by std."""
    x = np.stack(images).astype(np.float32) / 255.0
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def assert_same_classes(onnx_logits: np.ndarray, torch_logits: np.ndarray, k: int) -> None:
    """Equal argmax over the class channels wherever torch's top two logits are not a near-tie."""
    t = torch_logits[:, :k]
    top2 = np.sort(t, axis=1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 1e-4 * max(1.0, float(np.abs(t).max()))
    assert clear.mean() > 0.99
    same = onnx_logits[:, :k].argmax(axis=1) == t.argmax(axis=1)
    assert same[clear].all(), f"{(~same[clear]).sum()} pixels differ"


def test_metadata_tells_how_to_preprocess(exported):
    ckpt, path = exported
    _, meta = load_model(ckpt)
    model = onnx.load(str(path))
    props = {p.key: p.value for p in model.metadata_props}
    assert json.loads(props["mean"]) == pytest.approx(meta["mean"]) and json.loads(props["std"]) == pytest.approx(meta["std"])
    assert json.loads(props["classes"]) == list(NAMES) and props["num_classes"] == "10"
    assert json.loads(props["config"]) == meta["config"]
    assert [i.name for i in model.graph.input] == ["image"] and [o.name for o in model.graph.output] == ["logits"]
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param != "" for d in dims] == [True, False, True, True]  # batch, height, width are symbolic
    assert not list(path.parent.glob(".*.tmp"))


def test_onnx_runtime_matches_torch_on_composed_scenes(exported, scenes):
    ckpt, path = exported
    model, meta = load_model(ckpt)
    k = meta["config"]["num_classes"]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    images = [read_rgb(p) for p in sorted((scenes / "test" / "images").glob("*.png"))[:3]]
    # a full 224 x 224 scene, then a batch of two crops of another size: the axes are dynamic
    for batch in ([images[0]], [im[16:176, 32:128] for im in images[1:3]]):
        x = normalised(batch, meta["mean"], meta["std"])
        (out,) = session.run(None, {"image": x})
        with torch.no_grad():
            ref = model(torch.from_numpy(x)).numpy()
        assert out.shape == ref.shape == (len(batch), k, *batch[0].shape[:2])
        assert_same_classes(out, ref, k)


def test_missing_extra_is_one_line(exported, monkeypatch, tmp_path):
    ckpt, _ = exported
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # what an install without the extra looks like
    with pytest.raises(BloodcellsError, match=r"pip install 'bloodcells\[onnx\]'") as e:
        export_onnx(ckpt, tmp_path / "x.onnx")
    assert "\n" not in str(e.value) and "onnxscript" in str(e.value)
    assert not (tmp_path / "x.onnx").exists()


def test_exporter_failure_names_the_architecture(exported, monkeypatch, tmp_path):
    ckpt, _ = exported

    def fail(*args, **kwargs):
        raise RuntimeError("Unsupported operator 'aten::weird'\nlong trace ...")

    monkeypatch.setattr(torch.onnx, "export", fail)
    with pytest.raises(BloodcellsError, match="architecture 'unet' cannot be exported to ONNX") as e:
        export_onnx(ckpt, tmp_path / "x.onnx")
    assert "\n" not in str(e.value) and "aten::weird" in str(e.value)
