"""The LightningModule: a staged backbone, a head over 80 logits, a loss, trained phase by phase."""

from __future__ import annotations

import math
from collections.abc import Mapping

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from coco_multilabel.classes import NUM_CLASSES
from coco_multilabel.errors import UserError
from coco_multilabel.metrics import metric_collection
from coco_multilabel.models.heads import ClassSpecificResidualAttention
from coco_multilabel.models.registry import check_model_configs
from coco_multilabel.training.precision import (
    check_eval_precision,
    check_ranks_agree,
    eval_autocast,
    float32_head,
)
from coco_multilabel.training.schedule import Phase

HEADS = ("linear", "csra")


def _plain(cfg):
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg


class MultiLabelClassifier(L.LightningModule):
    """Multi-label classifier. ``backbone``, ``optimizer``, ``scheduler`` and ``loss`` are Hydra
    configs (dicts with ``_target_``), kept in the checkpoint so that it rebuilds the model alone.

    Images come in as they are decoded (uint8, or floats in [0, 1]) and are normalised here with
    the backbone's own statistics, on whatever device the model is: the preprocessing travels with
    the checkpoint. The decision thresholds are a buffer, so they travel inside every checkpoint;
    the ThresholdTuner callback sets them at each validation.

    What trains is the current :class:`Phase` (``set_phase``): the head, the backbone's
    ``top_stages`` top stages and the head, or everything. A frozen part stays in eval mode and its
    output may come from the feature cache instead of images (``trunk_features`` makes it): a batch
    says which it holds by its keys, ``images`` or ``features`` (``data/datasets.py``). ``head``
    is ``linear`` (pooled features, dropout, linear) or ``csra`` (class-specific residual attention
    over the feature map, weight ``csra_lambda``). ``tta`` averages the probabilities of each image
    and its mirror image, in validation and in submit.

    ``compile`` runs ``forward`` through ``torch.compile`` in training and validation (not submit,
    which may run where no compiler is): fewer kernel launches, the cost of small convolutions on a
    GPU; the first steps of each phase wait for the compiler.

    Logits and probabilities are float32 under any precision (the head runs outside autocast).
    Evaluation (validation, predict, submit) runs at ``eval_precision`` (``32``, ``bf16``, ``16``)
    whatever the trainer's: thresholds tuned in validation meet the same numbers in submit.
    """

    def __init__(
        self,
        backbone: dict,
        optimizer: dict,
        scheduler: dict | None = None,
        loss: dict | None = None,
        num_classes: int = NUM_CLASSES,
        dropout: float = 0.2,
        channels_last: bool = True,
        tta: bool = False,
        head: str = "linear",
        csra_lambda: float = 0.3,
        top_stages: int = 0,
        eval_precision: str = "32",
        compile: bool = False,
    ):
        super().__init__()
        backbone, optimizer, scheduler, loss = map(_plain, (backbone, optimizer, scheduler, loss))
        check_model_configs(
            dict(backbone=backbone, optimizer=optimizer, scheduler=scheduler, loss=loss), "model"
        )
        self.save_hyperparameters(
            dict(backbone=backbone, optimizer=optimizer, scheduler=scheduler, loss=loss,
                 num_classes=num_classes, dropout=dropout, channels_last=channels_last, tta=tta,
                 head=head, csra_lambda=csra_lambda, top_stages=top_stages,
                 eval_precision=check_eval_precision(eval_precision), compile=compile)
        )  # fmt: skip
        if head not in HEADS:
            raise UserError(f"model.head must be one of {', '.join(HEADS)}, got {head!r}")
        self.backbone = instantiate(backbone)
        self.backbone.check_cut(top_stages, self.spatial)
        if self.spatial:
            self.head = ClassSpecificResidualAttention(
                self.backbone.map_channels, num_classes, dropout, csra_lambda
            )
        else:
            self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.backbone.num_features, num_classes))
        self.criterion = instantiate(loss) if loss else nn.BCEWithLogitsLoss()
        self.register_buffer("thresholds", torch.full((num_classes,), 0.5))
        pre = self.backbone.preprocessing  # saved: a checkpoint rebuilt without its weights keeps them
        self.register_buffer("mean", torch.tensor(pre.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(pre.std).view(1, 3, 1, 1))
        self.set_phase(Phase("all", epochs=0))
        if channels_last:
            self.to(memory_format=torch.channels_last)
        self.train_metrics = metric_collection(num_classes).clone(prefix="train/")

    @property
    def spatial(self) -> bool:
        """Whether the head reads feature maps rather than pooled features."""
        return self.hparams.head == "csra"

    # --- what trains ------------------------------------------------------------------------------

    def set_phase(self, phase: Phase, index: int = 0) -> None:
        """``phase`` trains from now on (``training/schedule.top_stages_of`` matched the cut to it)."""
        self.phase, self.phase_index = phase, index
        self.backbone.requires_grad_(phase.train == "all")
        for module in self._top_modules():
            module.requires_grad_(True)
        self.train(self.training)

    def _top_modules(self) -> list[nn.Module]:
        return self.backbone.top_modules(self.hparams.top_stages) if self.phase.train == "top" else []

    def train(self, mode: bool = True):
        """A frozen part stays in eval mode: its batch-norm statistics must not drift."""
        super().train(mode)
        if self.phase.train != "all":
            self.backbone.eval()
            for module in self._top_modules():
                module.train(mode)
        return self

    def setup(self, stage: str) -> None:
        check_ranks_agree(self.trainer)
        if stage == "fit" and self.hparams.compile and self._compiled_call_impl is None:
            self.compile()  # torch.compile of forward, in place: the state dict keeps its names

    def on_fit_start(self) -> None:
        """A loss weighted by class frequency (``PositiveWeightedBCE``) learns them from the train split."""
        if hasattr(self.criterion, "fit_class_frequencies"):
            targets = self.trainer.datamodule.train_targets()
            self.criterion.fit_class_frequencies(targets.to(self.device))

    def on_train_epoch_start(self) -> None:
        self.log("phase", float(self.phase_index), on_step=False, on_epoch=True)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Resume continues in the phase where the run stopped."""
        checkpoint["phase"] = {"index": self.phase_index, **self.phase.record()}

    # --- forward ----------------------------------------------------------------------------------

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (or [0, 1] float) images to the backbone's input: ``(x / 255 - mean) / std``."""
        x = images.float().div_(255) if images.dtype == torch.uint8 else images.float()
        return self._memory_format((x - self.mean) / self.std)

    def forward(self, images: torch.Tensor | None = None, features: torch.Tensor | None = None):
        """Logits of ``images`` (N x 3 x H x W), or of ``features``, what the feature cache keeps of
        them: the frozen trunk's output (pooled features N x D, or feature maps N x C x h x w, often
        float16). Exactly one of the two."""
        if (images is None) == (features is None):
            raise ValueError("forward takes images or features, one of them")
        hp = self.hparams
        if images is not None:
            with torch.set_grad_enabled(torch.is_grad_enabled() and self.phase.train == "all"):
                features = self.backbone.trunk(self.normalize(images), hp.top_stages, self.spatial)
        else:
            features = self._memory_format(features.to(self.head_dtype))
        features = self.backbone.top(features, hp.top_stages, self.spatial)
        with float32_head(features.device):
            return self.head(features.to(self.head_dtype))

    def eval_autocast(self):
        """Validation and predict both compute under this (``eval_precision``)."""
        return eval_autocast(self.hparams.eval_precision, self.device)

    @property
    def head_dtype(self) -> torch.dtype:
        return next(self.head.parameters()).dtype

    def trunk_features(self, images: torch.Tensor) -> torch.Tensor:
        """What the feature cache keeps: the frozen trunk's output, in eval mode, without gradients,
        at ``eval_precision``: validation from the cache then sees what submit computes from images."""
        modes = {module: module.training for module in self.backbone.modules()}
        self.backbone.eval()
        try:
            with torch.no_grad(), self.eval_autocast():
                return self.backbone.trunk(self.normalize(images), self.hparams.top_stages, self.spatial)
        finally:
            for module, training in modes.items():  # each as it was: the top may train, the trunk not
                module.training = training

    def trunk_cut(self) -> dict:
        """Where the trunk ends, how images are normalised before it and at what precision it runs:
        the feature cache's key."""
        cut = {
            "top_stages": self.hparams.top_stages,
            "spatial": self.spatial,
            "mean": [round(float(m), 6) for m in self.mean.flatten()],
            "std": [round(float(s), 6) for s in self.std.flatten()],
        }
        if self.hparams.eval_precision != "32":  # float32 caches keep the keys they always had
            cut["eval_precision"] = self.hparams.eval_precision
        return cut

    def _memory_format(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.hparams.channels_last and inputs.dim() == 4:
            return inputs.contiguous(memory_format=torch.channels_last)
        return inputs

    def probabilities(self, batch: Mapping, tta: bool | None = None) -> torch.Tensor:
        """Class probabilities in float32 of a batch's ``images`` or ``features``; with ``tta`` the
        mean over each image and its mirror image (flipped here, or the batch's ``mirror_features``,
        as the feature cache serves val)."""
        with self.eval_autocast():
            return self._average_mirror(self(**self._inputs(batch)).float().sigmoid(), batch, tta)

    @staticmethod
    def _inputs(batch: Mapping, mirror: bool = False) -> dict | None:
        """``forward``'s arguments for the batch's inputs or, with ``mirror``, their mirror image's
        (images flipped here, cached ``mirror_features`` as served; None when the batch has none)."""
        if "images" in batch:
            return {"images": batch["images"].flip(-1) if mirror else batch["images"]}
        key = "mirror_features" if mirror else "features"
        return {"features": batch[key]} if key in batch else None

    def _average_mirror(self, probs: torch.Tensor, batch: Mapping, tta: bool | None = None):
        if (self.hparams.tta if tta is None else tta) and (mirrored := self._inputs(batch, True)) is not None:
            return (probs + self(**mirrored).float().sigmoid()) / 2
        return probs

    # --- steps ------------------------------------------------------------------------------------

    def training_step(self, batch, batch_idx):
        targets = batch["targets"]
        logits = self(**self._inputs(batch))
        loss = self.criterion(logits.float(), targets)
        self.train_metrics.update(logits.detach().float().sigmoid(), targets.long())
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(targets))
        self.log_dict(self.train_metrics, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        targets = batch["targets"]
        with self.eval_autocast():
            logits = self(**self._inputs(batch)).float()
            probs = self._average_mirror(logits.sigmoid(), batch)
        loss = self.criterion(logits, targets)
        self.log("val/loss", loss, on_epoch=True, prog_bar=True, batch_size=len(targets))
        # the ThresholdTuner scores the epoch; the dataset indices (when the batch has them) let it
        # drop a DistributedSampler's padded duplicates and restore the dataset's order
        indices = {"indices": batch["indices"]} if "indices" in batch else {}
        return {"probs": probs, "targets": targets, **indices}

    def predict_step(self, batch, batch_idx):
        return self.probabilities(batch)

    def configure_optimizers(self):
        """The head at the optimizer's lr, the backbone's trained parts at the phase's ``lr_scale``
        times it; no weight decay on norms and biases (timm's rule); a warm-up + cosine schedule
        over this phase's steps."""
        hp, phase = self.hparams, self.phase
        base_lr = hp.optimizer.get("lr", 1e-3)
        groups = decay_groups(self.head, base_lr, "head")
        groups += decay_groups(self.backbone, base_lr * phase.lr_scale, "backbone")
        optimizer = instantiate(hp.optimizer)(groups)
        if not hp.scheduler:
            return optimizer
        _ = self.trainer.estimated_stepping_batches  # loads the train data: num_training_batches is known
        batches = self.trainer.num_training_batches
        if not math.isfinite(batches):
            raise UserError("a learning-rate scheduler needs a sized train set; or use scheduler=none")
        per_epoch = math.ceil(batches / self.trainer.accumulate_grad_batches)
        scheduler = instantiate(hp.scheduler)(optimizer, total_steps=max(1, per_epoch * phase.epochs))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def decay_groups(module: nn.Module, lr: float, name: str) -> list[dict]:
    """``module``'s trainable parameters in two groups at ``lr``: weights with the optimizer's
    weight decay, norms and biases (1-d parameters) without, as timm's ``param_groups_weight_decay``.
    Named, so the learning-rate monitor logs ``lr-<optimizer>/<name>``."""
    decay, no_decay = [], []
    for key, param in module.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 or key.endswith(".bias") else decay).append(param)
    groups = [
        {"params": decay, "lr": lr, "name": name},
        {"params": no_decay, "lr": lr, "weight_decay": 0.0, "name": f"{name}/no_decay"},
    ]
    return [g for g in groups if g["params"]]
