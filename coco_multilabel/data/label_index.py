"""The labelled set parsed once: stems, an N x C bool matrix and each label file's identity.

Parsing 65,000 small ``.cls`` files takes long enough to matter at every ``setup``, in every sweep
job, in report and in evaluate. The index keeps what they hold in one ``.npz`` in the cache folder
(``<cache_dir>/labels/<hash of the label folder>.npz``), with each file's size and modification
time; a later load stats the folder once (``os.scandir``) and parses only the files that changed,
appeared or disappeared, then rewrites the index atomically. Files are parsed by ``labels.py``, so
the index accepts and refuses exactly what check-data does.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from coco_multilabel.classes import NUM_CLASSES
from coco_multilabel.data.labels import read_label_file
from coco_multilabel.errors import UserError
from coco_multilabel.io import write_bytes_atomic

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = "outputs/cache"
INDEX_FOLDER = "labels"  # in the cache folder, beside the feature caches (which are not it)
VERSION = 1  # of the file's layout: another version is rebuilt, never misread


@dataclass
class LabelIndex:
    stems: np.ndarray  # (N,) str, sorted
    targets: np.ndarray  # N x C bool
    sizes: np.ndarray  # (N,) int64: each label file's size and st_mtime_ns, what a change shows in
    mtimes: np.ndarray
    parsed: int = 0  # label files this load parsed (0: the stored index was used as it was)

    def __len__(self) -> int:
        return len(self.stems)

    def rows(self, stems) -> np.ndarray:
        """Row of each of ``stems``; a UserError for a stem without a label file."""
        stems = np.asarray(stems, dtype=self.stems.dtype if len(self.stems) else str)
        rows = np.searchsorted(self.stems, stems)
        found = (rows < len(self.stems)) & (self.stems[np.minimum(rows, len(self.stems) - 1)] == stems)
        if not found.all():
            raise UserError(f"no label file for image {stems[~found][0]}; run `make check-data`")
        return rows

    def targets_of(self, stems) -> np.ndarray:
        return self.targets[self.rows(stems)]

    def classes(self) -> dict[str, list[int]]:
        """``{stem: sorted class indices}``, as ``labels.read_label_dir`` returns them."""
        return {str(s): np.flatnonzero(t).tolist() for s, t in zip(self.stems, self.targets, strict=True)}


def index_file(label_dir: str | Path, cache_dir: str | Path = DEFAULT_CACHE_DIR) -> Path:
    name = hashlib.sha256(str(Path(label_dir).resolve()).encode()).hexdigest()[:20]
    return Path(cache_dir) / INDEX_FOLDER / f"{name}.npz"


def scan_label_files(label_dir: Path) -> tuple[list[str], list[int], list[int]]:
    """Stems, sizes and mtimes of the ``*.cls`` files, sorted by stem: one stat per entry."""
    found = []
    try:
        with os.scandir(label_dir) as entries:
            for entry in entries:
                if entry.name.endswith(".cls") and entry.is_file():
                    stat = entry.stat()
                    found.append((entry.name[:-4], stat.st_size, stat.st_mtime_ns))
    except FileNotFoundError:
        raise UserError(
            f"label folder {label_dir} does not exist; data.root must hold labels/train"
        ) from None
    found.sort()
    return [f[0] for f in found], [f[1] for f in found], [f[2] for f in found]


def load_label_index(
    label_dir: str | Path, cache_dir: str | Path | None = DEFAULT_CACHE_DIR, num_classes: int = NUM_CLASSES
) -> LabelIndex:
    """The index of ``label_dir``, brought up to date with the files (``cache_dir=None``: not stored)."""
    label_dir = Path(label_dir)
    stems, sizes, mtimes = scan_label_files(label_dir)
    path = index_file(label_dir, cache_dir) if cache_dir is not None else None
    stored = _read(path, num_classes) if path is not None else None
    old = {}
    if stored is not None:
        old = {
            (str(s), int(z), int(m)): i
            for i, (s, z, m) in enumerate(zip(stored.stems, stored.sizes, stored.mtimes, strict=True))
        }
    targets = np.zeros((len(stems), num_classes), dtype=bool)
    parsed = 0
    for row, identity in enumerate(zip(stems, sizes, mtimes, strict=True)):
        if (i := old.get(identity)) is not None:
            targets[row] = stored.targets[i]
        else:
            targets[row, read_label_file(label_dir / f"{identity[0]}.cls", num_classes)] = True
            parsed += 1
    index = LabelIndex(
        np.array(stems, dtype=str), targets, np.array(sizes, np.int64), np.array(mtimes, np.int64), parsed
    )
    unchanged = stored is not None and not parsed and len(stored.stems) == len(stems)
    if path is not None and not unchanged:
        buffer = io.BytesIO()
        np.savez(buffer, version=VERSION, stems=index.stems, targets=targets, sizes=index.sizes,
                 mtimes=index.mtimes)  # fmt: skip
        write_bytes_atomic(path, buffer.getvalue())
        log.info("labels index of %s: %d files parsed, %d reused (%s)", label_dir, parsed,
                 len(stems) - parsed, path)  # fmt: skip
    return index


def _read(path: Path, num_classes: int) -> LabelIndex | None:
    try:
        with np.load(path) as saved:
            if int(saved["version"]) != VERSION or saved["targets"].shape[1:] != (num_classes,):
                return None
            return LabelIndex(saved["stems"], saved["targets"], saved["sizes"], saved["mtimes"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError) as err:  # damaged or foreign: parse again and replace it
        log.warning("labels index %s is unreadable (%s); rebuilding it", path, err)
        return None
