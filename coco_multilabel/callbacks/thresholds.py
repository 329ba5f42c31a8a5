"""The ThresholdTuner callback: at every validation, choose the decision thresholds on val and
store them in the model, so that every checkpoint carries the thresholds submit uses, tuned and
scored for the rule submit applies (``min_labels``, stored beside them).

The maths (tuning, cross-fitting) lives in :mod:`coco_multilabel.decisions.thresholds`.
"""

from __future__ import annotations

import lightning as L
import torch

from coco_multilabel.decisions.thresholds import evaluate_thresholds
from coco_multilabel.metrics import OBJECTIVES


class ThresholdTuner(L.Callback):
    """Scores every validation at 0.5 and at tuned thresholds, and stores the tuned thresholds.

    Logs ``val/<score>`` (at 0.5), ``val/<score>_tuned``, ``val/<objective>_xfit`` (cross-fitted,
    the figure to compare runs by and the default checkpoint monitor), ``val/map`` and
    ``val/threshold`` (the global one), all of them of the decision rule submit applies: classes
    above the threshold and at least each image's ``min_labels`` most likely. In ``per_class`` mode
    the global-threshold figures are logged too, as ``val/<objective>_tuned_global`` and
    ``val/<objective>_xfit_global``. The thresholds go into the model's ``thresholds`` buffer and,
    with how they were chosen and the rule, into every checkpoint saved after this validation, with
    the val probabilities themselves (``val_predictions``: the out-of-fold probabilities of a
    cross-validation fold).
    """

    def __init__(
        self,
        mode: str = "global",
        objective: str = "macro_f1",
        min_positives: int = 5,
        shrinkage: float = 10.0,
        seed: int = 0,
        min_labels: int = 1,
    ):
        if objective not in OBJECTIVES:
            raise ValueError(f"thresholds.objective must be one of {OBJECTIVES}, got {objective!r}")
        if mode not in ("global", "per_class"):
            raise ValueError(f"thresholds.mode must be 'global' or 'per_class', got {mode!r}")
        if min_labels < 0:
            raise ValueError(f"thresholds.min_labels must be 0 or more, got {min_labels}")
        self.mode, self.objective, self.seed, self.min_labels = mode, objective, seed, min_labels
        self.per_class_kwargs = dict(min_positives=min_positives, shrinkage=shrinkage)
        self._probs: list[torch.Tensor] = []
        self._targets: list[torch.Tensor] = []
        self._indices: list[torch.Tensor] = []
        self.tuned: dict | None = None
        # the last validation's N x C probabilities and targets, for the figures callback
        self.probs: torch.Tensor | None = None
        self.targets: torch.Tensor | None = None
        self.predictions: dict | None = None  # with their stems, saved in the checkpoints

    def on_validation_epoch_start(self, trainer, pl_module):
        self._probs, self._targets, self._indices = [], [], []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._probs.append(outputs["probs"].detach().float())
        self._targets.append(outputs["targets"].detach())
        if "indices" in outputs:
            self._indices.append(outputs["indices"].detach())

    def on_validation_epoch_end(self, trainer, pl_module):
        if trainer.sanity_checking or not self._probs:
            return
        probs, targets, indices = torch.cat(self._probs), torch.cat(self._targets), None
        if len(self._indices) == len(self._probs):
            probs, targets, indices = gather_by_index(
                pl_module.all_gather, probs, targets, torch.cat(self._indices)
            )
        else:  # a model whose batches carry no indices: every rank must hold as many rows
            n_classes = pl_module.hparams.num_classes
            probs = pl_module.all_gather(probs).reshape(-1, n_classes)
            targets = pl_module.all_gather(targets).reshape(-1, n_classes)
        probs, targets = probs.cpu(), targets.cpu()
        self._probs, self._targets, self._indices = [], [], []
        self.probs, self.targets = probs, targets
        self.predictions = val_predictions(trainer, probs, targets, indices)
        metrics = evaluate_thresholds(
            probs, targets, self.mode, self.objective, self.seed, min_labels=self.min_labels,
            **self.per_class_kwargs,
        )  # fmt: skip
        tuning = metrics.pop("tuning")
        pl_module.thresholds.copy_(tuning.thresholds.to(pl_module.thresholds))
        for name, value in metrics.items():
            pl_module.log(f"val/{name}", value, prog_bar=name == f"{self.objective}_xfit")
        self.tuned = {
            "objective": self.objective,
            "mode": self.mode,
            "thresholds": [round(float(t), 4) for t in tuning.thresholds],
            "global_threshold": tuning.global_threshold,
            "min_labels": self.min_labels,
            "images": len(probs),
            "support": [int(s) for s in targets.sum(0)],
            "score_tuned": metrics[f"{self.objective}_tuned"],
            "score_xfit": metrics[f"{self.objective}_xfit"],
            **self.per_class_kwargs,
        }

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        """Say in the checkpoint how its ``thresholds`` buffer was chosen (submit reports it)."""
        if self.tuned is not None:
            checkpoint["threshold_tuning"] = dict(self.tuned)
        if self.predictions is not None:  # best.ckpt: its epoch's, for out-of-fold tables
            checkpoint["val_predictions"] = dict(self.predictions)


def val_predictions(trainer, probs: torch.Tensor, targets: torch.Tensor, indices) -> dict | None:
    """The val images' stems, probabilities and targets, row for row; None where the rows cannot
    be matched to stems (batches without dataset indices)."""
    images = getattr(trainer.datamodule, "val_images", None)
    if images is None or indices is None:
        return None
    every = images.stems
    stems = [every[i] for i in indices.tolist()]
    return {"stems": stems, "probs": probs.clone(), "targets": targets.clone()}


def gather_by_index(all_gather, probs: torch.Tensor, targets: torch.Tensor, indices: torch.Tensor):
    """Every rank's val rows and their dataset indices, each sample once, in dataset order.

    ``all_gather`` needs the same shape on every rank, and ranks hold different row counts when
    images were skipped: each pads to the largest count with index -1. A DistributedSampler pads
    the last ranks with repeats of the first samples: those are dropped by index. Without a
    process group ``all_gather`` returns its input and this just orders the rows.
    """
    count = torch.tensor([len(indices)], device=indices.device)
    most = int(all_gather(count).max())
    pad = most - len(indices)
    indices = torch.cat([indices.long(), indices.new_full((pad,), -1, dtype=torch.long)])
    probs = torch.cat([probs, probs.new_zeros(pad, *probs.shape[1:])])
    targets = torch.cat([targets, targets.new_zeros(pad, *targets.shape[1:])])
    indices = all_gather(indices).reshape(-1)
    probs = all_gather(probs).reshape(len(indices), -1)
    targets = all_gather(targets).reshape(len(indices), -1)
    real = indices >= 0
    indices, probs, targets = indices[real], probs[real], targets[real]
    ordered, order = torch.sort(indices, stable=True)
    first = torch.ones_like(ordered, dtype=torch.bool)
    first[1:] = ordered[1:] != ordered[:-1]
    keep = order[first]
    return probs[keep], targets[keep], indices[keep]
