"""Predict: ``python -m coco_multilabel.predict CKPT IMAGE_OR_FOLDER [--json]`` (``make predict``).

What a checkpoint sees in your own images: per image the classes ``make submit`` would write (above
the checkpoint's tuned thresholds, at least the ``min_labels`` most likely) with their probabilities,
and the five most likely classes whatever the threshold. ``--json`` prints the same as JSON, for scripts.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from coco_multilabel.classes import COCO_CLASSES
from coco_multilabel.cli import report_user_errors
from coco_multilabel.decisions.thresholds import decide, rule_of
from coco_multilabel.errors import UserError
from coco_multilabel.folders import read_members, split_kind
from coco_multilabel.models.checkpoints import load_model
from coco_multilabel.models.ensemble import ensemble_probabilities, ensemble_thresholds
from coco_multilabel.models.inference import predict_files

log = logging.getLogger(__name__)

SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def image_files(target: str | Path) -> list[Path]:
    """``target`` itself, or the images of the folder ``target`` (not its subfolders), sorted."""
    target = Path(target)
    if target.is_file():
        return [target]
    if not target.is_dir():
        raise UserError(f"{target} does not exist; give an image file or a folder of images")
    files = sorted(p for p in target.iterdir() if p.is_file() and p.suffix.lower() in SUFFIXES)
    if not files:
        raise UserError(f"{target} holds no image file ({', '.join(sorted(SUFFIXES))})")
    return files


def predict(
    ckpt_path: str | Path,
    target: str | Path,
    threshold: float | None = None,
    top: int = 5,
    top_jobs: int | None = None,
    **inference,
) -> list[dict]:
    """Per image: ``labels`` as submit decides them and the ``top`` classes, each ``{class, name, prob}``.
    ``ckpt_path``: a checkpoint or an ensemble, as for submit (folders.py).
    ``inference``: the options of :func:`predict_files`."""
    members = read_members(ckpt_path, top_jobs)
    files = image_files(target)
    inference = {"progress_bar": False, "num_workers": 0 if len(files) < 64 else None, **inference}
    if len(members) > 1:
        thresholds, tuning = ensemble_thresholds(members, split_kind(members))
        probs, _ = ensemble_probabilities(members, files, **inference)
    else:
        checkpoint = members[0].checkpoint
        tuning = checkpoint.get("threshold_tuning")
        model = load_model(checkpoint, source=ckpt_path)
        if "threshold_tuning" not in checkpoint and threshold is None:
            log.warning("%s has no tuned thresholds: using 0.5 (--threshold to choose)", ckpt_path)
        thresholds = model.thresholds.detach().float().cpu()  # 0.5 unless tuned; beside the probabilities
        probs, _ = predict_files(model, checkpoint, files, **inference)  # with flips when validated so
    if threshold is not None:
        thresholds = torch.full_like(thresholds, threshold)
    names = COCO_CLASSES[: len(thresholds)]
    decisions = decide(probs, thresholds, rule_of(tuning))
    results = []
    for file, p, chosen in zip(files, probs, decisions, strict=True):
        order = torch.argsort(p, descending=True).tolist()
        results.append(
            {
                "image": str(file),
                "labels": [_entry(names, p, c) for c in order if chosen[c]],
                "top": [_entry(names, p, c) for c in order[:top]],
            }
        )
    return results


def _entry(names, probs: torch.Tensor, c: int) -> dict:
    return {"class": c, "name": names[c], "prob": round(float(probs[c]), 4)}


def format_predictions(results: list[dict]) -> str:
    def listing(entries):
        return ", ".join(f"{e['name']} {e['prob']:.2f}" for e in entries)

    lines = []
    for r in results:
        lines.append(f"{r['image']}: {listing(r['labels']) or '(no class above its threshold)'}")
        lines.append(f"  top {len(r['top'])}: {listing(r['top'])}")
    return "\n".join(lines)


@report_user_errors
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="e.g. outputs/train/<run>/checkpoints/best.ckpt; or an ensemble: "
                        "a,b, a make cv folder, a sweep folder with --top-jobs")  # fmt: skip
    parser.add_argument("image", help="an image file, or a folder of images")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.add_argument("--threshold", type=float, help="one threshold for every class (default: tuned)")
    parser.add_argument("--top", type=int, default=5, help="how many most likely classes to list")
    parser.add_argument("--top-jobs", type=int, help="a sweep folder: ensemble its n best jobs")
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(message)s", stream=sys.stderr)
    results = predict(args.checkpoint, args.image, args.threshold, args.top, args.top_jobs)
    print(json.dumps(results, indent=1) if args.json else format_predictions(results))


if __name__ == "__main__":
    main()
