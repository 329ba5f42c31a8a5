"""Evaluate: ``python -m coco_multilabel.evaluate predictions=FILE labels=DIR``.

The local stand-in for the leaderboard: scores a predictions JSON against a folder of ``.cls``
label files, after checking the JSON exactly as the leaderboard would.
"""

from __future__ import annotations

from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from coco_multilabel.classes import NUM_CLASSES
from coco_multilabel.config import CONFIG_DIR, report_user_errors
from coco_multilabel.data.labels import read_label_dir, to_multi_hot
from coco_multilabel.errors import UserError
from coco_multilabel.metrics import hard_scores
from coco_multilabel.submission import read_submission


def evaluate(predictions: str | Path, labels: str | Path, num_classes: int = NUM_CLASSES) -> dict[str, float]:
    """Macro F1 / precision / recall and micro F1 of a predictions JSON against ``labels``."""
    truth = read_label_dir(labels, num_classes=num_classes)
    if not truth:
        raise UserError(f"label folder {labels} holds no .cls files")
    stems = sorted(truth)
    predicted = read_submission(predictions, stems)
    preds = torch.stack([to_multi_hot(predicted[s], num_classes) for s in stems])
    targets = torch.stack([to_multi_hot(truth[s], num_classes) for s in stems])
    return hard_scores(preds, targets)


def format_scores(scores: dict[str, float], count: int | None = None) -> str:
    rows = [f"{name:<16} {value:.4f}" for name, value in scores.items()]
    head = f"{count} images" if count is not None else "scores"
    return "\n".join([head, *rows])


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="evaluate")
@report_user_errors
def main(cfg: DictConfig) -> None:
    scores = evaluate(cfg.predictions, cfg.labels)
    print(format_scores(scores, len(list(Path(cfg.labels).glob("*.cls")))))


if __name__ == "__main__":
    main()
