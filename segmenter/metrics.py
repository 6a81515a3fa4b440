"""Confusion-matrix segmentation metrics (after torchvision's references/segmentation)."""
from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist


def metrics_from_confusion(mat: np.ndarray | torch.Tensor) -> dict[str, float | list[float]]:
    """Pixel accuracy, per-class recall/IoU/Dice and their means from a (K, K) matrix.

    mat[t, p] counts pixels of true class t predicted as p. A per-class value whose
    denominator is zero is NaN: recall for classes absent from the target, IoU and Dice
    for classes absent from both target and prediction. miou and mean_dice average the
    classes present in the target OR the prediction (a class predicted but never true
    scores 0 and counts), skipping the NaNs; they are NaN only when nothing was counted.
    """
    m = np.asarray(mat.cpu() if isinstance(mat, torch.Tensor) else mat, dtype=np.float64)
    tp = np.diag(m)
    true_count, pred_count = m.sum(axis=1), m.sum(axis=0)
    total = m.sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        recall = tp / true_count
        union = true_count + pred_count - tp
        iou = tp / union
        dice = 2 * tp / (true_count + pred_count)
        pixel_accuracy = tp.sum() / total
    seen = union > 0
    return {
        "pixel_accuracy": float(pixel_accuracy),
        "per_class_accuracy": recall.tolist(),
        "per_class_iou": iou.tolist(),
        "per_class_dice": dice.tolist(),
        "miou": float(iou[seen].mean()) if seen.any() else float("nan"),
        "mean_dice": float(dice[seen].mean()) if seen.any() else float("nan"),
    }


def all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all DDP processes in place; a no-op when not running distributed."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


class ConfusionMatrix:
    """Accumulates a (K, K) int64 confusion matrix, rows = target, columns = prediction."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.mat: torch.Tensor | None = None  # created on the first update's device

    def update(self, pred: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray) -> None:
        """Count class-index maps of the same shape; target pixels outside 0..K-1 are ignored."""
        pred, target = torch.as_tensor(pred), torch.as_tensor(target)
        if pred.shape != target.shape:
            raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape; "
                             "pass class indices (argmax over the logits), not logits")
        k = self.num_classes
        pred, target = pred.reshape(-1).to(target.device).long(), target.reshape(-1).long()
        valid = (target >= 0) & (target < k)
        if valid.any() and ((pred[valid] < 0) | (pred[valid] >= k)).any():
            raise ValueError(f"predicted class indices must lie in 0..{k - 1}")
        counts = torch.bincount(k * target[valid] + pred[valid], minlength=k * k).reshape(k, k)
        if self.mat is None:
            self.mat = torch.zeros((k, k), dtype=torch.int64, device=counts.device)
        self.mat += counts.to(self.mat.device)

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        """Add another matrix's counts to this one (e.g. from another process or shard)."""
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge {other.num_classes}-class counts into {self.num_classes} classes")
        if other.mat is not None:
            if self.mat is None:
                self.mat = other.mat.clone()
            else:
                self.mat += other.mat.to(self.mat.device)
        return self

    def reduce(self, device: torch.device | str | None = None) -> ConfusionMatrix:
        """Sum the matrices of all DDP processes (no-op outside DDP); every process must call it.

        Processes that saw no data still take part with zeros; `device` is where the
        collective runs (the GPU for NCCL), defaulting to the matrix's own device.
        """
        k = self.num_classes
        if self.mat is None:
            self.mat = torch.zeros((k, k), dtype=torch.int64, device=device)
        elif device is not None:
            self.mat = self.mat.to(device)
        all_reduce(self.mat)
        return self

    def reset(self) -> None:
        """Forget all counts."""
        self.mat = None

    def matrix(self) -> np.ndarray:
        """The counts as a (K, K) int64 numpy array."""
        if self.mat is None:
            return np.zeros((self.num_classes, self.num_classes), dtype=np.int64)
        return self.mat.cpu().numpy()

    def compute(self) -> dict[str, float | list[float]]:
        """The metrics of metrics_from_confusion on the counts so far."""
        return metrics_from_confusion(self.matrix())
