"""TernausNet: the shared model checks plus loading VGG11 encoder weights from a local file."""
import pytest
import torch

from bloodcells.errors import BloodcellsError
from bloodcells.segmenter.models import create_model

from .base import ModelTest


class TestTernausNet(ModelTest):
    arch = "ternausnet"


def test_encoder_is_vgg11_indexed_like_torchvision() -> None:
    model = create_model("ternausnet")  # width=32: the paper's, and torchvision's, widths
    convs = {i: m.out_channels for i, m in enumerate(model.encoder) if isinstance(m, torch.nn.Conv2d)}
    assert convs == {0: 64, 3: 128, 6: 256, 8: 256, 11: 512, 13: 512, 16: 512, 18: 512}
    assert [i for i, m in enumerate(model.encoder) if isinstance(m, torch.nn.MaxPool2d)] == [2, 5, 10, 15, 20]


def test_loads_local_vgg11_weights(tmp_path) -> None:
    torch.manual_seed(5)
    donor = create_model("ternausnet", width=4)
    state = {f"features.{k}": v for k, v in donor.encoder.state_dict().items()}
    state["classifier.0.weight"] = torch.zeros(3, 3)  # a full vgg11 dict also has a classifier; ignored
    path = tmp_path / "vgg11.pth"
    torch.save(state, path)
    torch.manual_seed(6)
    model = create_model("ternausnet", width=4, encoder_weights=str(path))
    for k, v in donor.encoder.state_dict().items():
        assert torch.equal(model.encoder.state_dict()[k], v), k
    assert not torch.equal(model.head.weight, donor.head.weight)  # only the encoder was loaded
    assert model.config["encoder_weights"] is None and model.encoder_weights == str(path)


def test_weights_file_errors_are_clear(tmp_path) -> None:
    with pytest.raises(BloodcellsError, match="VGG11 encoder weights not found"):
        create_model("ternausnet", width=4, encoder_weights=str(tmp_path / "missing.pth"))
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(BloodcellsError, match="keys do not match torchvision's vgg11"):
        create_model("ternausnet", width=4, encoder_weights=str(tmp_path / "other.pth"))
    big = create_model("ternausnet", width=8).encoder.state_dict()
    torch.save({f"features.{k}": v for k, v in big.items()}, tmp_path / "wide.pth")
    with pytest.raises(BloodcellsError, match="width=32"):
        create_model("ternausnet", width=4, encoder_weights=str(tmp_path / "wide.pth"))
