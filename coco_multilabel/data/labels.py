"""The challenge's label files: ``labels/train/<stem>.cls``, one class index 0..79 per line.

Training, submit, evaluate and ``check_data`` all read them through :func:`inspect_label_text`,
so what check-data calls an error is exactly what training refuses, and what it calls a warning
is exactly what training tolerates.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from coco_multilabel.classes import NUM_CLASSES
from coco_multilabel.errors import UserError

CHECK_DATA_HINT = "run `make check-data DATA=<root>` to list every problem"

# kind -> what check-data prints for it; errors stop training, warnings are tolerated
LABEL_ERRORS = {
    "not_utf8": "label files that are not UTF-8 text",
    "non_integer": "label files with a line that is not an integer",
    "out_of_range": "label files with a class outside 0..{last}",
}
LABEL_WARNINGS = {
    "blank": "label files with blank lines (ignored)",
    "duplicate": "label files with a class listed twice (counted once)",
    "bom": "label files starting with a UTF-8 byte-order mark (ignored)",
    "crlf": "label files with Windows (CRLF) line ends (accepted)",
}


@dataclass(frozen=True)
class LabelIssue:
    kind: str  # a key of LABEL_ERRORS or LABEL_WARNINGS
    line: int  # 1-based; 0 for the whole file
    text: str = ""

    @property
    def is_error(self) -> bool:
        return self.kind in LABEL_ERRORS


@dataclass
class LabelReport:
    classes: list[int]
    issues: list[LabelIssue] = field(default_factory=list)

    @property
    def errors(self) -> list[LabelIssue]:
        return [issue for issue in self.issues if issue.is_error]


def inspect_label_text(text: str, num_classes: int = NUM_CLASSES) -> LabelReport:
    """The sorted, distinct class indices in ``text`` and every deviation from one index per line.

    An empty text is valid: an image with no objects.
    """
    issues = []
    if text.startswith("\ufeff"):
        issues.append(LabelIssue("bom", 1))
        text = text[1:]
    if "\r\n" in text:
        issues.append(LabelIssue("crlf", 0))
    classes: set[int] = set()
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line:
            issues.append(LabelIssue("blank", number))
            continue
        try:
            index = int(line)
        except ValueError:
            issues.append(LabelIssue("non_integer", number, line))
            continue
        if not 0 <= index < num_classes:
            issues.append(LabelIssue("out_of_range", number, line))
        elif index in classes:
            issues.append(LabelIssue("duplicate", number, line))
        else:
            classes.add(index)
    return LabelReport(sorted(classes), issues)


def decode_label_bytes(data: bytes, source: str = "<bytes>") -> str:
    """UTF-8 text, keeping CRLF visible (``Path.read_text`` would translate it away); any other
    encoding is a UserError that says which one it looks like and how to convert the file."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{source} is {encoding_problem(data, err)}; {CHECK_DATA_HINT}") from None
    if "\x00" in text:  # UTF-16 without a byte-order mark decodes as UTF-8 with NULs between digits
        raise UserError(f"{source} is {encoding_problem(data)}; {CHECK_DATA_HINT}")
    return text


def encoding_problem(data: bytes, err: UnicodeDecodeError | None = None) -> str:
    """What a label file that is not UTF-8 looks like, with the command that converts it."""
    if err is None or data[:2] in (b"\xff\xfe", b"\xfe\xff") or b"\x00" in data:
        return "UTF-16 text, not UTF-8 (as Notepad or PowerShell save it); convert: iconv -f UTF-16 -t UTF-8"
    return (
        f"not UTF-8 text ({err.reason} at byte {err.start}; Latin-1 or another 8-bit encoding?); "
        "re-save it as UTF-8 (iconv -f LATIN1 -t UTF-8)"
    )


def parse_label_text(text: str, source: str = "<text>", num_classes: int = NUM_CLASSES) -> list[int]:
    """Sorted, distinct class indices in ``text``; the first error is a UserError naming file and line."""
    report = inspect_label_text(text, num_classes)
    for issue in report.errors:
        if issue.kind == "non_integer":
            raise UserError(
                f"{source}, line {issue.line}: {issue.text!r} is not a class index; "
                f"each line must hold one integer 0..{num_classes - 1} ({CHECK_DATA_HINT})"
            )
        raise UserError(
            f"{source}, line {issue.line}: class {issue.text} is outside 0..{num_classes - 1} "
            f"({CHECK_DATA_HINT})"
        )
    return report.classes


def read_label_file(path: str | Path, num_classes: int = NUM_CLASSES) -> list[int]:
    path = Path(path)
    if path.is_dir():
        raise UserError(f"label file {path} is a folder; remove or rename it ({CHECK_DATA_HINT})")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise UserError(f"cannot read label file {path}: {err.strerror or err}; {CHECK_DATA_HINT}") from err
    return parse_label_text(decode_label_bytes(data, str(path)), str(path), num_classes)


def read_label_dir(
    label_dir: str | Path, stems: list[str] | None = None, num_classes: int = NUM_CLASSES
) -> dict[str, list[int]]:
    """Labels of every ``*.cls`` in ``label_dir`` (or of ``stems`` only), keyed by stem."""
    label_dir = Path(label_dir)
    if not label_dir.is_dir():
        raise UserError(f"label folder {label_dir} does not exist")
    if stems is None:
        stems = sorted(p.stem for p in label_dir.glob("*.cls") if p.is_file())  # a folder x.cls: not one
    return {stem: read_label_file(label_dir / f"{stem}.cls", num_classes) for stem in stems}


def to_multi_hot(classes: list[int], num_classes: int = NUM_CLASSES) -> torch.Tensor:
    target = torch.zeros(num_classes)
    target[classes] = 1.0
    return target
