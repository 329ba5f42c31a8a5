"""EMA of the weights: Lightning's EMAWeightAveraging, keeping the tuned thresholds out of the average.

The averaged weights are the ones validated and saved as the checkpoint's ``state_dict`` (so submit
uses them); the raw weights are saved beside them as ``current_model_state`` and training goes on
from those. The decision thresholds are a buffer, and an average of thresholds tuned at different
epochs is no threshold at all: around each hook where Lightning moves weights between the model and
its average (public hooks only), the model keeps the thresholds the last validation chose.
"""

from __future__ import annotations

import contextlib

from lightning.pytorch.callbacks import EMAWeightAveraging


@contextlib.contextmanager
def thresholds_kept(pl_module):
    thresholds = pl_module.thresholds.clone()
    yield
    pl_module.thresholds.copy_(thresholds)


class EMAWeights(EMAWeightAveraging):
    def __init__(self, decay: float = 0.999, update_starting_at_step: int | None = None, **kwargs):
        super().__init__(decay=decay, update_starting_at_step=update_starting_at_step, **kwargs)

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        with thresholds_kept(pl_module):
            super().on_validation_epoch_start(trainer, pl_module)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        with thresholds_kept(pl_module):  # those the tuner chose in this validation
            super().on_validation_epoch_end(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        with thresholds_kept(pl_module):
            super().on_train_end(trainer, pl_module)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        checkpoint["state_dict"]["thresholds"] = pl_module.thresholds.clone()
