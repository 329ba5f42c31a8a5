"""Evaluate: ``python -m coco_multilabel.evaluate predictions=FILE labels=DIR`` (or ``probs=FILE``).

The local stand-in for the leaderboard: checks a predictions JSON exactly as the leaderboard would
and prints every metric of metrics.py with a per-class table (also written to ``per_class.csv``).
``only_predicted=true`` scores just the labelled images the JSON names (a val split's predictions)
instead of requiring one for every label file. Given the probabilities saved by
``submit.save_probs=true`` instead, it also prints average precision and what 0.5, a tuned global
threshold and tuned per-class thresholds score, each tuned on these labels and cross-fitted:
thresholds re-tuned without re-running the network. Several JSONs (``predictions=a.json,b.json``)
are compared on the same images: each one's scores, and its macro F1 minus the first one's with a
95% paired-bootstrap interval, so that a difference the images cannot tell apart reads as such.
"""

from __future__ import annotations

from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from coco_multilabel.classes import COCO_CLASSES
from coco_multilabel.cli import CONFIG_DIR, report_user_errors
from coco_multilabel.data.label_index import DEFAULT_CACHE_DIR, load_label_index
from coco_multilabel.data.labels import to_multi_hot
from coco_multilabel.decisions.probabilities import read_probabilities
from coco_multilabel.decisions.submission import parse_submission_file, read_submission
from coco_multilabel.decisions.thresholds import decide, evaluate_thresholds, rule_of
from coco_multilabel.errors import UserError
from coco_multilabel.metrics import label_scores, mean_average_precision, paired_bootstrap, per_class_table
from coco_multilabel.reporting.tables import format_rows, format_scores, write_csv


def evaluate(
    predictions: str | Path, labels: str | Path, only_predicted: bool = False, cache_dir=DEFAULT_CACHE_DIR
) -> dict[str, float]:
    """Every hard-label score of a predictions JSON against a folder of ``.cls`` files."""
    return evaluate_predictions(predictions, labels, only_predicted, cache_dir)[0]


def label_index(labels, cache_dir=DEFAULT_CACHE_DIR):
    """The labels index of the folder ``labels`` (parsed once, kept in ``cache_dir``)."""
    if not Path(labels).is_dir():
        raise UserError(f"label folder {labels} does not exist")
    return load_label_index(labels, cache_dir)


def evaluate_predictions(
    predictions, labels, only_predicted: bool = False, cache_dir=DEFAULT_CACHE_DIR
) -> tuple[dict, list[dict]]:
    stems, targets = scored_images(predictions, labels, only_predicted, cache_dir)
    preds = hard_labels(predictions, stems, only_predicted)
    return label_scores(preds, targets), per_class_table(preds, targets, COCO_CLASSES)


def scored_images(predictions, labels, only_predicted: bool, cache_dir) -> tuple[list[str], torch.Tensor]:
    """The stems to score and their N x C targets: every label file's, or (``only_predicted``) the
    images the JSON names, each of which must have a label file."""
    index = label_index(labels, cache_dir)
    stems = sorted(parse_submission_file(predictions)) if only_predicted else index.stems.tolist()
    if not stems:
        raise UserError(f"label folder {labels} holds no .cls files")
    return stems, torch.from_numpy(index.targets_of(stems)).float()


def hard_labels(predictions, stems: list[str], only_predicted: bool) -> torch.Tensor:
    predicted = read_submission(predictions, stems, hint_subset=not only_predicted)
    return torch.stack([to_multi_hot(predicted[s]) for s in stems])


