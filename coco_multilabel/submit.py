"""Submit: ``python -m coco_multilabel.submit ckpt_path=FILE data.root=DIR output=FILE``.

Predicts every image of ``images/test`` with the checkpoint's tuned thresholds and writes the
challenge JSON, validated against the test folder before it is moved into place. With
``submit.images=val`` it predicts the run's own val split instead (for ``make evaluate``), and
``submit.save_probs=true`` keeps the probabilities so thresholds can be re-tuned offline.
``submit.tta`` (default: as the checkpoint was validated) averages each image with its mirror image.
With ``data.on_bad_image=skip`` an unreadable image gets ``submit.fallback_labels``: the
leaderboard rejects a JSON that lacks a stem, so every stem is written.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import hydra
import lightning as L
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from coco_multilabel.classes import COCO_CLASSES, NUM_CLASSES
from coco_multilabel.config import CONFIG_DIR, report_user_errors
from coco_multilabel.data.datamodule import DATA_ROOT_HELP, check_data_root, default_num_workers, read_split
from coco_multilabel.data.datasets import CocoImages, collate_skipping_bad, list_images
from coco_multilabel.data.labels import CHECK_DATA_HINT, to_multi_hot
from coco_multilabel.data.transforms import checkpoint_eval_transform
from coco_multilabel.errors import UserError
from coco_multilabel.io import write_bytes_atomic
from coco_multilabel.models.classifier import MultiLabelClassifier, read_checkpoint
from coco_multilabel.submission import decide_labels, write_submission

log = logging.getLogger(__name__)


def submit(
    ckpt_path: str,
    data_root: str,
    output: str,
    threshold: float | None = None,
    min_labels: int = 1,
    images: str = "test",
    save_probs: bool = False,
    image_size: int | None = None,
    batch_size: int = 64,
    num_workers: int | None = None,
    accelerator: str = "auto",
    progress_bar: bool = True,
    on_bad_image: str = "error",
    fallback_labels: tuple[int, ...] = (0,),
    tta: bool | None = None,
) -> Path:
    """Write the predictions JSON for ``images`` (``test`` or ``val``); return its path."""
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
    if tta is not None and tta != model.hparams.tta:
        log.warning("submit.tta=%s, but the thresholds were tuned with tta=%s", tta, model.hparams.tta)
        model.hparams.tta = tta
    size = image_size or checkpoint.get("datamodule_hyper_parameters", {}).get("image_size", 224)
    paths = image_paths(Path(ckpt_path), data_root, images)
    loader = DataLoader(
        CocoImages(
            paths,
            transform=checkpoint_eval_transform(checkpoint, size),
            min_side=size,
            on_bad_image=on_bad_image,
        ),
        batch_size=batch_size,
        num_workers=default_num_workers() if num_workers is None else num_workers,
        collate_fn=collate_skipping_bad,
    )
    readable = ReadableImages()
    trainer = L.Trainer(
        accelerator=accelerator, devices=1, logger=False, enable_progress_bar=progress_bar,
        enable_model_summary=False, callbacks=[readable],
    )  # fmt: skip
    predicted = torch.cat(trainer.predict(model, loader)).float().cpu()
    stems = [p.stem for p in paths]
    kept = torch.cat(readable.masks)
    # an unreadable image "predicts" its fallback labels, in the JSON and in the saved probabilities
    probs = to_multi_hot(fallback).repeat(len(stems), 1)
    probs[kept] = predicted
    thresholds = choose_thresholds(model, checkpoint, threshold)
    labels = decide_labels(probs, thresholds, min_labels)
    skipped = torch.nonzero(~kept).flatten().tolist()
    for i in skipped:
        labels[i] = list(fallback)
    if skipped:
        log.warning(
            "%d images are unreadable and get the fallback labels %s (first: %s); %s",
            len(skipped), fallback, paths[skipped[0]], CHECK_DATA_HINT,
        )  # fmt: skip
    path = write_submission(output, dict(zip(stems, labels, strict=True)), stems)
    if save_probs:
        save_probabilities(path.with_suffix(".probs.pt"), stems, probs, thresholds, checkpoint)
    log.info(
        "wrote %s: %d images, %.2f labels per image", path, len(stems), sum(map(len, labels)) / len(stems)
    )
    return path


def image_paths(ckpt_path: Path, data_root: str, images: str) -> list[Path]:
    """The test images, or the val images of the run the checkpoint belongs to."""
    if images == "test":
        test_dir = check_data_root(data_root, need=("images/test",)) / "images" / "test"
        if not (paths := list_images(test_dir)):
            raise UserError(f"{test_dir} holds no .jpg file: {DATA_ROOT_HELP}")
        return paths
    if images == "val":
        split_file = ckpt_path.parent.parent / "split.json"
        if not split_file.is_file():
            raise UserError(f"submit.images=val needs the run's split, but {split_file} does not exist")
        root = check_data_root(data_root, need=("images/train",))
        return [root / "images" / "train" / f"{stem}.jpg" for stem in read_split(split_file)["val"]]
    raise UserError(f"submit.images must be 'test' or 'val', got {images!r}")


def choose_thresholds(model: MultiLabelClassifier, checkpoint: dict, override: float | None) -> torch.Tensor:
    if override is not None:
        log.info("threshold %.3f for every class (submit.threshold)", override)
        return torch.full_like(model.thresholds, override)
    tuning = checkpoint.get("threshold_tuning")
    if tuning is None:
        log.warning("the checkpoint has no tuned thresholds; using 0.5 (set submit.threshold to choose)")
        return torch.full_like(model.thresholds, 0.5)
    log.info("thresholds tuned on val: %s, maximising %s", tuning.get("mode"), tuning.get("objective"))
    return model.thresholds


class ReadableImages(L.Callback):
    """Which images of each predict batch could be read: the mask of ``collate_skipping_bad``."""

    def __init__(self):
        self.masks: list[torch.Tensor] = []

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.masks.append(batch[2].cpu())


def save_probabilities(path: Path, stems, probs, thresholds, checkpoint: dict) -> None:
    """Probabilities with what is needed to re-tune and re-score them (``make evaluate PROBS=``)."""
    buffer = io.BytesIO()
    torch.save(
        {"stems": list(stems), "probs": probs, "thresholds": thresholds, "classes": COCO_CLASSES,
         "threshold_tuning": checkpoint.get("threshold_tuning")},
        buffer,
    )  # fmt: skip
    write_bytes_atomic(path, buffer.getbuffer())
    log.info("probabilities saved to %s", path)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="submit")
@report_user_errors
def main(cfg: DictConfig) -> None:
    submit(
        cfg.ckpt_path,
        cfg.data.root,
        cfg.output,
        threshold=cfg.submit.threshold,
        min_labels=cfg.submit.min_labels,
        images=cfg.submit.images,
        save_probs=cfg.submit.save_probs,
        image_size=cfg.data.image_size,
        batch_size=cfg.data.batch_size,
        num_workers=cfg.data.num_workers,
        accelerator=cfg.accelerator,
        on_bad_image=cfg.data.on_bad_image,
        fallback_labels=tuple(cfg.submit.fallback_labels),
        tta=cfg.submit.tta,
    )


if __name__ == "__main__":
    main()
