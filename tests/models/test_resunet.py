"""ResUNet: the shared model checks plus the residual units' strided downsampling."""
import torch

from bloodcells.segmenter.models import create_model
from bloodcells.segmenter.models.resunet import ResidualUnit

from .base import ModelTest


class TestResUNet(ModelTest):
    arch = "resunet"


def test_encoder_downsamples_by_strided_residual_units() -> None:
    model = create_model("resunet", width=4)
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in model.modules())
    unit = ResidualUnit(4, 8, stride=2)
    assert unit(torch.randn(1, 4, 32, 48)).shape == (1, 8, 16, 24)
