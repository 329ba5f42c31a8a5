"""The LightningModule: a pretrained backbone, a dropout + linear head over 80 logits, a loss."""

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

    ``unfreeze_at_epoch`` is the linear-probe-then-fine-tune schedule: the backbone stays frozen
    (and its features may come from the cache) until that epoch, then trains at the optimizer's lr
    times ``backbone_lr_scale`` while the schedule starts a new cycle. ``tta`` averages the
    probabilities of each image and its mirror image, in validation and in submit.
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
        unfreeze_at_epoch: int | None = None,
        backbone_lr_scale: float = 1.0,
        tta: bool = False,
    ):
        super().__init__()
        backbone, optimizer, scheduler, loss = map(_plain, (backbone, optimizer, scheduler, loss))
        self.save_hyperparameters(
            dict(backbone=backbone, optimizer=optimizer, scheduler=scheduler, loss=loss,
                 num_classes=num_classes, dropout=dropout, freeze_backbone=freeze_backbone,
                 channels_last=channels_last, unfreeze_at_epoch=unfreeze_at_epoch,
                 backbone_lr_scale=backbone_lr_scale, tta=tta)
        )  # fmt: skip
        self.backbone = instantiate(backbone)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.backbone.num_features, num_classes))
        self.criterion = instantiate(loss) if loss else nn.BCEWithLogitsLoss()
        self.register_buffer("thresholds", torch.full((num_classes,), 0.5))
        self.backbone.requires_grad_(self.backbone_trainable(epoch=0))
        if channels_last:
            self.to(memory_format=torch.channels_last)
        self.train_metrics = metric_collection(num_classes).clone(prefix="train/")

    def backbone_trainable(self, epoch: int | None = None) -> bool:
        """Whether the backbone trains in ``epoch`` (default: the trainer's current epoch)."""
        if self.hparams.freeze_backbone:
            return False
        if self.hparams.unfreeze_at_epoch is None:
            return True
        if epoch is None:
            epoch = self.trainer.current_epoch if self._trainer is not None else 0
        return epoch >= self.hparams.unfreeze_at_epoch

    def on_train_epoch_start(self) -> None:
        self.backbone.requires_grad_(self.backbone_trainable())
        self.train()

    def on_fit_start(self) -> None:
        """A loss weighted by class frequency (``PositiveWeightedBCE``) learns them from the train split."""
        if hasattr(self.criterion, "fit_class_frequencies"):
            train_set = self.trainer.datamodule.train_set
            self.criterion.fit_class_frequencies(torch.stack(list(train_set.targets)).to(self.device))

    def train(self, mode: bool = True):
        """A frozen backbone stays in eval mode: its batch-norm statistics must not drift."""
        super().train(mode)
        if not self.backbone_trainable():
            self.backbone.eval()
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits of images (N x 3 x H x W), or of backbone features (N x D) from the feature cache."""
        if images.dim() == 2:
            return self.head(images)
        if self.hparams.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.backbone_trainable()):
            features = self.backbone(images)
        return self.head(features)

    def probabilities(self, inputs: torch.Tensor, tta: bool | None = None) -> torch.Tensor:
        """Class probabilities; with ``tta`` the mean over the image and its mirror image.

        ``inputs`` are images, cached features (N x D), or cached features with their mirror
        image's (N x 2 x D, as the feature cache serves val).
        """
        plain, mirrored = self._views(inputs)
        return self._average_mirror(self(plain).sigmoid(), mirrored, tta)

    @staticmethod
    def _views(inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the inputs, their mirror image's or None): cached pairs are split, images flipped."""
        if inputs.dim() == 3:
            return inputs[:, 0], inputs[:, 1]
        return inputs, inputs.flip(-1) if inputs.dim() == 4 else None

    def _average_mirror(self, probs: torch.Tensor, mirrored: torch.Tensor | None, tta: bool | None = None):
        if (self.hparams.tta if tta is None else tta) and mirrored is not None:
            return (probs + self(mirrored).sigmoid()) / 2
        return probs

    def training_step(self, batch, batch_idx):
        images, targets = batch
        logits = self(images)
        loss = self.criterion(logits, targets)
        self.train_metrics.update(logits.detach().sigmoid(), targets.long())
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(images))
        self.log_dict(self.train_metrics, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        inputs, targets = batch
        plain, mirrored = self._views(inputs)
        logits = self(plain)
        loss = self.criterion(logits, targets)
        self.log("val/loss", loss, on_epoch=True, prog_bar=True, batch_size=len(inputs))
        probs = self._average_mirror(logits.sigmoid(), mirrored)
        return {"probs": probs, "targets": targets}  # the ThresholdTuner scores the epoch

    def predict_step(self, batch, batch_idx):
        return self.probabilities(batch[0])

    def configure_optimizers(self):
        """The head at the optimizer's lr; a backbone that trains now or later at ``backbone_lr_scale``
        times it (a backbone still frozen has no gradients, so the optimizer leaves it alone)."""
        hp = self.hparams
        groups = [{"params": list(self.head.parameters())}]
        if not hp.freeze_backbone:
            base_lr = hp.optimizer.get("lr", 1e-3)
            groups.append({"params": list(self.backbone.parameters()), "lr": base_lr * hp.backbone_lr_scale})
        optimizer = instantiate(hp.optimizer)(groups)
        if not hp.scheduler:
            return optimizer
        total_steps = self.trainer.estimated_stepping_batches
        if not math.isfinite(total_steps):
            raise UserError(
                "a learning-rate scheduler needs trainer.max_epochs or max_steps; or use scheduler=none"
            )
        extra = {}
        if hp.unfreeze_at_epoch:  # the fine-tuning phase gets its own warm-up and decay
            if not str(hp.scheduler.get("_target_", "")).endswith("warmup_cosine"):
                raise UserError("model.unfreeze_at_epoch restarts the schedule: use scheduler=cosine or none")
            extra["restart_at"] = int(total_steps * hp.unfreeze_at_epoch / max(1, self.trainer.max_epochs))
        scheduler = instantiate(hp.scheduler)(optimizer, total_steps=int(total_steps), **extra)
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
