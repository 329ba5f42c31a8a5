"""Evaluate: ``python -m coco_multilabel.evaluate predictions=FILE labels=DIR`` (or ``probs=FILE``).

The local stand-in for the leaderboard: checks a predictions JSON exactly as the leaderboard would
and prints every metric of metrics.py with a per-class table (also written to ``per_class.csv``).
Given the probabilities saved by ``submit.save_probs=true`` instead, it also prints average
precision and what 0.5, a tuned global threshold and tuned per-class thresholds score, each tuned
on these labels and cross-fitted: thresholds re-tuned without re-running the network.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from coco_multilabel.callbacks.thresholds import evaluate_thresholds
from coco_multilabel.classes import COCO_CLASSES, NUM_CLASSES
from coco_multilabel.config import CONFIG_DIR, report_user_errors
from coco_multilabel.data.labels import read_label_dir, to_multi_hot
from coco_multilabel.errors import UserError
from coco_multilabel.io import write_text_atomic
from coco_multilabel.metrics import label_scores, mean_average_precision, per_class_table
from coco_multilabel.submission import read_submission


def evaluate(predictions: str | Path, labels: str | Path) -> dict[str, float]:
    """Every hard-label score of a predictions JSON against a folder of ``.cls`` files."""
    return evaluate_predictions(predictions, labels)[0]


def evaluate_predictions(predictions, labels) -> tuple[dict[str, float], list[dict]]:
    truth = read_label_dir(labels)
    if not truth:
        raise UserError(f"label folder {labels} holds no .cls files")
    stems = sorted(truth)
    predicted = read_submission(predictions, stems)
    preds = torch.stack([to_multi_hot(predicted[s]) for s in stems])
    targets = torch.stack([to_multi_hot(truth[s]) for s in stems])
    return label_scores(preds, targets), per_class_table(preds, targets, COCO_CLASSES)


def evaluate_probabilities(probs_file, labels, objective: str = "macro_f1", min_positives: int = 5,
                           shrinkage: float = 10.0) -> tuple[dict, list[dict], list[dict]]:  # fmt: skip
    """Scores at the file's thresholds, a threshold study and the per-class table."""
    saved = read_probabilities(probs_file)
    truth = read_label_dir(labels, stems=saved["stems"])  # labels may hold more stems than scored
    probs, thresholds = saved["probs"], saved["thresholds"]
    targets = torch.stack([to_multi_hot(truth[s]) for s in saved["stems"]])
    scores = {**label_scores(probs > thresholds, targets), "map": mean_average_precision(probs, targets)}
    # what the ThresholdTuner logs in per_class mode: 0.5, global and per class, tuned and cross-fitted
    m = evaluate_thresholds(
        probs, targets, "per_class", objective, min_positives=min_positives, shrinkage=shrinkage
    )
    study = [
        {"thresholds": "0.5", objective: m[objective], "xfit": None},
        {
            "thresholds": "tuned global",
            objective: m[f"{objective}_tuned_global"],
            "xfit": m[f"{objective}_xfit_global"],
        },
        {"thresholds": "tuned per_class", objective: m[f"{objective}_tuned"], "xfit": m[f"{objective}_xfit"]},
    ]
    table = per_class_table(probs > thresholds, targets, COCO_CLASSES, probs=probs, thresholds=thresholds)
    return scores, study, table


def read_probabilities(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"probabilities file {path} does not exist; submit writes it with submit.save_probs=true"
        )
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved["probs"].shape != (len(saved["stems"]), NUM_CLASSES):
            raise ValueError("one row of 80 probabilities per stem is expected")
    except Exception as err:
        raise UserError(f"{path} is not a probabilities file written by submit: {err}") from err
    return saved


def format_scores(scores: dict[str, float], title: str = "scores") -> str:
    return "\n".join([title, *(f"  {name:<16} {value:.4f}" for name, value in scores.items())])


def format_rows(rows: list[dict]) -> str:
    """A plain aligned table; floats with 3 decimals."""
    cells = [
        [f"{v:.3f}" if isinstance(v, float) else ("" if v is None else str(v)) for v in r.values()]
        for r in rows
    ]
    header = list(rows[0])
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def write_csv(path: Path, rows: list[dict]) -> Path:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return write_text_atomic(path, buffer.getvalue())


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="evaluate")
@report_user_errors
def main(cfg: DictConfig) -> None:
    if bool(cfg.predictions) == bool(cfg.probs):
        raise UserError(
            "give exactly one of predictions=<submission JSON> or probs=<file from submit.save_probs>"
        )
    source = Path(cfg.predictions or cfg.probs)
    if cfg.predictions:
        scores, table = evaluate_predictions(cfg.predictions, cfg.labels)
    else:
        scores, study, table = evaluate_probabilities(cfg.probs, cfg.labels, **cfg.thresholds)
        print(format_rows(study), end="\n\n")
    print(format_rows(table), end="\n\n")
    print(format_scores(scores, f"{source.name} against {cfg.labels}"))
    csv_path = Path(cfg.per_class_csv) if cfg.per_class_csv else source.with_name("per_class.csv")
    print(f"per-class table written to {write_csv(csv_path, table)}")


if __name__ == "__main__":
    main()
