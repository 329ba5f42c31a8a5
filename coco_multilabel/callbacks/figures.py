"""Figures in TensorBoard at each validation: what the numbers alone do not show.

Per-class F1 bars, precision-recall curves, F1 against the threshold, and a few val images with
their true and predicted class names. Drawn from the probabilities the ThresholdTuner gathered
for the epoch (nothing is predicted twice), once per validation on rank zero; a no-op without a
TensorBoard logger.
"""

from __future__ import annotations

import logging

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from coco_multilabel.callbacks.thresholds import ThresholdTuner
from coco_multilabel.classes import COCO_CLASSES
from coco_multilabel.data.datasets import CocoImages
from coco_multilabel.data.transforms import eval_transform
from coco_multilabel.decisions.thresholds import count_table, decide
from coco_multilabel.errors import UserError
from coco_multilabel.metrics import per_class_table
from coco_multilabel.reporting import plots

log = logging.getLogger(__name__)

TAGS = ("val/per_class_f1", "val/pr_curves", "val/f1_vs_threshold", "val/examples")


class ValidationFigures(L.Callback):
    """Adds the figures of :data:`TAGS` to TensorBoard after every ``every_n_epochs`` validation.

    The example grid predicts its ``examples`` val images itself, from their files: the val batches
    may be cached features rather than images, and a handful of images costs nothing.
    """

    def __init__(self, examples: int = 8, every_n_epochs: int = 1):
        self.examples, self.every_n_epochs = examples, every_n_epochs

    def on_validation_end(self, trainer, pl_module):
        tensorboard = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
        tuner = next((c for c in trainer.callbacks if isinstance(c, ThresholdTuner)), None)
        if (
            tensorboard is None
            or tuner is None
            or tuner.probs is None
            or trainer.sanity_checking
            or not trainer.is_global_zero
            or trainer.current_epoch % self.every_n_epochs
        ):
            return
        probs, targets = tuner.probs, tuner.targets
        names = COCO_CLASSES[: targets.shape[1]]
        thresholds = pl_module.thresholds.cpu()
        rows = per_class_table(decide(probs, thresholds, tuner.min_labels), targets, names)
        counts = count_table(probs, targets, min_labels=tuner.min_labels)  # shared by two figures
        figures = {
            "val/per_class_f1": plots.per_class_figure(
                rows, f"per-class F1 on val, epoch {trainer.current_epoch + 1}"
            ),
            "val/pr_curves": plots.pr_curves_figure(probs, targets, names, counts=counts),
            "val/f1_vs_threshold": plots.threshold_figure(
                probs, targets, (tuner.tuned or {}).get("global_threshold"), tuner.objective, counts
            ),
        }
        if self.examples and (grid := self.examples_grid(trainer, pl_module, names, tuner)) is not None:
            figures["val/examples"] = grid
        for tag, figure in figures.items():
            tensorboard.experiment.add_figure(tag, figure, global_step=trainer.global_step)

    def examples_grid(self, trainer, pl_module, names, tuner: ThresholdTuner):
        """The first val images, decided at the model's current thresholds, by the tuner's rule."""
        datamodule = trainer.datamodule
        split, hp = getattr(datamodule, "split", None), getattr(datamodule, "hparams", {})
        if not split or not hp.get("root"):
            return None
        try:
            transform = eval_transform(image_size=hp["image_size"], resize=hp.get("eval_resize", "crop"))
            dataset = CocoImages.labelled(
                hp["root"], split["val"][: self.examples], transform,
                len(names), hp["image_size"],
            )  # fmt: skip
            samples = [dataset[i] for i in range(len(dataset))]
            images, targets = (torch.stack([s[key] for s in samples]) for key in ("images", "targets"))
        except UserError as err:  # an unreadable val image: the run goes on, without the grid
            log.warning("no example grid this epoch: %s", err)
            return None
        training = pl_module.training
        pl_module.eval()
        with torch.no_grad():
            probs = pl_module.probabilities({"images": images.to(pl_module.device)}).cpu()
        pl_module.train(training)
        predicted = decide(probs, pl_module.thresholds.cpu(), tuner.min_labels)
        pictures = [np.asarray(image.permute(1, 2, 0)) for image in images]  # uint8, as decoded
        return plots.examples_figure(
            pictures,
            [[names[c] for c in torch.nonzero(t).flatten()] for t in targets],
            [
                [names[c] for c in torch.argsort(p, descending=True) if hit[c]]
                for p, hit in zip(probs, predicted, strict=True)
            ],
        )
