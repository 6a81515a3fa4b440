"""Every error a user can cause prints one line ('error: ...') and exits 1: no traceback, no usage box, no
library noise before it. Each case runs the real command in a child process."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bloodcells.errors import BloodcellsError
from bloodcells.imageio import encode_png, write_png

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Broken inputs of each kind: an empty and an unsafe checkpoint, a file where a folder belongs, bad recipes,
    a dataset whose scene is a truncated PNG, a run folder whose last.pt is empty."""
    root = tmp_path_factory.mktemp("bad")
    f = {"root": root, "file": root / "a_file", "empty_pt": root / "empty.pt", "unsafe_pt": root / "unsafe.pt"}
    f["file"].write_text("not a folder")
    f["empty_pt"].write_bytes(b"")
    torch.save({"format": 1, "state_dict": {}, "extra": argparse.Namespace(a=1)}, f["unsafe_pt"])
    for name, text in (("escape", "name: ../../x\n"), ("nan", "canvas: {density: .nan}\n"), ("empty", "")):
        f[f"recipe_{name}"] = root / f"{name}.yaml"
        f[f"recipe_{name}"].write_text(text)
    png = encode_png(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    # a PNG cut early makes OpenCV log a warning; cut inside the pixel data, libpng itself prints an error
    for key, cut in (("data", len(png) * 4 // 5), ("data_cut_early", len(png) // 2)):
        f[key] = root / key
        (f[key] / "train" / "images").mkdir(parents=True)
        (f[key] / "train" / "images" / "000000.png").write_bytes(png[:cut])
        write_png(f[key] / "train" / "labels" / "000000.png", np.zeros((64, 64), np.uint8))
    (root / "run").mkdir()
    (root / "run" / "last.pt").write_bytes(b"")
    f["image"] = root / "smear.png"
    write_png(f["image"], np.full((64, 64, 3), 200, np.uint8))
    return f


CASES = {
    # range checks of options
    "show --n 0": (["show", "{data}", "--n", "0"], "--n 0: must be at least 1"),
    "compose --workers 0": (["compose", "--recipe", "tiny", "--workers", "0"], "--workers 0: must be at least 1"),
    "train --width 0": (["train", "--width", "0"], "--width 0: must be at least 1"),
    # outputs and recipes
    "compose --out FILE": (["compose", "--recipe", "tiny", "--out", "{file}"], "is a file, not a folder"),
    "recipe name escapes": (["compose", "--recipe", "{recipe_escape}"], "must be a plain folder name"),
    "recipe density nan": (["compose", "--recipe", "{recipe_nan}", "--out", "{root}/n"], "'canvas.density' is nan"),
    "empty recipe": (["compose", "--recipe", "{recipe_empty}", "--out", "{root}/e"], "the recipe is empty"),
    # unreadable inputs: OpenCV's and libpng's own messages must not come first
    "corrupt scene PNG": (["show", "{data}", "--n", "1", "--out", "{root}/g.png"], "not a readable image"),
    "PNG cut early": (["show", "{data_cut_early}", "--n", "1", "--out", "{root}/g.png"], "not a readable image"),
    # checkpoints and devices
    "empty checkpoint": (["predict", "--model", "{empty_pt}", "{image}", "--out", "{root}/p"], "empty file (0 bytes)"),
    "unsafe checkpoint": (["predict", "--model", "{unsafe_pt}", "{image}", "--out", "{root}/p"],
                          "use a checkpoint written by 'cli train'"),
    "device tpu": (["predict", "--model", "{empty_pt}", "{image}", "--device", "tpu"], "--device tpu: unknown device"),
    "resume an empty last.pt": (["train", "--resume", "{root}/run/last.pt"], "run/last.pt: empty file"),
    "evaluate --out FILE": (["evaluate", "--model", "{empty_pt}", "--data", "{data}", "--out", "{file}"],
                            "is a file, not a folder"),
    # adapt: the method and what it needs
    "adapt --method unknown": (["adapt", "--model", "{empty_pt}", "--images", "{image}", "--out", "{root}/a",
                                "--method", "tent"], "--method tent: choose one of self-training, stats"),
    "adapt self-training without --data": (["adapt", "--model", "{empty_pt}", "--images", "{image}", "--out",
                                            "{root}/a"], "--data is needed for --method self-training"),
    "adapt --method stats, empty checkpoint": (["adapt", "--model", "{empty_pt}", "--images", "{image}", "--out",
                                                "{root}/a", "--method", "stats"], "empty file (0 bytes)"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_user_errors_print_one_line_and_exit_1(case, files) -> None:
    args, expected = CASES[case]
    argv = [a.format(**{k: str(v) for k, v in files.items()}) for a in args]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("OPENCV_LOG_LEVEL", None)
    r = subprocess.run([sys.executable, str(ROOT / "cli.py"), *argv], capture_output=True, text=True, env=env,
                       cwd=files["root"], timeout=300)
    lines = r.stderr.splitlines()
    assert r.returncode == 1, (r.returncode, r.stderr[-3000:])
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], r.stderr[-3000:]
    if case == "unsafe checkpoint":  # the whole sentence, not one cut at a fixed length
        assert lines[0].endswith("use a checkpoint written by 'cli train'")


def test_checkpoint_and_output_errors_of_the_other_commands(files, tmp_path) -> None:
    from bloodcells.segmenter.evaluate import evaluate
    from bloodcells.segmenter.predict import colorize_run, predict_files

    with pytest.raises(BloodcellsError, match=r"empty.pt: empty file \(0 bytes\)"):
        evaluate(files["empty_pt"], files["data"], "train", out=tmp_path / "ev")
    with pytest.raises(BloodcellsError, match=r"empty.pt: empty file \(0 bytes\)"):
        colorize_run(files["empty_pt"], [files["image"]], tmp_path / "x.gif", progress=False)
    with pytest.raises(BloodcellsError, match="a_file: is a file, not a folder"):
        predict_files(files["empty_pt"], [files["image"]], files["file"], progress=False)


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "tpu", "cuda:0:1", ""])
def test_unknown_devices_are_one_line_errors(device) -> None:
    from bloodcells.segmenter.runtime import pick_device

    with pytest.raises(BloodcellsError, match=f"--device {device}: "):
        pick_device(device)
    assert pick_device("cpu").type == "cpu"


def test_writing_below_a_file_is_one_line_error(files) -> None:
    with pytest.raises(BloodcellsError, match="is an existing file; choose another --out"):
        write_png(files["file"] / "sub" / "x.png", np.zeros((4, 4), np.uint8))


def test_opencv_logging_is_silenced_unless_asked_for() -> None:
    code = ("import cv2, bloodcells.imageio; "
            "print(int(cv2.utils.logging.getLogLevel() == cv2.utils.logging.LOG_LEVEL_SILENT))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("OPENCV_LOG_LEVEL", None)
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env).stdout.strip() == "1"
    env["OPENCV_LOG_LEVEL"] = "INFO"  # someone debugging keeps OpenCV's messages
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env).stdout
    assert out.splitlines()[-1] == "0"
