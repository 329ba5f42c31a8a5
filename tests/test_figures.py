"""TensorBoard figures: written at each validation, also when val batches are cached features."""

from types import SimpleNamespace

import pytest
from lightning.pytorch.loggers import CSVLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from coco_multilabel.callbacks.figures import TAGS, ValidationFigures


@pytest.mark.slow
def test_a_tiny_run_writes_every_figure_to_tensorboard(tensorboard_run):
    run_dir, _ = tensorboard_run  # its val batches are cached features: the grid reads the image files
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert set(TAGS) <= set(events.Tags()["images"])
    assert all(len(events.Images(tag)) == 2 for tag in TAGS)  # one per validation, none for the sanity check
    assert {"val/loss", "val/macro_f1_xfit", "train/loss_epoch"} <= set(events.Tags()["scalars"])
    assert any(tag.startswith("lr-") for tag in events.Tags()["scalars"])


def test_without_tensorboard_the_callback_does_nothing(tmp_path):
    trainer = SimpleNamespace(loggers=[CSVLogger(tmp_path)], callbacks=[])
    ValidationFigures().on_validation_end(trainer, pl_module=None)  # would fail on any attribute it needs
