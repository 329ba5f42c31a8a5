"""Class probabilities of image files, as a checkpoint's model sees them: its eval transform and
image size, its flip TTA, decoded in workers at reduced size. Shared by submit, predict and report."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from coco_multilabel.callbacks.progress import PredictProgress
from coco_multilabel.data.datamodule import default_num_workers
from coco_multilabel.data.datasets import CocoImages, collate_skipping_bad
from coco_multilabel.data.transforms import checkpoint_eval_transform
from coco_multilabel.models.classifier import MultiLabelClassifier
from coco_multilabel.progress import is_terminal
from coco_multilabel.training.precision import use_tensor_cores


def checkpoint_image_size(checkpoint: dict) -> int:
    return checkpoint.get("datamodule_hyper_parameters", {}).get("image_size", 224)


def predict_files(
    model: MultiLabelClassifier,
    checkpoint: dict,
    paths: list[Path],
    image_size: int | None = None,
    batch_size: int = 64,
    num_workers: int | None = None,
    accelerator: str = "auto",
    progress_bar: bool = True,
    on_bad_image: str = "error",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(probs, kept)``: N x C probabilities of the readable images and which of ``paths`` they are
    (all of them unless ``on_bad_image="skip"`` left some out)."""
    size = image_size or checkpoint_image_size(checkpoint)
    dataset = CocoImages(
        paths, transform=checkpoint_eval_transform(checkpoint, size), min_side=size, on_bad_image=on_bad_image
    )
    readable = ReadableImages()
    # progress: a bar in a terminal, else a line every 30 s or 10 % (a bar written to a file shows
    # only its last frame)
    lines = [PredictProgress()] if progress_bar and not is_terminal() else []
    trainer = L.Trainer(
        accelerator=accelerator, devices=1, logger=False, enable_progress_bar=progress_bar and not lines,
        enable_model_summary=False, callbacks=[readable, *lines],
    )  # fmt: skip
    use_tensor_cores(trainer)  # as training set it: validation and submit multiply alike
    # uint8 batches (a quarter of float32's bytes), pinned for the copy to a GPU, normalised there
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=default_num_workers() if num_workers is None else num_workers,
        collate_fn=collate_skipping_bad,
        pin_memory=trainer.strategy.root_device.type == "cuda",
    )
    probs = torch.cat(trainer.predict(model, loader)).float().cpu()
    return probs, torch.cat(readable.masks)


class ReadableImages(L.Callback):
    """Which images of each predict batch could be read: the mask of ``collate_skipping_bad``."""

    def __init__(self):
        self.masks: list[torch.Tensor] = []

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.masks.append(batch["kept"].cpu())
