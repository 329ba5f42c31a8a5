"""Submit: ``python -m coco_multilabel.submit ckpt_path=FILE data.root=DIR output=FILE``.

Predicts every image of ``images/test`` with the checkpoint's tuned thresholds and writes the
challenge JSON, validated against the test folder before it is moved into place.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import lightning as L
import torch
from omegaconf import DictConfig

from coco_multilabel.classes import NUM_CLASSES
from coco_multilabel.config import CONFIG_DIR, report_user_errors
from coco_multilabel.data.datamodule import CocoDataModule
from coco_multilabel.data.labels import CHECK_DATA_HINT
from coco_multilabel.errors import UserError
from coco_multilabel.models.classifier import MultiLabelClassifier, read_checkpoint
from coco_multilabel.submission import decide_labels, write_submission

log = logging.getLogger(__name__)


def submit(
    ckpt_path: str,
    data_root: str,
    output: str,
    threshold: float | None = None,
    min_labels: int = 1,
    image_size: int | None = None,
    batch_size: int = 64,
    num_workers: int | None = None,
    accelerator: str = "auto",
    progress_bar: bool = True,
    on_bad_image: str = "error",
    fallback_labels: tuple[int, ...] = (0,),
) -> Path:
    """Write the predictions JSON for ``data_root/images/test``; return its path.

    With ``on_bad_image="skip"`` an unreadable test image gets ``fallback_labels``: the leaderboard
    rejects a JSON that lacks a stem, so every stem is written.
    """
    checkpoint = read_checkpoint(ckpt_path)
    classes = checkpoint["hyper_parameters"].get("num_classes", NUM_CLASSES)
    if classes != NUM_CLASSES:
        raise UserError(
            f"{ckpt_path} predicts {classes} classes, but the challenge scores {NUM_CLASSES}; "
            "submit a checkpoint trained by `make train` on the challenge data"
        )
    fallback = sorted(set(fallback_labels))
    if any(not 0 <= c < NUM_CLASSES for c in fallback):
        raise UserError(f"submit.fallback_labels must be class indices 0..{NUM_CLASSES - 1}, got {fallback}")
    model = MultiLabelClassifier.from_checkpoint(checkpoint, source=ckpt_path)
    trained = checkpoint.get("datamodule_hyper_parameters", {})
    datamodule = CocoDataModule(
        root=data_root,
        image_size=image_size or trained.get("image_size", 224),
        batch_size=batch_size,
        num_workers=num_workers,
        on_bad_image=on_bad_image,
    )
    trainer = L.Trainer(
        accelerator=accelerator, devices=1, logger=False, enable_progress_bar=progress_bar,
        enable_model_summary=False,
    )  # fmt: skip
    probs = torch.cat(trainer.predict(model, datamodule=datamodule)).float().cpu()
    thresholds = choose_thresholds(model, checkpoint, threshold)
    stems = datamodule.predict_set.stems
    skipped = set(datamodule.skipped_predict_indices)
    decided = iter(decide_labels(probs, thresholds, min_labels))
    labels = [list(fallback) if i in skipped else next(decided) for i in range(len(stems))]
    if skipped:
        log.warning(
            "%d test images are unreadable and get the fallback labels %s (first: %s); %s",
            len(skipped), fallback, stems[min(skipped)], CHECK_DATA_HINT,
        )  # fmt: skip
    path = write_submission(output, dict(zip(stems, labels, strict=True)), stems)
    log.info(
        "wrote %s: %d images, %.2f labels per image", path, len(stems), sum(map(len, labels)) / len(stems)
    )
    return path


def choose_thresholds(model: MultiLabelClassifier, checkpoint: dict, override: float | None) -> torch.Tensor:
    if override is not None:
        log.info("threshold %.3f for every class (submit.threshold)", override)
        return torch.full_like(model.thresholds, override)
    tuning = checkpoint.get("threshold_tuning")
    if tuning is None:
        log.warning("the checkpoint has no tuned threshold; using 0.5 (set submit.threshold to choose)")
        return torch.full_like(model.thresholds, 0.5)
    log.info("thresholds tuned on val (%s, %s): %s", tuning["mode"], tuning["objective"], tuning["threshold"])
    return model.thresholds


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="submit")
@report_user_errors
def main(cfg: DictConfig) -> None:
    submit(
        cfg.ckpt_path,
        cfg.data.root,
        cfg.output,
        threshold=cfg.submit.threshold,
        min_labels=cfg.submit.min_labels,
        image_size=cfg.data.image_size,
        batch_size=cfg.data.batch_size,
        num_workers=cfg.data.num_workers,
        accelerator=cfg.accelerator,
        on_bad_image=cfg.data.on_bad_image,
        fallback_labels=tuple(cfg.submit.fallback_labels),
    )


if __name__ == "__main__":
    main()
