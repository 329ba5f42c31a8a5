"""What is wrong with a data root, found before training on it (``make check-data``).

Lists, per problem, how many files have it and the first few of them, so that a broken unzip, a
hand-edited label file or a renamed PNG is found in seconds rather than hours into a run. Label
files are judged by the parser training uses (:mod:`coco_multilabel.data.labels`): an error here is
an error there.
"""

from __future__ import annotations

import os
import sys
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from coco_multilabel.classes import NUM_CLASSES
from coco_multilabel.data.datasets import IMAGE_SUFFIXES
from coco_multilabel.data.images import DECODE_ERRORS, JPEG_MAGIC, image_problem
from coco_multilabel.data.labels import LABEL_ERRORS, LABEL_WARNINGS, decode_label_bytes, inspect_label_text
from coco_multilabel.errors import UserError
from coco_multilabel.progress import progress as progress_of

FOLDERS = ("images/train", "labels/train", "images/test")
LAST = NUM_CLASSES - 1
# kind -> (severity, what check-data prints), in the order it prints them
PROBLEMS = {
    "missing_folder": (
        "error",
        "missing folders (data root must hold images/train, labels/train, images/test)",
    ),
    "empty_folder": ("error", "empty folders"),
    "image_without_label": ("error", "images without a label file (training leaves them out)"),
    "label_without_image": ("error", "label files without an image"),
    "not_jpeg": ("error", "files that are not JPEG, whatever their extension"),
    "wrong_extension": ("error", "JPEG files without a .jpg extension (training does not see them)"),
    "unreadable": ("error", "unreadable images"),
    "truncated": ("error", "truncated images"),
    "too_large": (
        "error",
        "images too large to decode (Pillow's decompression-bomb guard): shrink or delete them",
    ),
    **{kind: ("error", what.format(last=LAST)) for kind, what in LABEL_ERRORS.items()},
    **{kind: ("warning", what) for kind, what in LABEL_WARNINGS.items()},
    "nested_folder": ("warning", "folders inside data folders (ignored; unzipped one level too deep?)"),
    "other_file": ("warning", "other files (ignored)"),
    "empty_label": ("info", "empty label files (valid: images with no objects)"),
}
SHOW = 5  # files listed per problem
PROGRESS_FROM = 2000  # files; below that a check takes a second or two


@dataclass
class Findings:
    root: Path
    full: bool = False
    counts: dict[str, int] = field(default_factory=dict)  # files per folder
    problems: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))

    def add(self, kind: str, item: str) -> None:
        self.problems[kind].append(item)

    @property
    def errors(self) -> int:
        return sum(len(items) for kind, items in self.problems.items() if PROBLEMS[kind][0] == "error")

    def report(self) -> str:
        mode = "decoded every image" if self.full else "image headers only; --full decodes every image"
        counted = ", ".join(f"{n} files in {folder}" for folder, n in self.counts.items())
        lines = [f"checked {self.root} ({mode}): {counted or 'nothing to check'}"]
        for kind, (severity, what) in PROBLEMS.items():
            items = self.problems.get(kind)
            if not items:
                continue
            lines.append(f"{severity}: {len(items)} {what}")
            lines += [f"    {item}" for item in items[:SHOW]]
            if len(items) > SHOW:
                lines.append(f"    ... and {len(items) - SHOW} more")
        warnings = sum(len(v) for k, v in self.problems.items() if PROBLEMS[k][0] == "warning")
        if self.errors:
            lines.append(f"{self.errors} errors, {warnings} warnings: fix the errors before training")
        else:
            lines.append(f"no errors, {warnings} warnings: the data is ready for training")
        return "\n".join(lines)


