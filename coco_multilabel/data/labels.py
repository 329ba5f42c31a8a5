"""The challenge's label files: ``labels/train/<stem>.cls``, one class index 0..79 per line."""

from __future__ import annotations

from pathlib import Path

import torch

from coco_multilabel.classes import NUM_CLASSES
from coco_multilabel.errors import UserError


def parse_label_text(text: str, source: str = "<text>", num_classes: int = NUM_CLASSES) -> list[int]:
    """Sorted, distinct class indices in ``text``.

    Blank lines, a UTF-8 BOM and CRLF line ends are tolerated; an empty file means an image with
    no objects. Anything else that is not an integer in ``0..num_classes-1`` is an error naming
    the file and line.
    """
    classes = set()
    for number, line in enumerate(text.lstrip("\ufeff").splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        try:
            index = int(line)
        except ValueError:
            raise UserError(
                f"{source}, line {number}: {line!r} is not a class index; "
                f"each line must hold one integer 0..{num_classes - 1} "
                "(run `make check-data` to list every problem)"
            ) from None
        if not 0 <= index < num_classes:
            raise UserError(f"{source}, line {number}: class {index} is outside 0..{num_classes - 1}")
        classes.add(index)
    return sorted(classes)


def read_label_file(path: str | Path, num_classes: int = NUM_CLASSES) -> list[int]:
    path = Path(path)
    return parse_label_text(path.read_text(encoding="utf-8"), str(path), num_classes)


def read_label_dir(
    label_dir: str | Path, stems: list[str] | None = None, num_classes: int = NUM_CLASSES
) -> dict[str, list[int]]:
    """Labels of every ``*.cls`` in ``label_dir`` (or of ``stems`` only), keyed by stem."""
    label_dir = Path(label_dir)
    if not label_dir.is_dir():
        raise UserError(f"label folder {label_dir} does not exist")
    if stems is None:
        stems = sorted(p.stem for p in label_dir.glob("*.cls"))
    return {stem: read_label_file(label_dir / f"{stem}.cls", num_classes) for stem in stems}


def to_multi_hot(classes: list[int], num_classes: int = NUM_CLASSES) -> torch.Tensor:
    target = torch.zeros(num_classes)
    target[classes] = 1.0
    return target
