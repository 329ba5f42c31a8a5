"""Submit: ``python -m coco_multilabel.submit ckpt_path=FILE data.root=DIR output=FILE``.

Predicts every image of ``images/test`` with the checkpoint's tuned thresholds and writes the
challenge JSON, validated against the test folder before it is moved into place. ``ckpt_path`` may
name an ensemble (``ckpt_path='a.ckpt,b.ckpt'``, a ``make cv`` folder, or a sweep folder with
``submit.top=n``): the members' probabilities averaged, thresholds tuned for the ensemble. With
``submit.images=val`` it predicts the run's own val split instead (for ``make evaluate``), and
``submit.save_probs=true`` keeps the probabilities so thresholds can be re-tuned offline.
``submit.tta`` (default: as the checkpoint was validated) averages each image with its mirror image.
With ``data.on_bad_image=skip`` an unreadable image gets ``submit.fallback_labels``: the
leaderboard rejects a JSON that lacks a stem, so every stem is written.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from coco_multilabel.classes import NUM_CLASSES
from coco_multilabel.cli import CONFIG_DIR, report_user_errors
from coco_multilabel.data.datasets import DATA_ROOT_HELP, check_data_root, list_images
from coco_multilabel.data.labels import CHECK_DATA_HINT, to_multi_hot
from coco_multilabel.data.split import split_image_paths
from coco_multilabel.decisions.probabilities import save_probabilities
from coco_multilabel.decisions.submission import decide_with_fallback, write_submission
from coco_multilabel.decisions.thresholds import describe, rule_of
from coco_multilabel.errors import UserError
from coco_multilabel.folders import read_members, split_kind
from coco_multilabel.models.checkpoints import load_model
from coco_multilabel.models.ensemble import ensemble_probabilities, ensemble_thresholds
from coco_multilabel.models.inference import predict_files

log = logging.getLogger(__name__)


def submit(
    ckpt_path: str | list,
    data_root: str,
    output: str,
    threshold: float | None = None,
    min_labels: int | None = None,
    images: str = "test",
    save_probs: bool = False,
    tta: bool | None = None,
    fallback_labels: tuple[int, ...] = (0,),
    top: int | None = None,
    **inference,
) -> Path:
    """Write the predictions JSON for ``images`` (``test`` or ``val``); return its path.
    ``ckpt_path``: a checkpoint, or an ensemble (several, a ``make cv`` folder, a sweep folder with
    ``top``; see folders.py). ``min_labels``: None applies the rule the thresholds were tuned
    for (their ``threshold_tuning`` record). ``inference``: the options of :func:`predict_files`."""
    members = read_members(ckpt_path, top)
    for member in members:
        classes = member.checkpoint["hyper_parameters"].get("num_classes", NUM_CLASSES)
        if classes != NUM_CLASSES:
            raise UserError(
                f"{member.path} predicts {classes} classes, but the challenge scores {NUM_CLASSES}; "
                "submit a checkpoint trained by `make train` on the challenge data"
            )
    fallback = sorted(set(fallback_labels))
    if any(not 0 <= c < NUM_CLASSES for c in fallback):
        raise UserError(f"submit.fallback_labels must be class indices 0..{NUM_CLASSES - 1}, got {fallback}")
    if len(members) == 1:
        checkpoint = members[0].checkpoint
        model = load_model(checkpoint, source=members[0].path)
        if tta is not None and tta != model.hparams.tta:
            log.warning("submit.tta=%s, but the thresholds were tuned with tta=%s", tta, model.hparams.tta)
            model.hparams.tta = tta
        paths = image_paths(members, data_root, images)
        predicted, kept = predict_files(model, checkpoint, paths, **inference)
        thresholds, tuning = (
            choose_thresholds(model, checkpoint, threshold),
            checkpoint.get("threshold_tuning"),
        )
    else:  # thresholds first: they refuse members of different splits before any prediction
        thresholds, tuning = ensemble_thresholds(members, split_kind(members))
        if threshold is not None:
            log.info("threshold %.3f for every class (submit.threshold)", threshold)
            thresholds = torch.full_like(thresholds, threshold)
        paths = image_paths(members, data_root, images)
        predicted, kept = ensemble_probabilities(members, paths, tta=tta, **inference)
    min_labels = applied_rule(tuning, min_labels)
    if threshold is None and (tuning is None or min_labels == rule_of(tuning)):
        log.info("decision: %s", describe(tuning))  # the figure of what is written, before any test label
    else:
        log.info("decision: overridden (submit.threshold, submit.min_labels=%d): no tuned figure", min_labels)
    if tuning:
        tuning = {**tuning, "min_labels": min_labels}  # as applied: make evaluate PROBS= scores this rule
    stems = [p.stem for p in paths]
    # an unreadable image "predicts" its fallback labels, in the JSON and in the saved probabilities
    probs = to_multi_hot(fallback).repeat(len(stems), 1)
    probs[kept] = predicted
    labels = decide_with_fallback(probs, kept, thresholds, min_labels, fallback)
    if not kept.all():
        first = paths[int(torch.nonzero(~kept)[0])]
        log.warning(
            "%d images are unreadable and get the fallback labels %s (first: %s); %s",
            int((~kept).sum()), fallback, first, CHECK_DATA_HINT,
        )  # fmt: skip
    path = write_submission(output, dict(zip(stems, labels, strict=True)), stems)
    if save_probs:
        save_probabilities(path.with_suffix(".probs.pt"), stems, probs, thresholds, tuning)
    log.info(
        "wrote %s: %d images, %.2f labels per image%s", path, len(stems), sum(map(len, labels)) / len(stems),
        f", the mean of {len(members)} models" if len(members) > 1 else "",
    )  # fmt: skip
    return path


def applied_rule(tuning: dict | None, override: int | None) -> int:
    """``min_labels``: the one the thresholds were tuned for, unless ``override`` (said when it differs)."""
    tuned = rule_of(tuning)
    if override is None:
        return tuned
    if override < 0:
        raise UserError(f"submit.min_labels must be 0 or more, got {override}")
    if tuning is not None and override != tuned:
        log.warning("submit.min_labels=%d, but the thresholds were tuned for min_labels=%d", override, tuned)
    return override


def image_paths(members: list, data_root: str, images: str) -> list[Path]:
    """The test images, or the val images of the run (or of the one split) the members belong to."""
    if images == "test":
        test_dir = check_data_root(data_root, need=("images/test",)) / "images" / "test"
        if not (paths := list_images(test_dir)):
            raise UserError(f"{test_dir} holds no .jpg file: {DATA_ROOT_HELP}")
        return paths
    if images == "val":
        if len(members) > 1 and split_kind(members) != "split":
            raise UserError(
                "submit.images=val needs members of one split; the folds of a CV have no common val"
            )
        root = check_data_root(data_root, need=("images/train",))
        return split_image_paths(members[0].path.parent.parent / "split.json", root, "val")
    raise UserError(f"submit.images must be 'test' or 'val', got {images!r}")


def choose_thresholds(model, checkpoint: dict, override: float | None) -> torch.Tensor:
    """On the CPU, beside the probabilities, wherever the model ran."""
    tuned = model.thresholds.detach().float().cpu()
    if override is not None:
        log.info("threshold %.3f for every class (submit.threshold)", override)
        return torch.full_like(tuned, override)
    tuning = checkpoint.get("threshold_tuning")
    if tuning is None:
        log.warning("the checkpoint has no tuned thresholds; using 0.5 (set submit.threshold to choose)")
        return torch.full_like(tuned, 0.5)
    return tuned


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="submit")
@report_user_errors
def main(cfg: DictConfig) -> None:
    ckpt_path = cfg.ckpt_path if isinstance(cfg.ckpt_path, str) else list(cfg.ckpt_path)
    submit(
        ckpt_path, cfg.data.root, cfg.output, threshold=cfg.submit.threshold,
        min_labels=cfg.submit.min_labels, images=cfg.submit.images, save_probs=cfg.submit.save_probs,
        tta=cfg.submit.tta, fallback_labels=tuple(cfg.submit.fallback_labels), top=cfg.submit.get("top"),
        image_size=cfg.data.image_size, batch_size=cfg.data.batch_size, num_workers=cfg.data.num_workers,
        accelerator=cfg.accelerator, on_bad_image=cfg.data.on_bad_image,
    )  # fmt: skip


if __name__ == "__main__":
    main()
