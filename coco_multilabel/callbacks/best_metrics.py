"""The val metrics of the best epoch: a sweep compares runs by their best checkpoint, not their last."""

from __future__ import annotations

import lightning as L


class BestMetrics(L.Callback):
    """After each validation, keep every ``val/*`` metric of the epoch with the best ``monitor``.

    Its state travels in the checkpoints, so a resumed run still knows its best epoch.
    """

    def __init__(self, monitor: str = "val/macro_f1_xfit", mode: str = "max"):
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        self.monitor, self.mode = monitor, mode
        self.best: dict[str, float] | None = None

    def on_validation_end(self, trainer, pl_module):
        value = trainer.callback_metrics.get(self.monitor)
        if trainer.sanity_checking or value is None:
            return
        value = float(value)
        if self.best is not None:
            previous = self.best[self.monitor]
            if (value <= previous) if self.mode == "max" else (value >= previous):
                return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        self.best = {**metrics, "best_epoch": trainer.current_epoch + 1}  # from 1, as people count

    def state_dict(self) -> dict:
        return {"best": self.best}

    def load_state_dict(self, state_dict: dict) -> None:
        self.best = state_dict["best"]
        if self.best is not None and "epoch" in self.best:  # saved before epochs were counted from 1
            self.best["best_epoch"] = self.best.pop("epoch") + 1


def best_epoch(result: dict) -> int | None:
    """The best epoch, counted from 1, of a summary or ``result.json`` (older ones kept the
    0-based ``epoch``)."""
    if result.get("best_epoch") is not None:
        return result["best_epoch"]
    return None if result.get("epoch") is None else result["epoch"] + 1


def run_summary(trainer: L.Trainer) -> dict:
    """What a finished fit reports: the best checkpoint, its score, the epochs run (``epochs``) and
    the best one (``best_epoch``, counted from 1, over every phase), and the val metrics of the best
    epoch (of the last one when no BestMetrics callback kept them)."""
    checkpoint = trainer.checkpoint_callback
    score = checkpoint.best_model_score if checkpoint else None
    best_epoch = next((c.best for c in trainer.callbacks if isinstance(c, BestMetrics)), None)
    last_epoch = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    return {
        "best_checkpoint": checkpoint.best_model_path if checkpoint else "",
        "best_score": None if score is None else float(score),
        "epochs": trainer.current_epoch,
        "objective": checkpoint.monitor if checkpoint else None,
        "objective_mode": checkpoint.mode if checkpoint else None,
        **(best_epoch or last_epoch),
    }
