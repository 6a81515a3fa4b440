"""Scoring a model on a dataset split: confusion matrix, per-class table, metrics.json / confusion.csv / .png."""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from bloodcells.classes import NAMES, NUM_CLASSES
from bloodcells.errors import check_out_folder
from bloodcells.formats import json_safe, write_json
from bloodcells.imageio import write_bytes_atomic, write_png
from bloodcells.segmenter.charts import confusion_heatmap
from bloodcells.segmenter.checkpoint import load_model
from bloodcells.segmenter.data import SegmentationDataset, ShardSampler
from bloodcells.segmenter.metrics import ConfusionMatrix, all_reduce, metrics_from_confusion
from bloodcells.segmenter.runtime import Runtime, leave_process_group, make_runtime


def run_model(model: nn.Module, loader: DataLoader, runtime: Runtime,
              criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
              num_classes: int = NUM_CLASSES) -> tuple[ConfusionMatrix, float]:
    """Predict every batch in eval mode; the confusion matrix and sample-weighted mean loss over all DDP ranks."""
    model.eval()
    cm = ConfusionMatrix(num_classes)
    totals = torch.zeros(2, dtype=torch.float64, device=runtime.device)  # loss sum, samples
    with torch.inference_mode():
        for x, y in loader:
            x, y = runtime.batch(x), y.to(runtime.device, non_blocking=True)
            with runtime.autocast():
                logits = model(x)
            logits = logits.float()
            cm.update(logits.argmax(dim=1), y)
            if criterion is not None:
                totals[0] += float(criterion(logits, y)) * len(y)
                totals[1] += len(y)
    cm.reduce(runtime.device)
    all_reduce(totals)
    loss = float(totals[0] / totals[1]) if totals[1] > 0 else float("nan")
    return cm, loss


def class_table(counts: np.ndarray) -> list[dict[str, Any]]:
    """Per-class rows: class, IoU, Dice, accuracy (recall), pixel share of the truth, true pixel count."""
    m = metrics_from_confusion(counts)
    true = np.asarray(counts).sum(axis=1)
    share = true / max(int(true.sum()), 1)
    return [{"class": name, "iou": m["per_class_iou"][i], "dice": m["per_class_dice"][i],
             "accuracy": m["per_class_accuracy"][i], "pixel_share": float(share[i]), "pixels": int(true[i])}
            for i, name in enumerate(NAMES[:len(true)])]


def confusion_csv(counts: np.ndarray, names: tuple[str, ...] = NAMES) -> str:
    """The counts as CSV: a header of predicted class names, one row per true class."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["true \\ predicted", *names])
    for name, row in zip(names, np.asarray(counts)):
        w.writerow([name, *(int(v) for v in row)])
    return buf.getvalue()


def format_table(result: dict[str, Any]) -> str:
    """The per-class table and the overall scores as aligned text for the terminal."""
    def f(v: float | None) -> str:
        return "    -" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:5.3f}"

    width = max(len(n) for n in NAMES)
    lines = [f"{'class':<{width}}  {'IoU':>5}  {'Dice':>5}  {'acc':>5}  {'share':>6}"]
    for r in result["table"]:
        lines.append(f"{r['class']:<{width}}  {f(r['iou'])}  {f(r['dice'])}  {f(r['accuracy'])}  "
                     f"{100 * r['pixel_share']:5.1f}%")
    lines.append(f"pixel accuracy {f(result['pixel_accuracy'])}   mIoU {f(result['miou'])}   "
                 f"mean Dice {f(result['mean_dice'])}   ({result['images']} images)")
    return "\n".join(lines)


def default_out(model_path: str | Path, split: str) -> Path:
    """Where evaluate writes when no --out is given: runs/x/best.pt on test -> runs/x/best-test/."""
    p = Path(model_path)
    return p.parent / f"{p.stem}-{split}"


def evaluate(model_path: str | Path, data: str | Path, split: str = "test", out: str | Path | None = None,
             batch_size: int = 8, precision: str = "auto", workers: int = 0, device: str = "auto",
             cache: bool | None = False) -> dict[str, Any]:
    """Score a checkpoint on one split; write metrics.json, confusion.csv and confusion.png into `out`."""
    out = check_out_folder(out if out is not None else default_out(model_path, split))
    runtime = make_runtime(precision, device)
    try:
        model, meta = load_model(model_path, runtime.device)
        model = runtime.model(model)
        dataset = SegmentationDataset(data, split, mean=meta["mean"], std=meta["std"], cache=cache)
        loader = DataLoader(dataset, batch_size=batch_size, sampler=ShardSampler(len(dataset), runtime.rank, runtime.world),
                            num_workers=workers, pin_memory=runtime.device.type == "cuda")
        cm, _ = run_model(model, loader, runtime, num_classes=meta["config"]["num_classes"])
    finally:
        leave_process_group(runtime)
    counts = cm.matrix()
    result: dict[str, Any] = {"model": str(model_path), "data": str(data), "split": split, "images": len(dataset),
                              "precision": runtime.precision, **metrics_from_confusion(counts),
                              "table": class_table(counts), "confusion": counts.tolist(), "out": str(out)}
    if runtime.is_main:
        write_json(out / "metrics.json", result)
        write_bytes_atomic(out / "confusion.csv", confusion_csv(counts).encode())
        write_png(out / "confusion.png", confusion_heatmap(counts, NAMES))
    return result
