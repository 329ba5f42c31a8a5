"""A labelled test set from the labelled images: one fold held out, as a data root of links.

``python -m coco_multilabel.bench.holdout --data DATA --folds <cv dir>/folds.json --fold 4 --out DIR``
writes ``DIR`` in the challenge layout: ``images/train`` and ``labels/train`` hold the other folds,
``images/test`` the held-out fold, and ``test-labels`` its label files. Every file is a symbolic link
to the original, so it costs no disk. Train, ``make cv`` and ``make submit`` on ``DIR`` as on the
challenge data, then ``make evaluate PRED=... LABELS=DIR/test-labels`` scores what the leaderboard
would see on images no model and no threshold saw: how the project measures a recipe held out.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

from coco_multilabel.cli import report_user_errors
from coco_multilabel.data.datasets import list_images
from coco_multilabel.data.folds import read_folds
from coco_multilabel.errors import UserError

FOLDERS = ("images/train", "labels/train", "images/test", "test-labels")


def hold_out(data: str | Path, folds_file: str | Path, fold: int, out: str | Path) -> dict[str, int]:
    """Write the held-out data root ``out`` (see the module docstring); return how many images each
    part got. ``out`` appears complete or not at all."""
    data, out = Path(data).resolve(), Path(out)
    folds = read_folds(Path(folds_file))
    if not 0 <= fold < folds["k"]:
        raise UserError(f"--fold must be 0..{folds['k'] - 1} for {folds_file}, got {fold}")
    if out.exists():
        raise UserError(f"{out} exists; remove it or choose another --out")
    held = set(folds["folds"][fold])
    labels_dir = data / "labels" / "train"
    images = {p.stem: p for p in list_images(data / "images" / "train")}
    labelled = sorted(p.stem for p in labels_dir.glob("*.cls"))
    missing = [s for s in held if s not in images or not (labels_dir / f"{s}.cls").is_file()]
    if missing:
        raise UserError(
            f"{len(missing)} images of fold {fold} of {folds_file} are not in {data} (e.g. {missing[0]}): "
            "the folds were drawn on other data"
        )
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        for folder in FOLDERS:
            (tmp / folder).mkdir(parents=True)
        for stem in labelled:
            if stem not in images:
                continue  # a label without an image: training leaves it out too
            image, label = images[stem], labels_dir / f"{stem}.cls"
            test = stem in held
            (tmp / ("images/test" if test else "images/train") / image.name).symlink_to(image)
            (tmp / ("test-labels" if test else "labels/train") / label.name).symlink_to(label)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"train": len(list((out / "labels" / "train").iterdir())), "test": len(held)}


@report_user_errors
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="the data root the folds were drawn on")
    parser.add_argument("--folds", required=True, help="a folds.json (make cv writes <DIR>/folds.json)")
    parser.add_argument("--fold", type=int, required=True, help="the fold to hold out as the test set")
    parser.add_argument("--out", required=True, help="the new data root (must not exist)")
    args = parser.parse_args(argv)
    counts = hold_out(args.data, args.folds, args.fold, args.out)
    print(
        f"{args.out}: {counts['train']} labelled training images, {counts['test']} held-out test images "
        f"(labels in {Path(args.out) / 'test-labels'})"
    )


if __name__ == "__main__":
    main()