def compare_predictions(
    files: list[str], labels, only_predicted: bool = False, cache_dir=DEFAULT_CACHE_DIR, draws: int = 2000
) -> list[dict]:
    """One row per predictions JSON: its scores and its macro F1 against the first one's, with a
    95% interval and how often it is higher, over ``draws`` paired resamples of the images."""
    stems, targets = scored_images(files[0], labels, only_predicted, cache_dir)
    preds = [hard_labels(file, stems, only_predicted) for file in files]
    boot = paired_bootstrap(preds, targets, draws)
    rows = []
    for i, (file, p) in enumerate(zip(files, preds, strict=True)):
        scores, diff = label_scores(p, targets), boot[:, i] - boot[:, 0]
        low, high = torch.quantile(diff, torch.tensor([0.025, 0.975], dtype=diff.dtype)).tolist()
        first = i == 0
        rows.append({
            "predictions": str(file), "macro_f1": scores["macro_f1"], "micro_f1": scores["micro_f1"],
            "minus first": None if first else scores["macro_f1"] - rows[0]["macro_f1"],
            "95% interval": None if first else f"[{low:+.3f}, {high:+.3f}]",
            "higher in": None if first else f"{float((diff > 0).double().mean()):.0%} of resamples",
        })  # fmt: skip
    return rows


def evaluate_probabilities(probs_file, labels, objective: str = "macro_f1", min_positives: int = 5,
                           shrinkage: float = 10.0, cache_dir=DEFAULT_CACHE_DIR,
                           ) -> tuple[dict, list[dict], list[dict]]:  # fmt: skip
    """Scores at the file's thresholds, a threshold study and the per-class table, all of the
    decision rule the file was written with (its ``min_labels``): the labels submit wrote."""
    saved = read_probabilities(probs_file)
    targets = torch.from_numpy(label_index(labels, cache_dir).targets_of(saved["stems"])).float()
    probs, thresholds, min_labels = (
        saved["probs"],
        saved["thresholds"],
        rule_of(saved.get("threshold_tuning")),
    )
    decisions = decide(probs, thresholds, min_labels)
    scores = {**label_scores(decisions, targets), "map": mean_average_precision(probs, targets)}
    # what the ThresholdTuner logs in per_class mode: 0.5, global and per class, tuned and cross-fitted
    m = evaluate_thresholds(
        probs, targets, "per_class", objective, min_labels=min_labels, min_positives=min_positives,
        shrinkage=shrinkage,
    )  # fmt: skip
    study = [
        {"thresholds": "0.5", objective: m[objective], "xfit": None},
        {"thresholds": "tuned global", objective: m[f"{objective}_tuned_global"],
         "xfit": m[f"{objective}_xfit_global"]},
        {"thresholds": "tuned per_class", objective: m[f"{objective}_tuned"], "xfit": m[f"{objective}_xfit"]},
    ]  # fmt: skip
    table = per_class_table(decisions, targets, COCO_CLASSES, probs=probs, thresholds=thresholds)
    return scores, study, table


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="evaluate")
@report_user_errors
def main(cfg: DictConfig) -> None:
    if bool(cfg.predictions) == bool(cfg.probs):
        raise UserError(
            "give exactly one of predictions=<submission JSON> or probs=<file from submit.save_probs>"
        )
    files = [f.strip() for f in str(cfg.predictions or "").split(",") if f.strip()]
    if len(files) > 1:
        print(format_rows(compare_predictions(files, cfg.labels, cfg.only_predicted, cfg.cache_dir)))
        print(f"{len(files)} predictions of the same images against {cfg.labels}; 95% interval: of the "
              "macro F1 difference to the first, over 2,000 resamples of the images")  # fmt: skip
        return
    source = Path(cfg.predictions or cfg.probs)
    if cfg.predictions:
        scores, table = evaluate_predictions(cfg.predictions, cfg.labels, cfg.only_predicted, cfg.cache_dir)
    else:
        scores, study, table = evaluate_probabilities(
            cfg.probs, cfg.labels, **cfg.thresholds, cache_dir=cfg.cache_dir
        )
        print(format_rows(study), end="\n\n")
    print(format_rows(table), end="\n\n")
    print(format_scores(scores, f"{source.name} against {cfg.labels}"))
    csv_path = Path(cfg.per_class_csv) if cfg.per_class_csv else source.with_name("per_class.csv")
    print(f"per-class table written to {write_csv(csv_path, table)}")


if __name__ == "__main__":
    main()
