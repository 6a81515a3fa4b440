"""U-Net: the shared model checks, the halved widths and the registry's errors."""
import pytest
import torch

from bloodcells.errors import BloodcellsError
from bloodcells.segmenter.models import ARCHITECTURES, UNet, create_model

from .base import ModelTest


class TestUNet(ModelTest):
    arch = "unet"


def test_default_unet_has_halved_feature_widths() -> None:
    model = create_model("unet")  # width=32 by default
    assert isinstance(model, UNet)
    assert [block.out_channels for block in model.encoder] == [32, 64, 128, 256, 512]
    # the widths are the real conv outputs, seen on a forward pass, not just attributes
    seen: list[int] = []
    hooks = [block.register_forward_hook(lambda m, i, o: seen.append(o.shape[1])) for block in model.encoder]
    with torch.no_grad():
        model.eval()(torch.randn(1, 3, 32, 32))
    for h in hooks:
        h.remove()
    assert seen == [32, 64, 128, 256, 512]
    assert [up.out_channels for up in model.decoder] == [256, 128, 64, 32]


def test_registry_lists_all_six_and_rejects_unknown_names() -> None:
    assert set(ARCHITECTURES) == {"unet", "r2unet", "attention_unet", "unetpp", "ternausnet", "resunet"}
    with pytest.raises(BloodcellsError, match=r"unknown architecture 'segnet'; choose one of: unet, "):
        create_model("segnet")
    with pytest.raises(BloodcellsError, match="does not take t"):
        create_model("unet", width=4, t=2)
    with pytest.raises(BloodcellsError, match="width must be a positive integer"):
        create_model("unet", width=0)


def test_input_not_divisible_by_16_is_a_clear_error() -> None:
    model = create_model("unet", width=4)
    with pytest.raises(BloodcellsError, match="multiples of 16"):
        model(torch.randn(1, 3, 40, 32))
