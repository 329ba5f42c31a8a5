"""With ``data.on_bad_image=skip`` a run goes on past unreadable images; it must still say so."""

from __future__ import annotations

import logging

import lightning as L

from coco_multilabel.data.labels import CHECK_DATA_HINT

log = logging.getLogger(__name__)


class SkippedImageReport(L.Callback):
    """At each epoch end, log how many images the DataModule left out (train and val together)."""

    def on_train_start(self, trainer, pl_module):
        self._take(trainer)  # the sanity check's batches are not part of an epoch

    def on_train_epoch_end(self, trainer, pl_module):
        skipped = self._take(trainer)
        if skipped is None:
            return
        pl_module.log("data/skipped_images", float(skipped))
        if skipped:
            log.warning(
                "epoch %d: skipped %d unreadable images; %s", trainer.current_epoch, skipped, CHECK_DATA_HINT
            )

    @staticmethod
    def _take(trainer) -> int | None:
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "skipped_images"):
            return None
        skipped, datamodule.skipped_images = datamodule.skipped_images, 0
        return skipped
