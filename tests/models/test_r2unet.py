"""R2U-Net: the shared model checks plus the recurrence depth."""
import pytest

from bloodcells.errors import BloodcellsError
from bloodcells.segmenter.models import create_model
from bloodcells.segmenter.models.r2unet import RecurrentConv

from .base import ModelTest


class TestR2UNet(ModelTest):
    arch = "r2unet"


class TestR2UNetT3(ModelTest):
    arch = "r2unet"
    kwargs = {"t": 3}


def test_recurrence_defaults_to_t2_and_is_validated() -> None:
    model = create_model("r2unet", width=4)
    assert model.config["t"] == 2
    assert all(m.t == 2 for m in model.modules() if isinstance(m, RecurrentConv))
    with pytest.raises(BloodcellsError, match="t must be a positive integer"):
        create_model("r2unet", width=4, t=0)
