"""Segmentation losses on per-pixel logits: class-weighted cross-entropy, soft Dice, their sum."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bloodcells.errors import BloodcellsError
from bloodcells.formats import median_frequency_weights

Logits = torch.Tensor | Sequence[torch.Tensor]  # a list when a model is deep-supervised


def class_weights_from_frequencies(freqs: Sequence[float] | np.ndarray | torch.Tensor) -> torch.Tensor:
    """Median-frequency class weights (bloodcells.formats.median_frequency_weights) as a float32 tensor."""
    f = freqs.detach().cpu().numpy() if isinstance(freqs, torch.Tensor) else freqs
    return torch.from_numpy(median_frequency_weights(f)).float()


class SegmentationLoss(nn.Module):
    """Base: a loss on (N, C, H, W) logits and (N, H, W) class indices; lists of logits are averaged."""

    def forward(self, logits: Logits, target: torch.Tensor) -> torch.Tensor:
        """Mean loss over deep-supervision outputs, or the loss of a single logit map."""
        if isinstance(logits, torch.Tensor):
            return self.loss(logits, target)
        return torch.stack([self.loss(out, target) for out in logits]).mean()

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The loss of one logit map; subclasses define it."""
        raise NotImplementedError


class WeightedCELoss(SegmentationLoss):
    """Softmax cross-entropy with per-class weights, averaged over pixels.

    Equals the original's per-pixel weight maps: each pixel's loss times the weight of
    its true class, summed and divided by the number of pixels. (torch's own weighted
    `cross_entropy` divides by the sum of the weights instead.)
    """

    def __init__(self, class_weights: Sequence[float] | torch.Tensor | None = None) -> None:
        super().__init__()
        w = None if class_weights is None else torch.as_tensor(class_weights, dtype=torch.float32)
        self.register_buffer("class_weights", w)

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Pixel-mean of weight[target] * -log softmax(logits)[target]."""
        ce = F.cross_entropy(logits.float(), target.long(), reduction="none")
        if self.class_weights is not None:
            ce = ce * self.class_weights.to(ce.device)[target.long()]
        return ce.mean()


class DiceLoss(SegmentationLoss):
    """Soft multi-class Dice loss on softmax probabilities: 1 - mean_c Dice_c.

    Dice_c = (2 * sum p_c y_c + smooth) / (sum p_c + sum y_c + smooth), with sums over
    the whole batch (all images, all pixels). Classes absent from the batch's target
    are left out of the mean: their Dice would only reward predicting nothing, and
    probability put on them already lowers the Dice of the classes that are present.
    """

    def __init__(self, smooth: float = 1.0) -> None:
        super().__init__()
        self.smooth = smooth

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """1 - mean Dice over the classes present in target."""
        num_classes = logits.shape[1]
        probs = logits.float().softmax(dim=1)
        onehot = F.one_hot(target.long(), num_classes).permute(0, 3, 1, 2).to(probs.dtype)
        dims = (0, 2, 3)
        intersection = (probs * onehot).sum(dims)
        target_sum = onehot.sum(dims)
        dice = (2 * intersection + self.smooth) / (probs.sum(dims) + target_sum + self.smooth)
        present = target_sum > 0
        return 1 - dice[present].mean()


class CombinedLoss(SegmentationLoss):
    """ce_weight * WeightedCELoss + dice_weight * DiceLoss."""

    def __init__(self, ce_weight: float = 1.0, dice_weight: float = 1.0,
                 class_weights: Sequence[float] | torch.Tensor | None = None, smooth: float = 1.0) -> None:
        super().__init__()
        if ce_weight < 0 or dice_weight < 0 or ce_weight + dice_weight == 0:
            raise BloodcellsError(
                f"loss weights must be >= 0 and not both 0; got ce_weight={ce_weight}, dice_weight={dice_weight}")
        self.ce_weight, self.dice_weight = ce_weight, dice_weight
        self.ce = WeightedCELoss(class_weights)
        self.dice = DiceLoss(smooth)

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Weighted sum of the two losses (a zero weight skips its term)."""
        total = logits.new_zeros((), dtype=torch.float32)
        if self.ce_weight:
            total = total + self.ce_weight * self.ce.loss(logits, target)
        if self.dice_weight:
            total = total + self.dice_weight * self.dice.loss(logits, target)
        return total


def split_output(out: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(class logits, instance output or None) of one output map (N, num_classes [+ k], H, W)."""
    return out[:, :num_classes], (out[:, num_classes:] if out.shape[1] > num_classes else None)


class SegmentationObjective(nn.Module):
    """What training minimises: the class loss on the class logits, plus instance_weight times the instance loss
    on the instance output (models with one); lists of outputs (deep supervision) are averaged."""

    def __init__(self, class_loss: SegmentationLoss, num_classes: int, instance: str | None = None,
                 instance_weight: float = 1.0) -> None:
        super().__init__()
        self.class_loss, self.num_classes = class_loss, num_classes
        self.instance, self.instance_weight = instance, instance_weight

    def forward(self, out: Logits, target: torch.Tensor, instance_target: torch.Tensor | None = None) -> torch.Tensor:
        """Mean over outputs of class loss (+ weighted instance loss)."""
        from bloodcells.segmenter.instances import instance_loss

        outs = [out] if isinstance(out, torch.Tensor) else list(out)
        total = []
        for o in outs:
            logits, aux = split_output(o, self.num_classes)
            loss = self.class_loss.loss(logits, target)
            if self.instance is not None and aux is not None and instance_target is not None:
                loss = loss + self.instance_weight * instance_loss(aux, instance_target, self.instance)
            total.append(loss)
        return torch.stack(total).mean()
