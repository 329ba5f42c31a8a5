"""A backbone cut in two: the trunk, which stays frozen and whose output the feature cache keeps,
and the top (its last ``top_stages`` stages and final convolution), which trains.

Training the last stage adapts ImageNet features to COCO at a fraction of the cost of fine-tuning
everything: on cached trunk maps an epoch of Lite0 at 384 px takes seconds, where a full
fine-tuning epoch takes minutes (make ablation). A spatial head (CSRA) needs the feature map
itself, not its average, so the cut can also keep the final map unpooled.

Functions, not modules: the parts are views of ``backbone``, whose parameters keep their names in
checkpoints.
"""

from __future__ import annotations

import torch
from timm.models.efficientnet import EfficientNet
from torch import nn

from coco_multilabel.errors import UserError


def check_cut(backbone: nn.Module, top_stages: int, spatial: bool, name: str = "this backbone") -> None:
    """A UserError when ``backbone`` cannot be cut this way: it names the option and the fix."""
    if top_stages < 0:
        raise UserError(f"model.top_stages must be 0 or more, got {top_stages}")
    if top_stages and not isinstance(backbone, EfficientNet):
        raise UserError(
            f"model.top_stages={top_stages} needs a timm EfficientNet backbone (efficientnet_lite0..2, "
            f"or backbone=timm with an efficientnet_* name); {name} is a {type(backbone).__name__}: "
            "use model.top_stages=0, or experiment=lp_ft (the recipe every backbone supports)"
        )
    if top_stages and top_stages >= len(backbone.blocks):
        raise UserError(f"model.top_stages={top_stages}: {name} has {len(backbone.blocks)} stages")
    if spatial and not hasattr(backbone, "forward_features"):
        raise UserError(
            f"model.head=csra needs the backbone's feature map: use a timm backbone (efficientnet_lite*, "
            f"or backbone=timm); {name} is a {type(backbone).__name__} from torchvision: use "
            "model.head=linear, or experiment=lp_ft (the recipe every backbone supports)"
        )


def trunk(backbone: nn.Module, images: torch.Tensor, top_stages: int, spatial: bool) -> torch.Tensor:
    """What the frozen part makes of images: pooled features (N x D) when nothing above it needs
    the map, else a feature map (N x C x h x w)."""
    if top_stages:
        return backbone.blocks[:-top_stages](backbone.bn1(backbone.conv_stem(images)))
    return backbone.forward_features(images) if spatial else backbone(images)


def top(backbone: nn.Module, features: torch.Tensor, top_stages: int, spatial: bool) -> torch.Tensor:
    """The rest of the backbone on the trunk's output: the final map, pooled unless ``spatial``."""
    if top_stages:
        features = backbone.bn2(backbone.conv_head(backbone.blocks[-top_stages:](features)))
        return features if spatial else backbone.forward_head(features, pre_logits=True)
    return features


def top_modules(backbone: nn.Module, top_stages: int) -> list[nn.Module]:
    """The modules of the top: they train even while the trunk is frozen."""
    if not top_stages:
        return []
    return [*backbone.blocks[-top_stages:], backbone.conv_head, backbone.bn2]
