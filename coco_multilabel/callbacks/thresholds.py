"""Decision-threshold tuning: the leaderboard scores hard 0/1 labels, so the cut-off matters."""

from __future__ import annotations

import lightning as L
import torch

from coco_multilabel.metrics import macro_f1_at


def best_global_threshold(
    probs: torch.Tensor, targets: torch.Tensor, grid: torch.Tensor
) -> tuple[float, float]:
    """The threshold in ``grid`` with the highest macro F1, and that F1 (the lowest on ties)."""
    scores = macro_f1_at(probs, targets, grid)
    best = int(torch.argmax(scores))  # first maximum
    return round(float(grid[best]), 4), float(scores[best])


class ThresholdTuner(L.Callback):
    """At each validation end, pick the global threshold that maximises val macro F1.

    It is logged as ``val/threshold`` with ``val/f1_macro_tuned`` (the checkpoint monitor) and
    stored in the model's ``thresholds`` buffer, so the checkpoint saved for this epoch holds it.
    """

    def __init__(self, low: float = 0.02, high: float = 0.98, steps: int = 97):
        self.grid = torch.linspace(low, high, steps)
        self._probs: list[torch.Tensor] = []
        self._targets: list[torch.Tensor] = []
        self.tuned: dict | None = None

    def on_validation_epoch_start(self, trainer, pl_module):
        self._probs, self._targets = [], []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._probs.append(outputs["probs"].detach().float())
        self._targets.append(outputs["targets"].detach())

    def on_validation_epoch_end(self, trainer, pl_module):
        if trainer.sanity_checking or not self._probs:
            return
        probs = pl_module.all_gather(torch.cat(self._probs)).reshape(-1, pl_module.hparams.num_classes)
        targets = pl_module.all_gather(torch.cat(self._targets)).reshape(-1, pl_module.hparams.num_classes)
        threshold, score = best_global_threshold(probs.cpu(), targets.cpu(), self.grid)
        pl_module.thresholds.fill_(threshold)
        self.tuned = {"objective": "f1_macro", "mode": "global", "threshold": threshold, "score": score}
        pl_module.log("val/threshold", threshold, sync_dist=False)
        pl_module.log("val/f1_macro_tuned", score, prog_bar=True, sync_dist=False)
        self._probs, self._targets = [], []

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        """Say in the checkpoint how its ``thresholds`` buffer was chosen (submit reports it)."""
        if self.tuned is not None:
            checkpoint["threshold_tuning"] = dict(self.tuned)
