"""Model checkpoints: one .pt (weights, architecture, classes, normalisation, training state), a JSON and a
model card (segmenter/card.py) beside it."""
from __future__ import annotations

import io
import pickle
import random
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from bloodcells.classes import CLASSES, NAMES
from bloodcells.errors import BloodcellsError
from bloodcells.formats import write_json
from bloodcells.imageio import write_bytes_atomic
from bloodcells.segmenter.card import write_card
from bloodcells.segmenter.models import create_model

FORMAT = 1


def rng_states(loader_generator: torch.Generator | None = None) -> dict[str, Any]:
    """The global torch / numpy / python RNG states (and a DataLoader generator's), as loadable tensors and tuples."""
    np_state = np.random.get_state(legacy=False)
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"bit_generator": np_state["bit_generator"],
                  "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                  "pos": int(np_state["state"]["pos"]),
                  "has_gauss": int(np_state["has_gauss"]), "gauss": float(np_state["gauss"])},
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    if loader_generator is not None:
        states["loader"] = loader_generator.get_state()
    return states


def restore_rng_states(states: dict[str, Any], loader_generator: torch.Generator | None = None) -> None:
    """Undo rng_states: set every generator it recorded back to that point."""
    torch.set_rng_state(states["torch"])
    n = states["numpy"]
    np.random.set_state({"bit_generator": n["bit_generator"],
                         "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
                         "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])
    if loader_generator is not None and "loader" in states:
        loader_generator.set_state(states["loader"])


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if hasattr(model, "module") else model


def sidecar(path: str | Path) -> Path:
    """The JSON written beside a checkpoint: best.pt -> best.json."""
    return Path(path).with_suffix(".json")


def save_checkpoint(path: str | Path, model: nn.Module, mean: Sequence[float], std: Sequence[float],
                    meta: dict[str, Any], training: dict[str, Any] | None = None) -> None:
    """Write `path` (.pt), its JSON sidecar and its model card (.md) atomically; `meta` must be JSON-serialisable."""
    bare = unwrap(model)
    if not hasattr(bare, "config"):
        raise TypeError("the model has no .config; build it with bloodcells.segmenter.models.create_model")
    normalization = {"mean": [float(v) for v in mean], "std": [float(v) for v in std]}
    payload = {
        "format": FORMAT,
        "config": dict(bare.config),
        # always stored contiguous and on the CPU, whatever the training memory format or device
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in bare.state_dict().items()},
        "classes": [{"index": c.index, "name": c.name, "color": c.color} for c in CLASSES],
        "normalization": normalization,
        "meta": meta,
        "training": training,
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    write_bytes_atomic(path, buf.getvalue())
    write_json(sidecar(path), {"config": dict(bare.config), **normalization, **meta})
    write_card(path, payload, bare)


def _first_sentence(e: BaseException) -> str:
    """The error's type and the first sentence of its message, never cut inside a sentence."""
    text = " ".join(str(e).split())
    head = re.split(r"(?<=[.!?])\s", text, maxsplit=1)[0].rstrip(".")
    return f"{type(e).__name__}: {head}" if head else type(e).__name__


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by save_checkpoint onto the CPU; a missing or corrupt file is a BloodcellsError."""
    path = Path(path)
    if path.is_dir():
        raise BloodcellsError(f"{path}: is a folder; pass a checkpoint file such as {path / 'best.pt'}")
    if not path.is_file():
        raise BloodcellsError(f"{path}: no such checkpoint; train one with 'cli train' or check the path")
    if path.stat().st_size == 0:
        raise BloodcellsError(f"{path}: empty file (0 bytes), not a checkpoint; use another one or train again")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated or foreign files
        unsafe = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        if isinstance(e, pickle.UnpicklingError) and unsafe:
            raise BloodcellsError(f"{path}: holds Python objects ({unsafe.group(1)}) besides weights and plain data, "
                                  "which are not loaded because loading them could run code; use a checkpoint "
                                  "written by 'cli train'") from None
        unpickler = re.search(r"WeightsUnpickler error:\s*([^\n]+)", str(e))
        reason = f"UnpicklingError: {unpickler.group(1).strip()}" if unpickler else _first_sentence(e)
        raise BloodcellsError(f"{path}: not a readable checkpoint ({reason}); it may be truncated or not a .pt file, "
                              "use another one or train again") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT or "state_dict" not in payload:
        raise BloodcellsError(f"{path}: not a bloodcells checkpoint (format {FORMAT}); train one with 'cli train'")
    names = [c["name"] for c in payload.get("classes", [])]
    if tuple(names) != NAMES:
        raise BloodcellsError(f"{path}: trained for classes {names}, but this version has {list(NAMES)}")
    return payload


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a checkpoint's model in eval mode; meta holds config, classes, mean, std and the training meta."""
    payload = load_checkpoint(path)
    try:
        model = create_model(**payload["config"])
        model.load_state_dict(payload["state_dict"])
    except (RuntimeError, TypeError, KeyError) as e:
        raise BloodcellsError(f"{path}: weights do not fit architecture {payload.get('config')} ({_first_sentence(e)}); "
                              "the file is damaged or from another version") from None
    model.to(device).eval()
    meta = {"config": payload["config"], "classes": payload["classes"], **payload["normalization"],
            **(payload.get("meta") or {})}
    return model, meta