def check_data(root: str | Path, full: bool = False, progress: bool = False) -> Findings:
    """Every problem of the data root ``root``; ``full`` decodes each image instead of its header;
    ``progress``: a bar on stderr in a terminal, else a line every 30 s or 10 %."""
    root = Path(root).expanduser()
    findings = Findings(root, full)
    entries = {}
    for folder in FOLDERS:
        path = root / folder
        if not path.is_dir():
            findings.add("missing_folder", f"{folder}/")
            continue
        try:
            entries[folder] = sorted(path.iterdir())
        except OSError as err:
            findings.add("missing_folder", f"{folder}/ (cannot list it: {err.strerror or err})")
            continue
        findings.counts[folder] = len(entries[folder])
        if not entries[folder]:
            findings.add("empty_folder", f"{folder}/")
    images = {}  # folder -> JPEG-named files
    for folder, paths in entries.items():
        for path in paths:
            name = f"{folder}/{path.name}"
            if path.is_dir():
                named_like_data = path.suffix in IMAGE_SUFFIXES or path.suffix == ".cls"
                findings.add(
                    "nested_folder", f"{name}/" + (" (named like a data file: rename it)" * named_like_data)
                )
            elif folder.startswith("images") and path.suffix in IMAGE_SUFFIXES:
                images.setdefault(folder, []).append(path)
            elif folder.startswith("labels") and path.suffix == ".cls":
                check_label_file(path, name, findings)
            elif folder.startswith("images"):
                findings.add(_misnamed(path), name)
            else:
                findings.add("other_file", name)
    check_images(root, [p for paths in images.values() for p in paths], full, progress, findings)
    if "images/train" in entries and "labels/train" in entries:
        image_stems = {p.stem for p in images.get("images/train", [])}
        label_stems = {p.stem for p in entries["labels/train"] if p.suffix == ".cls" and not p.is_dir()}
        for stem in sorted(image_stems - label_stems):
            findings.add("image_without_label", f"images/train/{stem}.jpg (no labels/train/{stem}.cls)")
        for stem in sorted(label_stems - image_stems):
            findings.add("label_without_image", f"labels/train/{stem}.cls (no images/train/{stem}.jpg)")
    return findings


def check_label_file(path: Path, name: str, findings: Findings) -> None:
    try:
        data = path.read_bytes()
    except OSError as err:
        findings.add("not_utf8", f"{name} ({err.strerror or err})")
        return
    if not data:
        findings.add("empty_label", name)
        return
    try:
        report = inspect_label_text(decode_label_bytes(data, name))
    except UserError as err:  # "<name> is UTF-16 text ...; run check-data": what and the fix
        what = str(err).removeprefix(f"{name} is ").partition("; run `make")[0]
        findings.add("not_utf8", f"{name} ({what})")
        return
    first: dict[str, str] = {}
    for issue in report.issues:  # each file once per problem, at its first occurrence
        where = f"line {issue.line}: {issue.text!r}" if issue.text else f"line {issue.line}"
        first.setdefault(issue.kind, f"{name} ({where})" if issue.line else name)
    for kind, item in first.items():
        findings.add(kind, item)


def check_images(root: Path, paths: list[Path], full: bool, progress: bool, findings: Findings) -> None:
    """Header checks are I/O-bound and decoding releases the GIL: threads speed up both."""
    workers = min(8, len(os.sched_getaffinity(0)) * 2)
    shown = progress and len(paths) >= PROGRESS_FROM
    with (
        ThreadPoolExecutor(workers) as pool,
        progress_of("checking images", len(paths), stream=sys.stderr, enabled=shown) as bar,
    ):
        for path, problem in zip(paths, pool.map(lambda p: image_problem(p, full), paths), strict=True):
            if problem:
                findings.add(problem, str(path.relative_to(root)))
            bar.advance()


def bad_headers(paths: list[Path]) -> list[tuple[Path, str]]:
    """``(path, problem)`` of each image whose header or last bytes are bad (``image_problem``
    without decoding): seconds for 70k files, so a long step over them (the feature cache) can
    name a bad file before it spends any work."""
    workers = min(8, len(os.sched_getaffinity(0)) * 2)
    with ThreadPoolExecutor(workers) as pool:
        problems = pool.map(image_problem, paths)
        return [(path, problem) for path, problem in zip(paths, problems, strict=True) if problem]


def _misnamed(path: Path) -> str:
    """A file without a .jpg name: a JPEG renamed, another image format, or something else."""
    try:
        with open(path, "rb") as file:
            if file.read(3) == JPEG_MAGIC:
                return "wrong_extension"
        with Image.open(path):
            return "not_jpeg"
    except DECODE_ERRORS:
        return "other_file"
