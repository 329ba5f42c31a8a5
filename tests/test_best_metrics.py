from types import SimpleNamespace

import torch

from coco_multilabel.callbacks.best_metrics import BestMetrics, best_epoch


def validate(callback, epoch, score, loss, sanity=False):
    metrics = {"val/macro_f1_xfit": torch.tensor(score), "val/loss": torch.tensor(loss), "train/loss": 1.0}
    trainer = SimpleNamespace(callback_metrics=metrics, current_epoch=epoch, sanity_checking=sanity)
    callback.on_validation_end(trainer, None)


def test_keeps_the_metrics_of_the_best_epoch_not_the_last():
    callback = BestMetrics()
    validate(callback, 0, 0.9, 0.1, sanity=True)  # the sanity check is not an epoch
    assert callback.best is None
    for epoch, score in enumerate([0.3, 0.5, 0.4, 0.5]):
        validate(callback, epoch, score, loss=epoch)
    # the first of the ties: Lightning's epoch 1 is the second, counted from 1 as a person reads it
    assert callback.best == {"val/macro_f1_xfit": 0.5, "val/loss": 1.0, "best_epoch": 2}
    restored = BestMetrics()
    restored.load_state_dict(callback.state_dict())  # resume keeps it
    validate(restored, 4, 0.45, 4.0)
    assert restored.best["best_epoch"] == 2


def test_minimised_monitor():
    callback = BestMetrics(monitor="val/loss", mode="min")
    for epoch, loss in enumerate([0.5, 0.2, 0.3]):
        validate(callback, epoch, 0.0, loss)
    assert callback.best["best_epoch"] == 2


def test_a_checkpoint_saved_with_the_0_based_epoch_is_read_as_counted_from_1():
    restored = BestMetrics()
    restored.load_state_dict({"best": {"val/macro_f1_xfit": 0.5, "epoch": 3}})
    assert restored.best == {"val/macro_f1_xfit": 0.5, "best_epoch": 4}
    assert best_epoch({"best_epoch": 4}) == 4 and best_epoch({"epoch": 3}) == 4  # old result.json
    assert best_epoch({"epochs": 2}) is None
