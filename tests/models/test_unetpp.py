"""U-Net++: the shared model checks, with and without deep supervision."""
import torch

from bloodcells.classes import NUM_CLASSES
from bloodcells.segmenter.losses import CombinedLoss
from bloodcells.segmenter.models import create_model

from .base import ModelTest


class TestUNetPlusPlus(ModelTest):
    arch = "unetpp"


def test_nested_grid_has_ten_decoder_nodes() -> None:
    model = create_model("unetpp", width=4)
    assert sorted(model.nodes) == sorted(f"{i}_{j}" for j in range(1, 5) for i in range(5 - j))
    assert len(model.heads) == 1 and model.config["deep_supervision"] is False


def test_deep_supervision_lists_in_training_and_averages_in_eval() -> None:
    torch.manual_seed(0)
    model = create_model("unetpp", width=4, deep_supervision=True)
    x = torch.randn(2, 3, 32, 32)
    outs = model(x)
    assert isinstance(outs, list) and len(outs) == 4
    assert all(o.shape == (2, NUM_CLASSES, 32, 32) for o in outs)
    CombinedLoss()(outs, torch.randint(0, NUM_CLASSES, (2, 32, 32))).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    model.eval()
    with torch.no_grad():
        mean = model(x)
        model.training = True  # the top module only: its BN layers stay in eval mode
        outs = model(x)
    assert torch.allclose(mean, torch.stack(outs).mean(dim=0))
