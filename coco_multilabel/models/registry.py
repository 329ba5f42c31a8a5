"""What a model config may build: the project's backbone builders, losses, optimizers and schedulers.

A checkpoint stores the model's configs (dicts with ``_target_``) so that it rebuilds the model
alone; but a checkpoint is a file anyone can pass around, and Hydra's ``instantiate`` imports and
calls whatever ``_target_`` names (its own blocklist lets ``shutil.copyfile`` or ``builtins.open``
through). So every ``_target_`` of a model config, from a checkpoint or from the command line, must
be one of these before anything is built: a config is data, never code.
"""

from __future__ import annotations

import torch
from torch import nn

from coco_multilabel.errors import UserError

BUILDERS = {
    "backbone": {
        "coco_multilabel.models.backbones.torchvision_backbone",
        "coco_multilabel.models.backbones.timm_backbone",
        "coco_multilabel.models.backbones.efficientnet_lite",
    },
    "loss": {
        "coco_multilabel.models.losses.AsymmetricLoss",
        "coco_multilabel.models.losses.PositiveWeightedBCE",
        "timm.loss.AsymmetricLossMultiLabel",
    },
    "optimizer": set(),
    "scheduler": {"coco_multilabel.models.schedulers.warmup_cosine"},
}
# Classes of these torch modules count too, found by attribute lookup (nothing is imported):
# every optimizer of torch.optim, every scheduler of torch.optim.lr_scheduler, every loss of torch.nn.
TORCH_FAMILIES = {
    "optimizer": ("torch.optim", torch.optim, torch.optim.Optimizer),
    "scheduler": ("torch.optim.lr_scheduler", torch.optim.lr_scheduler, torch.optim.lr_scheduler.LRScheduler),
    "loss": ("torch.nn", nn, nn.modules.loss._Loss),
}
SLOTS = tuple(BUILDERS)


def allowed(slot: str, target: object) -> bool:
    """Whether ``target`` (a ``_target_`` value) names a builder of ``slot``."""
    if not isinstance(target, str):
        return False
    if target in BUILDERS[slot]:
        return True
    family = TORCH_FAMILIES.get(slot)
    if family is None:
        return False
    prefix, module, base = family
    owner, _, name = target.rpartition(".")
    candidate = getattr(module, name, None) if owner == prefix and not name.startswith("_") else None
    return isinstance(candidate, type) and issubclass(candidate, base)


def check_model_configs(hparams: dict, source: str) -> None:
    """A UserError naming the first ``_target_`` of ``hparams`` outside the allowlist and ``source``.

    Each slot (``backbone``, ``loss``, ``optimizer``, ``scheduler``) is a dict whose own
    ``_target_`` must be a builder of that slot; a ``_target_`` nested anywhere inside it would be
    built too (Hydra instantiates recursively), so none may be there.
    """
    for slot in SLOTS:
        cfg = hparams.get(slot)
        if not cfg and slot not in ("backbone", "optimizer"):  # scheduler=none is an empty dict
            continue
        if not isinstance(cfg, dict) or "_target_" not in cfg:
            raise UserError(f"{source}: its {slot} config is not a dict with a _target_ ({cfg!r:.80})")
        if not allowed(slot, cfg["_target_"]):
            _refuse(source, f"{slot}._target_", cfg["_target_"], slot)
        for key, value in cfg.items():
            nested = _nested_target(value)
            if nested is not None:
                _refuse(source, f"{slot}.{key}", nested, slot)


def _nested_target(value):
    if isinstance(value, dict):
        if "_target_" in value:
            return value["_target_"]
        value = list(value.values())
    if isinstance(value, list | tuple):
        for item in value:
            found = _nested_target(item)
            if found is not None:
                return found
    return None


def _refuse(source: str, where: str, target, slot: str) -> None:
    raise UserError(
        f"{source}: {where} is {str(target)!r:.120}, which is not one of this project's {slot} builders; "
        "refused without building anything (a config may only name "
        + (
            "the backbones of conf/backbone/"
            if slot == "backbone"
            else f"a torch {slot} or one of conf/{slot}/"
        )
        + "); use a checkpoint or config made by coco-multilabel"
    )
