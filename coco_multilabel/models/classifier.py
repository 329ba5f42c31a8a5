"""The LightningModule: a pretrained backbone, a dropout + linear head over 80 logits, a loss."""

from __future__ import annotations

import math

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from coco_multilabel.classes import NUM_CLASSES
from coco_multilabel.errors import UserError
from coco_multilabel.metrics import metric_collection
from coco_multilabel.models import backbone_parts
from coco_multilabel.models.heads import ClassSpecificResidualAttention

HEADS = ("linear", "csra")


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

    ``top_stages`` cuts the backbone (backbone_parts.py): its last stages and final convolution
    train from the first epoch, at ``backbone_lr_scale`` times the lr, while the trunk below them
    stays frozen as ``freeze_backbone`` / ``unfreeze_at_epoch`` say; the feature cache then keeps
    the trunk's feature maps. ``head`` is ``linear`` (average pooling, dropout, linear) or ``csra``
    (class-specific residual attention over the feature map, weight ``csra_lambda``).
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
        head: str = "linear",
        csra_lambda: float = 0.3,
        top_stages: int = 0,
    ):
        super().__init__()
        backbone, optimizer, scheduler, loss = map(_plain, (backbone, optimizer, scheduler, loss))
        self.save_hyperparameters(
            dict(backbone=backbone, optimizer=optimizer, scheduler=scheduler, loss=loss,
                 num_classes=num_classes, dropout=dropout, freeze_backbone=freeze_backbone,
                 channels_last=channels_last, unfreeze_at_epoch=unfreeze_at_epoch,
                 backbone_lr_scale=backbone_lr_scale, tta=tta, head=head, csra_lambda=csra_lambda,
                 top_stages=top_stages)
        )  # fmt: skip
        if head not in HEADS:
            raise UserError(f"model.head must be one of {', '.join(HEADS)}, got {head!r}")
        self.backbone = instantiate(backbone)
        backbone_parts.check_cut(
            self.backbone, top_stages, self.spatial, backbone.get("name", "this backbone")
        )
        features = self.backbone.num_features
        if head == "csra":
            self.head = ClassSpecificResidualAttention(features, num_classes, dropout, csra_lambda)
        else:
            self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(features, num_classes))
        self.criterion = instantiate(loss) if loss else nn.BCEWithLogitsLoss()
        self.register_buffer("thresholds", torch.full((num_classes,), 0.5))
        self._set_trainable(epoch=0)
        if channels_last:
            self.to(memory_format=torch.channels_last)
        self.train_metrics = metric_collection(num_classes).clone(prefix="train/")

    @property
    def spatial(self) -> bool:
        """Whether the head reads feature maps rather than pooled features."""
        return self.hparams.head == "csra"

    def backbone_trainable(self, epoch: int | None = None) -> bool:
        """Whether the backbone (below its top stages) trains in ``epoch`` (default: the trainer's
        current epoch)."""
        if self.hparams.freeze_backbone:
            return False
        if self.hparams.unfreeze_at_epoch is None:
            return True
        if epoch is None:
            epoch = self.trainer.current_epoch if self._trainer is not None else 0
        return epoch >= self.hparams.unfreeze_at_epoch

    def _top_modules(self) -> list[nn.Module]:
        return backbone_parts.top_modules(self.backbone, self.hparams.top_stages)

    def _set_trainable(self, epoch: int | None = None) -> None:
        self.backbone.requires_grad_(self.backbone_trainable(epoch))
        for module in self._top_modules():
            module.requires_grad_(True)

    def on_train_epoch_start(self) -> None:
        self._set_trainable()
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
            for module in self._top_modules():
                module.train(mode)
        return self

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Logits of images (N x 3 x H x W), or of what the feature cache keeps of them: the frozen
        trunk's output (pooled features N x D, or feature maps N x C x h x w)."""
        hp, grad = self.hparams, torch.is_grad_enabled()
        if self._is_images(inputs):
            with torch.set_grad_enabled(grad and self.backbone_trainable()):
                inputs = backbone_parts.trunk(
                    self.backbone, self._memory_format(inputs), hp.top_stages, self.spatial
                )
        features = backbone_parts.top(self.backbone, self._memory_format(inputs), hp.top_stages, self.spatial)
        return self.head(features)

    def trunk_features(self, images: torch.Tensor) -> torch.Tensor:
        """What the feature cache keeps: the frozen trunk's output, in eval mode, without gradients."""
        modes = {module: module.training for module in self.backbone.modules()}
        self.backbone.eval()
        try:
            with torch.no_grad():
                return backbone_parts.trunk(
                    self.backbone, self._memory_format(images), self.hparams.top_stages, self.spatial
                )
        finally:
            for module, training in modes.items():  # each as it was: the top may train, the trunk not
                module.training = training

    def trunk_cut(self) -> dict | None:
        """Where the trunk ends, for the feature cache's key; None: the whole backbone, pooled."""
        if not self.hparams.top_stages and not self.spatial:
            return None
        return {"top_stages": self.hparams.top_stages, "spatial": self.spatial}

    @staticmethod
    def _is_images(inputs: torch.Tensor) -> bool:
        return inputs.dim() == 4 and inputs.shape[1] == 3

    def _memory_format(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.hparams.channels_last and inputs.dim() == 4:
            return inputs.contiguous(memory_format=torch.channels_last)
        return inputs

    def probabilities(self, inputs: torch.Tensor, tta: bool | None = None) -> torch.Tensor:
        """Class probabilities; with ``tta`` the mean over the image and its mirror image.

        ``inputs`` are images, cached trunk outputs, or cached trunk outputs with their mirror
        image's (N x 2 x ..., as the feature cache serves val).
        """
        plain, mirrored = self._views(inputs)
        return self._average_mirror(self(plain).sigmoid(), mirrored, tta)

    @staticmethod
    def _views(inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the inputs, their mirror image's or None): cached pairs are split, images flipped."""
        if inputs.dim() in (3, 5):  # pairs of pooled features or of feature maps
            return inputs[:, 0], inputs[:, 1]
        return inputs, inputs.flip(-1) if MultiLabelClassifier._is_images(inputs) else None

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
        """The head at the optimizer's lr; a backbone (or its top) that trains now or later at
        ``backbone_lr_scale`` times it (frozen parameters have no gradients: the optimizer leaves
        them alone)."""
        hp = self.hparams
        groups = [{"params": list(self.head.parameters())}]
        if not hp.freeze_backbone or hp.top_stages:
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
