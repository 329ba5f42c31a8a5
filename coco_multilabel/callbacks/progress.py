"""Lightning's rich progress bar, with the throughput a user compares machines and settings by."""

from __future__ import annotations

from lightning.pytorch.callbacks import RichProgressBar
from rich.progress import ProgressColumn
from rich.text import Text


class ImagesPerSecond(ProgressColumn):
    """Batches per second times the batch size: images (or cached feature rows) per second."""

    def __init__(self, trainer):
        super().__init__()
        self.trainer = trainer

    def render(self, task) -> Text:
        hparams = getattr(getattr(self.trainer, "datamodule", None), "hparams", {})
        if task.speed is None or "batch_size" not in hparams:
            return Text("")
        return Text(f"{task.speed * hparams['batch_size']:.1f} img/s", style="grey70")


class ThroughputProgressBar(RichProgressBar):
    def configure_columns(self, trainer) -> list:
        return [*super().configure_columns(trainer), ImagesPerSecond(trainer)]
