import pytest
import torch

from coco_multilabel.errors import UserError
from coco_multilabel.models.backbones import (
    efficientnet_lite,
    embedded_weights_path,
    load_by_position,
    timm_backbone,
    torchvision_backbone,
)


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_embedded_lite_weights_map_every_tensor(name):
    shipped = torch.load(embedded_weights_path(name), map_location="cpu", weights_only=True)
    model = efficientnet_lite(name, weights="embedded")
    loaded = list(model.state_dict().values())
    # the package's classifier (last two tensors) is dropped: the backbone ends at pooled features
    assert len(loaded) == len(shipped) - 2
    for ours, theirs in zip(loaded, shipped.values(), strict=False):
        assert torch.equal(ours, theirs)
    assert model.num_features == 1280
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 1280)


def test_load_by_position_rejects_other_architectures():
    model = efficientnet_lite("efficientnet_lite0", weights=None)
    state = dict(torch.nn.Linear(3, 2).state_dict())
    with pytest.raises(UserError, match="2 tensors"):
        load_by_position(model, state, source="other.pth")
    shaped = dict(model.state_dict())
    first = next(iter(shaped))
    shaped[first] = torch.zeros(1)
    with pytest.raises(UserError, match=rf"other.pth: tensor 0 '{first}' has shape \(1,\)"):
        load_by_position(model, shaped, source="other.pth")


@pytest.mark.parametrize("name, features", [("resnet18", 512), ("mobilenet_v3_small", 1024)])
def test_torchvision_backbones_end_in_pooled_features(name, features):
    model = torchvision_backbone(name, weights=None).eval()
    assert model.num_features == features
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, features)


def test_torchvision_weights_file_is_loaded(tmp_path):
    import torchvision

    reference = torchvision.models.resnet18()
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    model = torchvision_backbone("resnet18", weights="IMAGENET1K_V1", weights_file=str(path))
    assert torch.equal(model.conv1.weight, reference.conv1.weight)


def test_timm_backbone_by_name():
    model = timm_backbone("resnet10t").eval()
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, model.num_features)


def test_missing_weights_file_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="missing.pth does not exist"):
        torchvision_backbone("resnet18", weights_file=str(tmp_path / "missing.pth"))
