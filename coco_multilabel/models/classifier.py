"""The LightningModule: a pretrained backbone, a dropout + linear head over 80 logits, BCE loss."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from coco_multilabel.classes import NUM_CLASSES
from coco_multilabel.errors import UserError
from coco_multilabel.metrics import metric_collection


def _plain(cfg):
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg


class MultiLabelClassifier(L.LightningModule):
    """Multi-label classifier. ``backbone``, ``optimizer``, ``scheduler`` and ``loss`` are Hydra
    configs (dicts with ``_target_``), kept in the checkpoint so that it rebuilds the model alone.

    The decision thresholds are a buffer, so they travel inside every checkpoint; the
    ThresholdTuner callback sets them, and logs the val metrics, at each validation.
    """

    def __init__(
        self,
        backbone: dict,
        optimizer: dict,
        scheduler: dict | None = None,
        loss: dict | None = None,
        num_classes: int = NUM_CLASSES,
        dropout: float = 0.2,
        freeze_backbone: bool = False,
        channels_last: bool = True,
    ):
        super().__init__()
        backbone, optimizer, scheduler, loss = map(_plain, (backbone, optimizer, scheduler, loss))
        self.save_hyperparameters(
            dict(backbone=backbone, optimizer=optimizer, scheduler=scheduler, loss=loss,
                 num_classes=num_classes, dropout=dropout, freeze_backbone=freeze_backbone,
                 channels_last=channels_last)
        )  # fmt: skip
        self.backbone = instantiate(backbone)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.backbone.num_features, num_classes))
        self.criterion = instantiate(loss) if loss else nn.BCEWithLogitsLoss()
        self.register_buffer("thresholds", torch.full((num_classes,), 0.5))
        if freeze_backbone:
            self.backbone.requires_grad_(False)
        if channels_last:
            self.to(memory_format=torch.channels_last)
        self.train_metrics = metric_collection(num_classes).clone(prefix="train/")

    def train(self, mode: bool = True):
        """A frozen backbone stays in eval mode: its batch-norm statistics must not drift."""
        super().train(mode)
        if self.hparams.freeze_backbone:
            self.backbone.eval()
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits of images (N x 3 x H x W), or of backbone features (N x D) from the feature cache."""
        if images.dim() == 2:
            return self.head(images)
        if self.hparams.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.hparams.freeze_backbone):
            features = self.backbone(images)
        return self.head(features)

    def training_step(self, batch, batch_idx):
        images, targets = batch
        logits = self(images)
        loss = self.criterion(logits, targets)
        self.train_metrics.update(logits.detach().sigmoid(), targets.long())
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(images))
        self.log_dict(self.train_metrics, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        images, targets = batch
        logits = self(images)
        loss = self.criterion(logits, targets)
        self.log("val/loss", loss, on_epoch=True, prog_bar=True, batch_size=len(images))
        return {"probs": logits.sigmoid(), "targets": targets}  # the ThresholdTuner scores the epoch

    def predict_step(self, batch, batch_idx):
        return self(batch[0]).sigmoid()

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = instantiate(self.hparams.optimizer)(params)
        if not self.hparams.scheduler:
            return optimizer
        total_steps = self.trainer.estimated_stepping_batches
        if not math.isfinite(total_steps):
            raise UserError(
                "a learning-rate scheduler needs trainer.max_epochs or max_steps; or use scheduler=none"
            )
        scheduler = instantiate(self.hparams.scheduler)(optimizer, total_steps=int(total_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    @classmethod
    def from_checkpoint(
        cls, checkpoint: dict | str | Path, source: str | Path = "checkpoint"
    ) -> MultiLabelClassifier:
        """Rebuild from a checkpoint (a path, or the dict ``read_checkpoint`` returned) without
        downloading the backbone's pretrained weights again."""
        if not isinstance(checkpoint, dict):
            checkpoint, source = read_checkpoint(checkpoint), checkpoint
        hparams = dict(checkpoint["hyper_parameters"])
        backbone = dict(hparams["backbone"])
        for key, empty in (("weights", None), ("pretrained", False), ("weights_file", None)):
            if key in backbone:
                backbone[key] = empty  # the checkpoint holds the trained weights
        try:
            model = cls(**{**hparams, "backbone": backbone})
        except Exception as err:  # a backbone this installation cannot build: name it
            raise UserError(
                f"{source} holds a {backbone.get('name') or backbone.get('_target_')} model that cannot be "
                f"rebuilt here ({type(err).__name__}: {err}); is it from another project or version?"
            ) from err
        try:
            model.load_state_dict(checkpoint["state_dict"])
        except RuntimeError as err:
            raise UserError(f"{source} does not fit the model it describes: {err}") from err
        return model.eval()


def read_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """A Lightning checkpoint of this project, or a UserError saying what is wrong with the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; runs keep theirs in <run dir>/checkpoints/")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:
        raise UserError(f"checkpoint {path} is not readable ({err}); is the file complete?") from err
    if (
        not isinstance(checkpoint, dict)
        or "hyper_parameters" not in checkpoint
        or "backbone" not in checkpoint.get("hyper_parameters", {})
    ):
        raise UserError(f"{path} is not a coco-multilabel checkpoint (no model hyper-parameters in it)")
    return checkpoint
