"""K-fold cross-validation folds of the labelled images, stratified for multi-label data.

Iterative stratification (Sechidis, Tsoumakas & Vlahavas, ECML 2011): the rarest class is dealt
out first, each image to the fold that still lacks most of that class, so rare classes are spread
over the folds rather than left to chance. A repair step then makes sure that every class with at
least K images is in every fold, moving an image from a fold that has two or more; it only makes
moves that keep every other class where it was, which always succeeds when no image holds two
classes of at least K images, and almost always otherwise (some label sets admit no such folds).
Ours, not ``iterstrat``'s ``MultilabelStratifiedKFold`` or scikit-multilearn's: they deal out the
same way but have no such repair, so a rare class can be absent from a fold's val split.

The folds are written once per cross-validation folder (``folds.json``) and read by every fold's
run, resume, submit and the out-of-fold table, so all of them agree on which image is where.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
from filelock import FileLock

from coco_multilabel.data.split import load_or_make_split
from coco_multilabel.errors import UserError
from coco_multilabel.io import write_json_atomic

log = logging.getLogger(__name__)

METHOD = "iterative_stratification"


def stratified_folds(labels: np.ndarray, k: int, seed: int = 0, warn: bool = True) -> np.ndarray:
    """The fold (0..k-1) of each row of the N x C 0/1 matrix ``labels``; ``warn``: log the classes
    the repair could not put in every fold (the cross-fitting halves of every validation do not)."""
    labels = np.asarray(labels, dtype=bool)
    n = len(labels)
    if not 2 <= k <= n:
        raise UserError(f"data.folds must be between 2 and the number of labelled images ({n}), got {k}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)  # the seed decides who goes first among equals
    wanted = np.tile(labels.sum(0) / k, (k, 1))  # k x C positives each fold still lacks
    room = np.full(k, n / k)  # images each fold still lacks
    fold = np.full(n, -1)
    left = labels.copy()
    while (fold < 0).any():
        counts = left.sum(0)
        if counts.any():
            c = int(np.flatnonzero(counts == counts[counts > 0].min())[0])  # the rarest class left
            rows = order[left[order, c]]
        else:
            rows = order[fold[order] < 0]  # images without a class
        for i in rows:
            score = wanted[:, c] if counts.any() else room
            best = np.flatnonzero(score == score.max())
            best = best[room[best] == room[best].max()]
            f = int(rng.choice(best))
            fold[i] = f
            wanted[f] -= labels[i]
            room[f] -= 1
            left[i] = False
    return repair(labels, fold, k, warn)


def repair(labels: np.ndarray, fold: np.ndarray, k: int, warn: bool = True) -> np.ndarray:
    """Put each class with >= k images in every fold: for a fold that lacks one, move an image of it
    from a fold with two or more, or swap it for one of the fold's images, by a move that takes no
    other class of >= k images out of a fold that had it; log what no such move could fix."""
    spread = labels.sum(0) >= k
    per_fold = np.stack([labels[fold == f].sum(0) for f in range(k)]).astype(int)  # k x C
    for c in np.argsort(labels.sum(0), kind="stable"):
        if not spread[c]:
            continue
        for target in range(k):
            if not per_fold[target, c]:
                move = best_move(labels, fold, per_fold, spread, c, target)
                if move is None:
                    if warn:
                        log.warning("class %d (%d images) could not be put in every one of %d folds", c,
                                    int(labels[:, c].sum()), k)  # fmt: skip
                    continue
                image, back = move
                if back is not None:
                    fold[back] = fold[image]
                    per_fold[fold[image]] += labels[back]
                    per_fold[target] -= labels[back]
                per_fold[fold[image]] -= labels[image]
                per_fold[target] += labels[image]
                fold[image] = target
    return fold


def best_move(labels, fold, per_fold, spread, c: int, target: int) -> tuple[int, int | None] | None:
    """``(image, back)``: ``image`` of class ``c`` goes to ``target``, ``back`` (or None) leaves it."""
    sizes = np.bincount(fold, minlength=len(per_fold))
    in_target = np.flatnonzero(fold == target)
    moves, swaps = [], []
    for i in np.flatnonzero(labels[:, c]):
        source = fold[i]
        if per_fold[source, c] < 2:
            continue
        # a swap's new counts in the source and target folds, for every image of the target fold
        new_source = per_fold[source] - labels[i] + labels[in_target]
        new_target = per_fold[target] + labels[i] - labels[in_target]
        kept = ((new_source >= 1) | (per_fold[source] == 0)) & ((new_target >= 1) | (per_fold[target] == 0))
        if (per_fold[source][labels[i] & spread] >= 2).all():
            moves.append((sizes[source] - sizes[target], -i))
        ok = np.flatnonzero(kept[:, spread].all(1))
        if len(ok):
            back = ok[np.argmin(labels[in_target[ok]].sum(1))]
            swaps.append((-int(labels[in_target[back]].sum()), -i, int(in_target[back])))
    if moves and max(moves)[0] > 0:  # the move also evens the fold sizes
        return -max(moves)[1], None
    if swaps:
        _, i, back = max(swaps)
        return -i, back
    return (-max(moves)[1], None) if moves else None


def make_folds(labels_by_stem: dict[str, list[int]], k: int, seed: int, num_classes: int = 80) -> dict:
    """The folds record of ``folds.json``: independent of the order of ``labels_by_stem``."""
    stems = sorted(labels_by_stem)
    matrix = np.zeros((len(stems), num_classes), dtype=bool)
    for row, stem in enumerate(stems):
        matrix[row, labels_by_stem[stem]] = True
    fold = stratified_folds(matrix, k, seed)
    folds = [[s for s, f in zip(stems, fold, strict=True) if f == j] for j in range(k)]
    return {"method": METHOD, "k": k, "seed": seed, "folds": folds}


def load_or_make_folds(path: Path, labels_by_stem, k: int, seed: int) -> dict:
    """``path`` when it exists (checked against ``k`` and the stems), else the folds, written there.

    ``labels_by_stem`` is a callable returning ``{stem: [classes]}``, called only when needed.
    Jobs of one cross-validation started together take turns on a lock: one writes, all read.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(path.with_name(f".{path.name}.lock")):
        if path.exists():
            folds = read_folds(path)
            if folds["k"] != k:
                raise UserError(
                    f"{path} holds {folds['k']} folds, but data.folds={k}: use data.folds={folds['k']}, "
                    "or another cross-validation folder (make cv DIR=...)"
                )
            return folds
        folds = make_folds(labels_by_stem(), k, seed)
        write_json_atomic(path, folds, indent=1)
        log.info("%d folds of %d images written to %s", k, sum(map(len, folds["folds"])), path)
        return folds


