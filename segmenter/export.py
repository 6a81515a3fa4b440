"""ONNX export of a checkpoint, for running a model without this package (ONNX Runtime, other languages).

The graph takes what the torch model takes: `image`, float32 (N, 3, H, W), RGB scaled to 0..1, minus the
training mean, divided by the training std, with H and W multiples of 16; batch, height and width are dynamic.
It returns `logits` (N, C, H, W), whose channels 0..num_classes-1 are the class logits in class-table order
(any further channels are auxiliary outputs, not classes). Mean, std, class names and colours are written
into the model's metadata_props so that a user can preprocess and colour the output without this package.
The torch.export-based exporter is used (the TorchScript one is deprecated); it needs onnx and onnxscript.
"""
from __future__ import annotations

import contextlib
import json
import logging
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

import bloodcells
from bloodcells.classes import BY_NAME
from bloodcells.errors import BloodcellsError
from bloodcells.imageio import write_bytes_atomic
from bloodcells.segmenter.checkpoint import load_model

OPSET = 18
INPUT, OUTPUT = "image", "logits"
SIZE_MULTIPLE = 16  # every architecture halves the input four times
EXTRA_HINT = "pip install 'bloodcells[onnx]' (onnx and onnxscript)"


def require_onnx() -> None:
    """Fail in one line, naming the extra to install, when the exporter's packages are missing."""
    missing = []
    for name in ("onnx", "onnxscript"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise BloodcellsError(f"ONNX export needs {' and '.join(missing)}, which are not installed; {EXTRA_HINT}")


def onnx_metadata(meta: Mapping[str, Any]) -> dict[str, str]:
    """The metadata_props written into the ONNX file: how to feed it and how to read its output."""
    config = meta["config"]
    k = int(config["num_classes"])
    classes = meta["classes"][:k]
    return {
        "producer": f"bloodcells {bloodcells.__version__}",
        "arch": str(config["arch"]),
        "config": json.dumps(config, sort_keys=True),
        "num_classes": str(k),
        "classes": json.dumps([c["name"] for c in classes]),
        "colors": json.dumps([c["color"] for c in classes]),
        "mean": json.dumps([float(v) for v in meta["mean"]]),
        "std": json.dumps([float(v) for v in meta["std"]]),
        "input": f"{INPUT}: float32 (N, 3, H, W), RGB / 255, minus mean, divided by std (per channel); "
                 f"H and W multiples of {SIZE_MULTIPLE}",
        "output": f"{OUTPUT}: float32 (N, C, H, W); channels 0..{k - 1} are the class logits in the order of "
                  "'classes' (argmax over them gives the class map); any further channels are auxiliary",
        "scale": f"40x: a healthy RBC is about {BY_NAME['healthy_rbc'].diameter_40x:.0f} px across; "
                 "resize other magnifications to that first",
    }


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporter logs and warns about things that do not concern a user (torchvision ops, deprecations)."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def export_onnx(checkpoint: str | Path, out: str | Path, opset: int = OPSET) -> dict[str, Any]:
    """Export a checkpoint to an ONNX file (written atomically); returns what was written."""
    require_onnx()
    import onnx

    out = Path(out)
    model, meta = load_model(checkpoint)
    arch = meta["config"].get("arch")
    # a batch of 2: torch.export would fix a batch dimension of size 1 to a constant
    example = torch.zeros(2, int(meta["config"].get("in_channels", 3)), 4 * SIZE_MULTIPLE, 4 * SIZE_MULTIPLE)
    batch = torch.export.Dim("batch", min=1, max=4096)
    height = SIZE_MULTIPLE * torch.export.Dim("height_blocks", min=1, max=2048)
    width = SIZE_MULTIPLE * torch.export.Dim("width_blocks", min=1, max=2048)
    try:
        with _quiet(), torch.no_grad():
            program = torch.onnx.export(model, (example,), None, input_names=[INPUT], output_names=[OUTPUT],
                                        opset_version=opset, dynamo=True, verbose=False,
                                        dynamic_shapes=({0: batch, 2: height, 3: width},))
    except BloodcellsError:
        raise
    except Exception as e:  # the exporter raises many types; the user needs the architecture and the reason
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise BloodcellsError(f"{checkpoint}: architecture {arch!r} cannot be exported to ONNX opset {opset} "
                              f"({type(e).__name__}: {first}); use another architecture or --opset") from None
    proto = program.model_proto
    metadata = onnx_metadata(meta)
    onnx.helper.set_model_props(proto, metadata)
    proto.doc_string = f"bloodcells {arch} segmenter exported from {Path(checkpoint).name}"
    data = proto.SerializeToString()
    write_bytes_atomic(out, data)
    return {"out": str(out), "arch": arch, "opset": opset, "bytes": len(data), "input": INPUT, "output": OUTPUT,
            "metadata": metadata}
