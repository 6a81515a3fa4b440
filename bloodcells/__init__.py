"""bloodcells: compose labelled synthetic blood-smear scenes from real cells, train U-Net-family segmenters on
them and predict real smears.

The two halves import as `bloodcells.composer` and `bloodcells.segmenter`. In a source checkout they are the
top-level folders `composer/` and `segmenter/` beside this package (added to its path below); installed from a
wheel they live inside it. The Python API (`load_model`, `predict`, `compose`, `train`) is in `bloodcells.api`
and importable from here.
"""
from __future__ import annotations

from pathlib import Path as _Path
from typing import Any

__version__ = "0.1.0"

_checkout = _Path(__file__).resolve().parent.parent
if not (_Path(__file__).resolve().parent / "composer").is_dir() and (_checkout / "composer" / "__init__.py").is_file():
    __path__.append(str(_checkout))  # noqa: F821  (a package's own __path__)

_API = ("load_model", "predict", "compose", "train", "Model", "Result")


def __getattr__(name: str) -> Any:
    """The API functions, imported on first use so that `import bloodcells` stays light (no torch)."""
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'bloodcells' has no attribute {name!r}")
