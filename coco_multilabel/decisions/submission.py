"""The challenge's predictions JSON: ``{"<stem>": [sorted class indices], ...}``, every test stem once."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from coco_multilabel.classes import NUM_CLASSES
from coco_multilabel.data.labels import encoding_problem
from coco_multilabel.decisions.thresholds import decide
from coco_multilabel.errors import UserError
from coco_multilabel.io import write_text_atomic


def decide_labels(probs: torch.Tensor, thresholds: torch.Tensor, min_labels: int) -> list[list[int]]:
    """Each image's class indices by the decision rule thresholds were tuned for (:func:`decide`)."""
    return [torch.nonzero(row).flatten().tolist() for row in decide(probs, thresholds, min_labels)]


def decide_with_fallback(
    probs: torch.Tensor, kept: torch.Tensor, thresholds: torch.Tensor, min_labels: int, fallback: list[int]
) -> list[list[int]]:
    """:func:`decide_labels` for the images that could be read (``kept``); the others get
    ``fallback``: the leaderboard rejects a JSON that lacks a stem."""
    labels = decide_labels(probs, thresholds, min_labels)
    for i in torch.nonzero(~kept).flatten().tolist():
        labels[i] = list(fallback)
    return labels


def validate_submission(predictions, stems: list[str], num_classes: int = NUM_CLASSES) -> None:
    """Raise a UserError naming the first key that breaks the format, or the first missing stem."""
    if not isinstance(predictions, dict):
        raise UserError("a submission is a JSON object mapping each test image stem to a list of classes")
    expected = set(stems)
    for key, value in predictions.items():
        if key not in expected:
            hint = " (stems have no extension)" if Path(key).suffix else ""
            raise UserError(f"key {key!r} is not the stem of an image being scored{hint}")
        if (
            not isinstance(value, list)
            or any(type(c) is not int or not 0 <= c < num_classes for c in value)
            or value != sorted(set(value))
        ):
            raise UserError(
                f"key {key!r}: {value!r} is not a sorted list of distinct class indices 0..{num_classes - 1}"
            )
    missing = sorted(expected - predictions.keys())
    if missing:
        raise UserError(f"{len(missing)} images have no prediction; the first is {missing[0]!r}")


def parse_submission(text: str, source: str = "submission") -> dict:
    """JSON text to a dict, refusing duplicate keys (which json.loads would silently merge)."""

    def no_duplicates(pairs):
        seen = {}
        for key, value in pairs:
            if key in seen:
                raise UserError(f"{source}: key {key!r} appears twice")
            seen[key] = value
        return seen

    try:
        return json.loads(text, object_pairs_hook=no_duplicates)
    except json.JSONDecodeError as err:
        raise UserError(f"{source} is not valid JSON: {err}") from err


def parse_submission_file(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        raise UserError(f"predictions file {path} is a folder; pass the JSON file submit wrote")
    if not path.is_file():
        raise UserError(f"predictions file {path} does not exist")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"predictions file {path} is {encoding_problem(data, err)}") from None
    return parse_submission(text, str(path))


def read_submission(path: str | Path, stems: list[str], hint_subset: bool = False) -> dict[str, list[int]]:
    """The predictions of ``path``, checked against ``stems`` as the leaderboard checks them.
    ``hint_subset``: a JSON covering fewer stems says how to score just those."""
    predictions = parse_submission_file(path)
    try:
        validate_submission(predictions, stems)
    except UserError as err:
        hint = ""
        if hint_subset and predictions.keys() < set(stems):
            hint = (
                f"; it covers {len(predictions)} of the {len(stems)} labelled images: to score only "
                "those (e.g. a val split's predictions) add only_predicted=true "
                "(make evaluate ... ARGS=only_predicted=true), or score their probabilities with PROBS="
            )
        raise UserError(f"{path}: {err}{hint}") from None
    return predictions


def write_submission(path: str | Path, predictions: dict[str, list[int]], stems: list[str]) -> Path:
    """Validate the exact text, then write it atomically: never a partial or malformed file."""
    text = json.dumps(dict(sorted(predictions.items())), separators=(",", ":")) + "\n"
    validate_submission(parse_submission(text), stems)
    return write_text_atomic(path, text)
