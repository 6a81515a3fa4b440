"""The package as a user gets it: build the wheel, install it into a fresh virtual environment, run the CLI there.

The venv sees the system site-packages (torch and the other dependencies need no download) and the wheel is
installed with --no-deps --no-index, so this works offline. Commands run from an unrelated folder with no
PYTHONPATH, so nothing of the checkout can leak in.
"""
from __future__ import annotations

import fnmatch
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# build outputs and caches, and the anchored folders .gitignore lists (datasets, runs ... a user made here)
IGNORED = ["__pycache__", "*.egg-info", ".*", "build", "dist", "*.gif", "*.mp4"]

PROBE = """
import importlib, json, sys
import bloodcells
from bloodcells.composer import procedural, recipe
found = {}
for name in ("composer", "segmenter", "cli"):
    try:
        importlib.import_module(name)
        found[name] = "imported"
    except ModuleNotFoundError:
        found[name] = "missing"
print(json.dumps({"bloodcells": bloodcells.__file__, "recipes": str(recipe.RECIPES_DIR),
                  "recipe_names": sorted(p.name for p in recipe.RECIPES_DIR.glob("*.yaml")),
                  "procedural": str(procedural.DEFAULT_PARAMS_PATH),
                  "procedural_exists": procedural.DEFAULT_PARAMS_PATH.is_file(), "top_level": found}))
"""


def _source_copy(dest: Path) -> Path:
    """The checkout without build leftovers or user outputs: a stale build/ would otherwise end up in the wheel."""
    anchored = [ln.strip().strip("/") for ln in (ROOT / ".gitignore").read_text().splitlines()
                if ln.strip().startswith("/") and ln.strip().endswith("/")]

    def ignore(folder: str, names: list[str]) -> set[str]:
        top = Path(folder) == ROOT
        return {n for n in names if any(fnmatch.fnmatch(n, p) for p in IGNORED) or (top and n in anchored)}

    shutil.copytree(ROOT, dest, ignore=ignore)
    return dest


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return r


def test_wheel_installs_and_runs_from_a_venv(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env["PYTHONNOUSERSITE"] = "1"
    src = _source_copy(tmp_path / "src")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"),
          str(src)], tmp_path, env)
    (wheel,) = (tmp_path / "dist").glob("bloodcells-*.whl")
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], tmp_path, env)
    python, cli = venv / "bin" / "python", venv / "bin" / "cli"
    # pip comes from the system site-packages, and installs into the venv it runs in
    _run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--force-reinstall", str(wheel)],
         tmp_path, env)
    work = tmp_path / "elsewhere"
    work.mkdir()
    r = _run([str(cli), "compose", "--recipe", "tiny", "--out", "data/tiny", "--workers", "1"], work, env)
    assert "built-in default" in r.stdout
    d = json.loads((work / "data" / "tiny" / "dataset.json").read_text())
    assert d["name"] == "tiny" and d["counts"] == {"train": 48, "val": 16, "test": 16}
    assert d["sprites"]["bank"] == "builtin"
    probe = json.loads(_run([str(python), "-c", PROBE], work, env).stdout)
    site = venv.resolve()
    assert Path(probe["bloodcells"]).resolve().is_relative_to(site), probe
    assert Path(probe["recipes"]).resolve().is_relative_to(site) and "tiny.yaml" in probe["recipe_names"], probe
    assert Path(probe["procedural"]).resolve().is_relative_to(site) and probe["procedural_exists"], probe
    assert probe["top_level"] == {"composer": "missing", "segmenter": "missing", "cli": "missing"}, probe
