"""Every backbone source presents one shape: stem, stages, final block, pooled features, and the
preprocessing of its weights; a cut at any stage boundary composes back to the whole network."""

import pytest
import torch
import torchvision

from coco_multilabel.errors import UserError
from coco_multilabel.models.backbones import (
    TF_LITE_MEAN,
    efficientnet_lite,
    embedded_weights_path,
    load_by_position,
    timm_backbone,
    torchvision_backbone,
    without_downloads,
)

# one small network of every family we cut: torchvision's and timm's, and the embedded Lite
FAMILIES = {
    "torchvision ResNet": lambda: torchvision_backbone("resnet18"),
    "torchvision MobileNetV3": lambda: torchvision_backbone("mobilenet_v3_small"),
    "torchvision EfficientNet": lambda: torchvision_backbone("efficientnet_b0"),
    "torchvision EfficientNetV2": lambda: torchvision_backbone("efficientnet_v2_s"),
    "torchvision ConvNeXt": lambda: torchvision_backbone("convnext_tiny"),
    "torchvision RegNet": lambda: torchvision_backbone("regnet_y_400mf"),
    "timm ResNet": lambda: timm_backbone("resnet10t"),
    "timm EfficientNet": lambda: timm_backbone("efficientnet_b0"),
    "timm ConvNeXt": lambda: timm_backbone("convnext_atto"),
    "timm MobileNetV3": lambda: timm_backbone("mobilenetv3_small_050"),
    "timm RegNet": lambda: timm_backbone("regnetx_002"),
    "embedded EfficientNet-Lite": lambda: efficientnet_lite("efficientnet_lite0", weights=None),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def staged(request):
    torch.manual_seed(0)
    return FAMILIES[request.param]().eval()


@pytest.mark.slow
def test_pooled_features_are_the_source_networks_own(staged):
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(staged(images), staged.model(images), atol=1e-4)  # its classifier removed
    assert staged(images).shape == (2, staged.num_features)


@pytest.mark.slow
def test_every_cut_composes_back_to_the_whole_network(staged):
    images = torch.randn(2, 3, 64, 64)
    assert staged.chain and len(staged.stage_names) >= 3
    assert staged.stage_strides == sorted(staged.stage_strides) and staged.stage_strides[-1] == 32
    with torch.no_grad():
        whole, feature_map = staged(images), staged.feature_map(images)
        assert feature_map.shape[1] == staged.map_channels
        for top_stages in range(len(staged.stage_names)):
            trunk = staged.trunk(images, top_stages, spatial=False)
            if top_stages:
                stage = len(staged.stage_names) - top_stages - 1
                assert trunk.shape[1] == staged.stage_channels[stage]
                assert trunk.shape[-1] == 64 // staged.stage_strides[stage]
            assert torch.allclose(staged.top(trunk, top_stages, spatial=False), whole, atol=1e-4)
            maps = staged.top(staged.trunk(images, top_stages, spatial=True), top_stages, spatial=True)
            assert torch.allclose(maps, feature_map, atol=1e-4)
    top = {id(p) for m in staged.top_modules(1) for p in m.parameters()}
    assert 0 < len(top) < len(list(staged.parameters()))


@pytest.mark.slow
def test_transformers_give_pooled_features_and_refuse_cuts_with_what_works():
    vit = timm_backbone("vit_tiny_patch16_224").eval()
    assert not vit.chain and vit(torch.zeros(1, 3, 224, 224)).shape == (1, vit.num_features)
    for top_stages, spatial, asked in ((1, False, "model.top_stages=1"), (0, True, "model.head=csra")):
        with pytest.raises(
            UserError, match=f"{asked} needs a backbone that runs as a chain.*experiment=lp_ft"
        ):
            vit.check_cut(top_stages, spatial)
    vit.check_cut(0, False)  # a linear head on pooled features works
    tv_vit = torchvision_backbone("vit_b_16")
    assert not tv_vit.chain and tv_vit.num_features == 768
    with pytest.raises(UserError, match="has 4 stages, so at most 3"):
        torchvision_backbone("resnet18").check_cut(4, False)


@pytest.mark.slow
def test_preprocessing_comes_from_the_weights_without_downloading():
    # the enum's transforms are read without fetching the weights (weights_file stands in for them)
    regnet = torchvision.models.get_model_weights("regnet_y_400mf")["IMAGENET1K_V2"].transforms()
    assert regnet.crop_size == [224] and regnet.resize_size == [232]
    assert timm_backbone("convnext_atto").preprocessing.mean == pytest.approx((0.485, 0.456, 0.406))
    assert timm_backbone("inception_v3").preprocessing.mean == pytest.approx((0.5, 0.5, 0.5))
    assert timm_backbone("inception_v3").preprocessing.native_size == 299
    assert efficientnet_lite("efficientnet_lite0").preprocessing.mean == TF_LITE_MEAN  # TF's weights
    assert efficientnet_lite("efficientnet_lite2").preprocessing.native_size == 260


def test_torchvision_weights_file_is_loaded_with_its_enums_preprocessing(tmp_path):
    reference = torchvision.models.regnet_y_400mf()
    path = tmp_path / "regnet.pth"
    torch.save(reference.state_dict(), path)
    staged = torchvision_backbone("regnet_y_400mf", weights="IMAGENET1K_V2", weights_file=str(path))
    assert torch.equal(staged.model.stem[0].weight, reference.stem[0].weight)
    assert staged.preprocessing.native_size == 224


def test_offline_keeps_embedded_and_local_weights_and_drops_hub_ones():
    assert without_downloads({"name": "resnet18", "weights": "IMAGENET1K_V1"})["weights"] is None
    assert without_downloads({"name": "x", "weights": "IMAGENET1K_V1", "weights_file": "f"})["weights"]
    assert without_downloads({"name": "efficientnet_lite0", "weights": "embedded"})["weights"] == "embedded"
    assert without_downloads({"name": "resnet18", "pretrained": True})["pretrained"] is False


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_embedded_lite_weights_map_every_tensor(name):
    shipped = torch.load(embedded_weights_path(name), map_location="cpu", weights_only=True)
    staged = efficientnet_lite(name, weights="embedded")
    loaded = list(staged.model.state_dict().values())
    # the package's classifier (last two tensors) is dropped: the backbone ends at pooled features
    assert len(loaded) == len(shipped) - 2
    for ours, theirs in zip(loaded, shipped.values(), strict=False):
        assert torch.equal(ours, theirs)
    assert staged.num_features == 1280
    assert staged(torch.zeros(1, 3, 64, 64)).shape == (1, 1280)


def test_load_by_position_rejects_other_architectures():
    model = efficientnet_lite("efficientnet_lite0", weights=None).model
    state = dict(torch.nn.Linear(3, 2).state_dict())
    with pytest.raises(UserError, match="2 tensors"):
        load_by_position(model, state, source="other.pth")
    shaped = dict(model.state_dict())
    first = next(iter(shaped))
    shaped[first] = torch.zeros(1)
    with pytest.raises(UserError, match=rf"other.pth: tensor 0 '{first}' has shape \(1,\)"):
        load_by_position(model, shaped, source="other.pth")


def test_unknown_names_and_missing_files_are_clear_errors(tmp_path):
    with pytest.raises(UserError, match="missing.pth does not exist"):
        torchvision_backbone("resnet18", weights_file=str(tmp_path / "missing.pth"))
    with pytest.raises(UserError, match="torchvision backbone 'resnet19'"):
        torchvision_backbone("resnet19")
    with pytest.raises(UserError, match="timm backbone 'no_such_net'"):
        timm_backbone("no_such_net")