def read_folds(path: Path) -> dict:
    try:
        folds = json.loads(Path(path).read_text(encoding="utf-8"))
        if not isinstance(folds.get("folds"), list) or folds.get("k") != len(folds["folds"]):
            raise ValueError('it needs "k" and "folds", a list of k lists of stems')
    except (ValueError, AttributeError, OSError) as err:
        raise UserError(
            f"{path} is not a valid folds file ({err}); restore it, or delete it to draw new folds "
            "(every fold of that cross-validation must then be trained again)"
        ) from err
    return folds


def fold_split(folds: dict, fold: int, folds_file: Path) -> dict:
    """A run's ``split.json`` record for fold ``fold``: val is that fold, train the others; fold -1
    (``REFIT``) trains on every fold and has no val."""
    if not -1 <= fold < folds["k"]:
        raise UserError(
            f"data.fold must be 0..{folds['k'] - 1} (data.folds={folds['k']}), or -1 to train on all, "
            f"got {fold}"
        )
    train = sorted(s for j, part in enumerate(folds["folds"]) if j != fold for s in part)
    return {
        "seed": folds["seed"],
        "folds": folds["k"],
        "fold": fold,
        "folds_file": str(Path(folds_file).resolve()),
        "folds_digest": folds_digest(folds),
        "train": train,
        "val": sorted(folds["folds"][fold]) if fold >= 0 else [],
    }


def folds_digest(folds: dict) -> str:
    """What identifies a partition, wherever its file was copied: a hash of its folds."""
    return hashlib.sha256(json.dumps(folds["folds"]).encode()).hexdigest()[:16]


def load_or_make_fold_split(
    split_file: Path | None, labels_by_stem, stems: list[str], k: int, fold: int, folds_file, seed: int
) -> dict:
    """The split of fold ``fold`` of ``k``: the run's ``split.json`` when it exists (resume, submit),
    else from the folds file (``folds_file``, default ``folds.json`` beside ``split.json``).
    ``labels_by_stem``: a callable returning ``{stem: [classes]}`` (the labels index's ``classes``)."""
    if split_file is not None and split_file.exists():
        split = load_or_make_split(split_file, stems, 0.5, seed)  # reads and checks it
        if (was := (split.get("folds"), split.get("fold"))) != (k, fold):
            raise UserError(
                f"{split_file} is the split of data.folds={was[0]} data.fold={was[1]}, "
                f"not of data.folds={k} data.fold={fold}: resume with the run's own settings"
            )
        return split
    if folds_file is None and split_file is None:
        raise ValueError("data.folds needs data.folds_file or a run folder for folds.json")
    folds_file = Path(folds_file) if folds_file else split_file.with_name("folds.json")

    def labels_of_stems():
        labels = labels_by_stem()
        return {stem: labels[stem] for stem in stems}

    folds = load_or_make_folds(folds_file, labels_of_stems, k, seed)
    listed = {s for part in folds["folds"] for s in part}
    if missing := sorted(listed - set(stems)):
        raise UserError(
            f"{folds_file} lists {len(missing)} images that data.root lacks (first: {missing[0]}); "
            "point data.root at the data these folds were drawn from, or use another folder"
        )
    if new := len(set(stems) - listed):
        log.warning("%d labelled images are not in %s and are left out", new, folds_file)
    split = fold_split(folds, fold, folds_file)
    if split_file is not None:
        write_json_atomic(split_file, split, indent=1)
    return split
