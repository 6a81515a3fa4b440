"""bench/plasma_tint.py on a user's folders: a bad argument is one usage line, an unreadable image is skipped."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "plasma_tint.py"


def tint(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)


def test_folder_without_a_name_is_one_usage_line(tmp_path):
    r = tint(str(tmp_path / "*.png"))
    assert r.returncode == 2 and "NAME=GLOB" in r.stderr and "Traceback" not in r.stderr


def test_unreadable_image_is_skipped_and_named(tmp_path):
    Image.fromarray(np.full((64, 64, 3), (236, 222, 210), np.uint8)).save(tmp_path / "good.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    r = tint(f"mylab={tmp_path}/*.png")
    assert r.returncode == 0, r.stderr
    assert "broken.png" in r.stderr and "Traceback" not in r.stderr
    assert "mylab" in r.stdout and "   1 images" in r.stdout
