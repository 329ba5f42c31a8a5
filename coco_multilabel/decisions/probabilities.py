"""The probabilities file (``<output>.probs.pt``): what a model predicted, with what is needed to
re-tune and re-score it offline (``make evaluate PROBS=``, the report, the ablation)."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import torch

from coco_multilabel.classes import COCO_CLASSES, NUM_CLASSES
from coco_multilabel.errors import UserError
from coco_multilabel.io import load_data_only, one_line, write_bytes_atomic

log = logging.getLogger(__name__)


def save_probabilities(
    path: str | Path, stems: list[str], probs: torch.Tensor, thresholds: torch.Tensor, tuning: dict | None
) -> Path:
    """Write the file atomically; ``tuning`` is the checkpoint's ``threshold_tuning`` record."""
    buffer = io.BytesIO()
    torch.save(
        {"stems": list(stems), "probs": probs, "thresholds": thresholds, "classes": COCO_CLASSES,
         "threshold_tuning": tuning},
        buffer,
    )  # fmt: skip
    path = write_bytes_atomic(path, buffer.getbuffer())
    log.info("probabilities saved to %s", path)
    return path


def read_probabilities(path: str | Path) -> dict:
    """The saved dict, checked: one row of 80 probabilities per stem."""
    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"probabilities file {path} does not exist; submit writes it with submit.save_probs=true"
        )
    try:
        saved = load_data_only(path, "probabilities file")
        if saved["probs"].shape != (len(saved["stems"]), NUM_CLASSES):
            raise ValueError("one row of 80 probabilities per stem is expected")
    except UserError:
        raise
    except Exception as err:
        raise UserError(f"{path} is not a probabilities file written by submit: {one_line(err)}") from err
    return saved
