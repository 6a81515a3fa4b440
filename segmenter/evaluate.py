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
from bloodcells.formats import read_json, scene_paths, write_json
from bloodcells.imageio import write_bytes_atomic, write_png
from bloodcells.segmenter.card import SYNTHETIC, record_evaluation
from bloodcells.segmenter.charts import confusion_heatmap
from bloodcells.segmenter.checkpoint import load_model
from bloodcells.segmenter.count import MIN_FRACTION, resolve_areas
from bloodcells.segmenter.data import SegmentationDataset, ShardSampler, read_instances
from bloodcells.segmenter.instance_metrics import InstanceScorer, format_instance_table
from bloodcells.segmenter.infer import tta_logits
from bloodcells.segmenter.instances import find_cells
from bloodcells.segmenter.metrics import ConfusionMatrix, all_reduce, metrics_from_confusion
from bloodcells.segmenter.runtime import Runtime, leave_process_group, make_runtime


def run_model(model: nn.Module, loader: DataLoader, runtime: Runtime, criterion: Callable[..., torch.Tensor] | None = None,
              num_classes: int = NUM_CLASSES, on_batch: Callable[[torch.Tensor, tuple], None] | None = None,
              tta: bool = False) -> tuple[ConfusionMatrix, float]:
    """Predict every batch in eval mode; the confusion matrix and sample-weighted mean loss over all DDP ranks.

    Batches are (x, y) or (x, y, instance target); `criterion(output, y[, target])`; `on_batch(output, batch)`
    sees every output (e.g. to decode instances). tta: outputs averaged over flips and quarter turns
    (segmenter.infer.tta_logits)."""
    model.eval()
    cm = ConfusionMatrix(num_classes)
    totals = torch.zeros(2, dtype=torch.float64, device=runtime.device)  # loss sum, samples
    with torch.inference_mode():
        for batch in loader:
            x, y = runtime.batch(batch[0]), batch[1].to(runtime.device, non_blocking=True)
            rest = [t.to(runtime.device, non_blocking=True) for t in batch[2:]]
            if tta:
                out = tta_logits(model, x, runtime, num_classes)
            else:
                with runtime.autocast():
                    out = model(x)
                out = out.float()
            cm.update(out[:, :num_classes].argmax(dim=1), y)
            if criterion is not None:
                totals[0] += float(criterion(out, y, *rest)) * len(y)
                totals[1] += len(y)
            if on_batch is not None:
                on_batch(out, batch)
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
    if result.get("instances"):
        lines += ["", f"one object per cell ({result['instances']['method']}):",
                  format_instance_table(result["instances"])]
    return "\n".join(lines)


def default_out(model_path: str | Path, split: str) -> Path:
    """Where evaluate writes when no --out is given: runs/x/best.pt on test -> runs/x/best-test/."""
    p = Path(model_path)
    return p.parent / f"{p.stem}-{split}"


def evaluate(model_path: str | Path, data: str | Path, split: str = "test", out: str | Path | None = None,
             batch_size: int = 8, precision: str = "auto", workers: int = 0, device: str = "auto",
             cache: bool | None = False, instances: bool = True, tta: bool = False) -> dict[str, Any]:
    """Score a checkpoint on one split; write metrics.json, confusion.csv and confusion.png into `out`, and the
    scores into the model card beside the checkpoint.

    instances: also score one object per cell against the scenes' instance maps (AP, PQ, count error; see
    segmenter/instance_metrics.py), decoding cells as prediction does; single-process runs only."""
    out = check_out_folder(out if out is not None else default_out(model_path, split))
    runtime = make_runtime(precision, device)
    scorer: InstanceScorer | None = None
    try:
        model, meta = load_model(model_path, runtime.device)
        model = runtime.model(model)
        dataset = SegmentationDataset(data, split, mean=meta["mean"], std=meta["std"], cache=cache)
        loader = DataLoader(dataset, batch_size=batch_size, sampler=ShardSampler(len(dataset), runtime.rank, runtime.world),
                            num_workers=workers, pin_memory=runtime.device.type == "cuda")
        num_classes = meta["config"]["num_classes"]
        on_batch = None
        if instances and dataset.info.has_instances and runtime.world == 1:
            scorer, on_batch = _instance_scoring(dataset, meta, data, num_classes)
        cm, _ = run_model(model, loader, runtime, num_classes=num_classes, on_batch=on_batch, tta=tta)
    finally:
        leave_process_group(runtime)
    counts = cm.matrix()
    result: dict[str, Any] = {"model": str(model_path), "data": str(data), "split": split, "images": len(dataset),
                              "precision": runtime.precision, "tta": tta, **metrics_from_confusion(counts),
                              "table": class_table(counts), "confusion": counts.tolist(), "out": str(out)}
    if scorer is not None:
        result["instances"] = {"method": meta["config"].get("instance") or "area", **scorer.result()}
    if runtime.is_main:
        write_json(out / "metrics.json", result)
        write_bytes_atomic(out / "confusion.csv", confusion_csv(counts).encode())
        write_png(out / "confusion.png", confusion_heatmap(counts, NAMES))
        record_evaluation(model_path, SYNTHETIC, result)
    return result


def _instance_scoring(dataset: SegmentationDataset, meta: dict[str, Any], data: str | Path,
                      num_classes: int) -> tuple[InstanceScorer, Callable[[torch.Tensor, tuple], None]]:
    """A scorer and the run_model callback that decodes each scene's cells and scores them against its truth."""
    areas, _ = resolve_areas(meta, data)
    min_area = {c: MIN_FRACTION * a for c, a in areas.items()}
    scorer = InstanceScorer(min_area=min_area)
    mode = meta["config"].get("instance")
    position = iter(range(len(dataset)))

    def on_batch(out: torch.Tensor, batch: tuple) -> None:
        out = out.float().cpu()
        probs = torch.softmax(out[:, :num_classes], dim=1).numpy()
        aux = torch.sigmoid(out[:, num_classes:]).numpy()
        for j in range(len(out)):
            paths = scene_paths(dataset.root, dataset.split, dataset.ids[next(position)])
            truth = read_instances(paths.instances).astype(np.int32)
            classes = np.array([NAMES.index(o["class"]) for o in read_json(paths.annotation)["objects"]], np.int64)
            cells, _ = find_cells(probs[j], aux[j, 0] if aux.shape[1] else None, mode, min_area, areas)
            scorer.add(truth, classes, cells.instances, cells.classes, cells.confidence)

    return scorer, on_batch
