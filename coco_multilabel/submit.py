"""Submit: ``python -m coco_multilabel.submit ckpt_path=FILE data.root=DIR output=FILE``.

Predicts every image of ``images/test`` with the checkpoint's tuned thresholds and writes the
challenge JSON, validated against the test folder before it is moved into place. With
``submit.images=val`` it predicts the run's own val split instead (for ``make evaluate``), and
``submit.save_probs=true`` keeps the probabilities so thresholds can be re-tuned offline.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
import lightning as L
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from coco_multilabel.classes import COCO_CLASSES
from coco_multilabel.config import CONFIG_DIR, report_user_errors
from coco_multilabel.data.datamodule import check_data_root, default_num_workers
from coco_multilabel.data.datasets import CocoImages, list_images
from coco_multilabel.data.transforms import eval_transform
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
    images: str = "test",
    save_probs: bool = False,
    image_size: int | None = None,
    batch_size: int = 64,
    num_workers: int | None = None,
    accelerator: str = "auto",
    progress_bar: bool = True,
) -> Path:
    """Write the predictions JSON for ``images`` (``test`` or ``val``); return its path."""
    checkpoint = read_checkpoint(ckpt_path)
    model = MultiLabelClassifier.from_checkpoint(checkpoint, source=ckpt_path)
    size = image_size or checkpoint.get("datamodule_hyper_parameters", {}).get("image_size", 224)
    paths = image_paths(Path(ckpt_path), data_root, images)
    loader = DataLoader(
        CocoImages(paths, transform=eval_transform(image_size=size)),
        batch_size=batch_size,
        num_workers=default_num_workers() if num_workers is None else num_workers,
    )
    trainer = L.Trainer(
        accelerator=accelerator, devices=1, logger=False, enable_progress_bar=progress_bar,
        enable_model_summary=False,
    )  # fmt: skip
    probs = torch.cat(trainer.predict(model, loader)).float().cpu()
    thresholds = choose_thresholds(model, checkpoint, threshold)
    labels = decide_labels(probs, thresholds, min_labels)
    stems = [p.stem for p in paths]
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
        return list_images(check_data_root(data_root, need=("images/test",)) / "images" / "test")
    if images == "val":
        split_file = ckpt_path.parent.parent / "split.json"
        if not split_file.is_file():
            raise UserError(f"submit.images=val needs the run's split, but {split_file} does not exist")
        root = check_data_root(data_root, need=("images/train",))
        return [
            root / "images" / "train" / f"{stem}.jpg" for stem in json.loads(split_file.read_text())["val"]
        ]
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


def save_probabilities(path: Path, stems, probs, thresholds, checkpoint: dict) -> None:
    """Probabilities with what is needed to re-tune and re-score them (``make evaluate PROBS=``)."""
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(
        {"stems": list(stems), "probs": probs, "thresholds": thresholds, "classes": COCO_CLASSES,
         "threshold_tuning": checkpoint.get("threshold_tuning")},
        tmp,
    )  # fmt: skip
    tmp.replace(path)
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
    )


if __name__ == "__main__":
    main()
