"""Attention U-Net: the shared model checks plus the gates' behaviour."""
import torch

from bloodcells.segmenter.models import create_model
from bloodcells.segmenter.models.attention_unet import AttentionGate

from .base import ModelTest


class TestAttentionUNet(ModelTest):
    arch = "attention_unet"


def test_one_gate_per_skip_with_coefficients_in_unit_range() -> None:
    model = create_model("attention_unet", width=4)
    assert len(model.gates) == 4
    gate = AttentionGate(skip_channels=8, gating_channels=16, inter_channels=4)
    alpha = gate.attention(torch.randn(2, 8, 24, 40), torch.randn(2, 16, 12, 20))
    assert alpha.shape == (2, 1, 24, 40)
    assert (alpha >= 0).all() and (alpha <= 1).all()
