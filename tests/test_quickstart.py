"""The README's first command: the whole pipeline on the built-in default, with a tiny time budget."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_runs_end_to_end(tmp_path):
    out = tmp_path / "qs"
    r = subprocess.run([sys.executable, str(ROOT / "cli.py"), "quickstart", "--out", str(out), "--minutes", "0.1"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "test pixel accuracy" in r.stdout and str(out / "predictions.gif") in r.stdout
    assert (out / "data" / "dataset.json").is_file()
    assert (out / "run" / "last.pt").is_file() and (out / "run" / "test" / "metrics.json").is_file()
    header = (out / "predictions" / "counts.csv").read_text().splitlines()[0]
    assert header.startswith("image,scale,background,eosinophil")
    gif = Image.open(out / "predictions.gif")
    assert gif.n_frames == 24
