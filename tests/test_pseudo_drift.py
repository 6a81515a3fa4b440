"""bench/pseudo_drift.py: each round's pseudo-labels of a self-training run measured against boxes."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from bloodcells.classes import NAMES
from bloodcells.imageio import encode_png, write_bytes_atomic, write_png

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "pseudo_drift.py"


def _script():
    spec = importlib.util.spec_from_file_location("pseudo_drift", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_shares_outside_the_boxes_per_round_and_group(tmp_path):
    voc, run = tmp_path / "voc", tmp_path / "run"
    write_png(voc / "JPEGImages" / "s.png", np.full((100, 200, 3), 200, np.uint8))
    (voc / "Annotations").mkdir(parents=True)
    (voc / "Annotations" / "s.xml").write_text(  # at the image's scale; the run saw it at 0.5x
        "<annotation><filename>s.png</filename>"
        "<object><name>WBC</name><bndbox><xmin>0</xmin><ymin>0</ymin><xmax>40</xmax><ymax>40</ymax></bndbox></object>"
        "<object><name>RBC</name><bndbox><xmin>100</xmin><ymin>0</ymin><xmax>140</xmax><ymax>40</ymax></bndbox>"
        "</object></annotation>")
    wbc, rbc = NAMES.index("neutrophil"), NAMES.index("healthy_rbc")
    first = np.full((50, 100), 255, np.uint8)
    first[0:20, 0:20] = wbc  # 400 white-cell pixels, all inside the box (0..20 at 0.5x)
    first[0:20, 50:70] = rbc  # 400 red-cell pixels inside its box
    second = first.copy()
    second[30:50, 0:20] = wbc  # 400 more white-cell pixels, outside every white-cell box
    for r, lab in enumerate((first, second)):
        write_bytes_atomic(run / f"round-{r}" / "s.png", encode_png(lab))
    (run / "adapt.json").write_text(json.dumps({"factors": {"s": 0.5}, "log": [{}, {}]}))
    rows = _script().drift(run, voc, margin=0)
    assert [r["round"] for r in rows] == [1, 2]
    assert rows[0]["wbc"] == {"pixels": 400, "outside": 0.0} and rows[0]["rbc"] == {"pixels": 400, "outside": 0.0}
    assert rows[1]["wbc"] == {"pixels": 800, "outside": 0.5} and rows[1]["platelet"]["pixels"] == 0
    (voc / "Annotations" / "s.xml").unlink()
    with pytest.raises(SystemExit, match="no boxes for 1 of the run's images"):
        _script().drift(run, voc)
