"""EMA of the weights: Lightning's EMAWeightAveraging, keeping the tuned thresholds out of the average.

The averaged weights are the ones validated and saved as the checkpoint's ``state_dict`` (so submit
uses them); the raw weights are saved beside them as ``current_model_state`` and training goes on
from those. The decision thresholds are a buffer, and an average of thresholds tuned at different
epochs is no threshold at all: they stay those the last validation chose.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import EMAWeightAveraging


class EMAWeights(EMAWeightAveraging):
    def __init__(self, decay: float = 0.999, update_starting_at_step: int | None = None, **kwargs):
        super().__init__(decay=decay, update_starting_at_step=update_starting_at_step, **kwargs)

    def _swap_models(self, pl_module) -> None:
        thresholds = pl_module.thresholds.clone()
        super()._swap_models(pl_module)
        pl_module.thresholds.copy_(thresholds)

    def _copy_average_to_current(self, pl_module) -> None:
        thresholds = pl_module.thresholds.clone()
        super()._copy_average_to_current(pl_module)
        pl_module.thresholds.copy_(thresholds)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        checkpoint["state_dict"]["thresholds"] = pl_module.thresholds.clone()
