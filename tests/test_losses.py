"""Losses: hand-computed weighted CE, Dice at its extremes, median-frequency class weights."""
import math

import pytest
import torch
import torch.nn.functional as F

from bloodcells.errors import BloodcellsError
from bloodcells.segmenter.losses import CombinedLoss, DiceLoss, WeightedCELoss, class_weights_from_frequencies


def test_class_weights_by_median_frequency() -> None:
    # present classes' median is (0.25 + 0.125) / 2 = 0.1875; the absent class gets the max weight
    w = class_weights_from_frequencies([0.5, 0.25, 0.125, 0.125, 0.0])
    assert w.dtype == torch.float32
    assert w.tolist() == pytest.approx([0.375, 0.75, 1.5, 1.5, 1.5])
    assert class_weights_from_frequencies([400, 200, 100, 100, 0]).tolist() == pytest.approx(w.tolist())
    for bad in ([0, 0], [1.0, -0.5], [1.0, float("nan")], []):
        with pytest.raises(BloodcellsError):
            class_weights_from_frequencies(bad)


def test_tied_weights_share_the_pooled_median_frequency_weight() -> None:
    from bloodcells.formats import median_frequency_weights, tied_weights
    freqs = [0.5, 0.1, 0.3, 0.1]  # median 0.2; classes 2 and 3 tied pool 0.4 -> weight 0.5 each
    w = median_frequency_weights(freqs)
    assert w.tolist() == pytest.approx([0.4, 2.0, 2.0 / 3, 2.0])
    tied = tied_weights(w, freqs, [2, 3])
    assert tied.tolist() == pytest.approx([0.4, 2.0, 0.5, 0.5])
    # weight x share: untied the two classes count alike (0.2 each); tied they keep their 3:1 shares
    assert (tied[2] * freqs[2]) / (tied[3] * freqs[3]) == pytest.approx(3.0)
    assert tied_weights(w, freqs, []).tolist() == pytest.approx(w.tolist())


def test_weighted_ce_matches_hand_computation() -> None:
    # two pixels: logits (2, 0) with truth 0, logits (0, 1) with truth 1; class weights (1, 3)
    logits = torch.tensor([[[[2.0, 0.0]], [[0.0, 1.0]]]])  # (N=1, C=2, H=1, W=2)
    target = torch.tensor([[[0, 1]]])
    ce_a, ce_b = math.log(1 + math.exp(-2)), math.log(1 + math.exp(-1))
    loss = WeightedCELoss([1.0, 3.0])(logits, target)
    assert loss.item() == pytest.approx((1 * ce_a + 3 * ce_b) / 2)  # per-pixel weight map, mean over pixels
    assert loss.item() != pytest.approx(F.cross_entropy(logits, target, weight=torch.tensor([1.0, 3.0])).item())
    assert WeightedCELoss()(logits, target).item() == pytest.approx((ce_a + ce_b) / 2)


def test_dice_is_zero_for_perfect_logits_and_positive_otherwise() -> None:
    torch.manual_seed(0)
    target = torch.randint(0, 4, (2, 8, 8))
    perfect = 50.0 * F.one_hot(target, 6).permute(0, 3, 1, 2).float()  # classes 4, 5 absent
    assert DiceLoss()(perfect, target).item() == pytest.approx(0.0, abs=1e-6)
    wrong = 50.0 * F.one_hot((target + 1) % 4, 6).permute(0, 3, 1, 2).float()
    assert DiceLoss(smooth=0.0)(wrong, target).item() == pytest.approx(1.0, abs=1e-6)  # no overlap at all
    assert DiceLoss()(wrong, target).item() > 0.95  # smoothing leaves a little Dice
    assert 0 < DiceLoss()(torch.randn(2, 6, 8, 8), target).item() < 1


def test_dice_hand_value_skips_classes_absent_from_target() -> None:
    # uniform logits over 3 classes, truth (0, 1): Dice_0 = Dice_1 = (2/3) / (2/3 + 1) = 0.4
    logits = torch.zeros(1, 3, 1, 2)
    target = torch.tensor([[[0, 1]]])
    assert DiceLoss(smooth=0.0)(logits, target).item() == pytest.approx(0.6)


def test_combined_loss_is_the_weighted_sum_and_averages_deep_supervision() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 8, 8, requires_grad=True)
    target = torch.randint(0, 5, (2, 8, 8))
    weights = torch.rand(5) + 0.5
    ce, dice = WeightedCELoss(weights)(logits, target), DiceLoss()(logits, target)
    combined = CombinedLoss(ce_weight=0.7, dice_weight=2.0, class_weights=weights)
    assert combined(logits, target).item() == pytest.approx(0.7 * ce.item() + 2.0 * dice.item(), rel=1e-6)
    assert combined([logits, logits * 2], target).item() == pytest.approx(
        (combined(logits, target) + combined(logits * 2, target)).item() / 2, rel=1e-6)
    combined(logits, target).backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    with pytest.raises(BloodcellsError):
        CombinedLoss(ce_weight=0, dice_weight=0)
