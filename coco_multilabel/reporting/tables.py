"""Plain-text and CSV tables of scores, as evaluate prints and writes them."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from coco_multilabel.io import write_text_atomic


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
