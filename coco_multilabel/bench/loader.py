"""What one DataLoader worker delivers on real photos, and how many workers it takes to feed a GPU.

A worker reads a JPEG, decodes it (Pillow, or torchvision's ``decode_jpeg``: ``data/images.py``),
and runs the train transform (random resized crop, flip, and in the GPU recipe RandAugment and
cutout), on one thread, as DataLoader workers run. The GPU to feed: NVIDIA's published ResNet-50
v1.5 mixed-precision training rate on one A100 80GB, 2,470 images/s at 224 px
(NVIDIA/DeepLearningExamples, PyTorch ResNet-50 v1.5 README, training performance); at a larger
size the same GPU trains about (224 / size)^2 as many images a second (its work grows with the
pixels), an estimate.
"""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path

import torch
from torchvision.transforms.v2.functional import pil_to_tensor

from coco_multilabel.data.datasets import list_images
from coco_multilabel.data.images import decode_image, load_rgb
from coco_multilabel.data.transforms import train_transform

A100_RESNET50_AMP = 2470  # images/s, 224 px, one A100 80GB, mixed precision (DeepLearningExamples)
CROP_SCALE = (0.5, 1.0)  # data.crop_scale's default
AUGMENTATIONS = {
    "crop + flip": {},  # data's defaults
    "+ RandAugment 2, cutout 0.5": {"randaugment_ops": 2, "cutout_prob": 0.5},  # the GPU recipe's
}
DECODERS = {
    "Pillow": lambda path, min_side: pil_to_tensor(load_rgb(path, min_side)),
    "decode_jpeg": decode_image,  # decode_jpeg where it applies, as the datasets decode
}


def photos(root: str | Path, count: int) -> list[Path]:
    return list_images(Path(root) / "images" / "train")[:count]


def identical_decodes(paths: list[Path]) -> int:
    """How many of ``paths`` both decoders turn into exactly the same pixels."""
    return sum(torch.equal(DECODERS["Pillow"](p, None), DECODERS["decode_jpeg"](p, None)) for p in paths)


def worker_rates(paths: list[Path], size: int, augmentation: dict, passes: int = 3) -> dict[str, float]:
    """Images/s of one worker (one thread) per decoder: decode at the size training decodes for,
    then the train transform. The decoders take turns, pass by pass (the machine's load changes),
    and each gets the median of its ``passes`` passes over ``paths``."""
    transform = train_transform(image_size=size, crop_scale=CROP_SCALE, **augmentation)
    min_side = int(size / CROP_SCALE[0] ** 0.5)  # as CocoDataModule decodes training images
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    times: dict[str, list[float]] = {name: [] for name in DECODERS}
    try:
        for decode in DECODERS.values():  # warm-up: first calls allocate and load what they need
            for path in paths[:10]:
                transform(decode(path, min_side))
        for _ in range(passes):
            for name, decode in DECODERS.items():
                start = time.perf_counter()
                for path in paths:
                    transform(decode(path, min_side))
                times[name].append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return {name: len(paths) / statistics.median(t) for name, t in times.items()}


def gpu_rate(size: int) -> float:
    return A100_RESNET50_AMP * (224 / size) ** 2


def loader_rows(root: str | Path, count: int = 300, sizes=(224, 384)) -> list[dict]:
    """One row per (size, augmentation, decoder): a worker's images/s and the workers an A100
    training ResNet-50 at that size needs."""
    paths = photos(root, count)
    rows = []
    for size in sizes:
        for augmentation, options in AUGMENTATIONS.items():
            for decoder, rate in worker_rates(paths, size, options).items():
                rows.append({"size": size, "augmentation": augmentation, "decoder": decoder, "rate": rate,
                             "workers": math.ceil(gpu_rate(size) / rate)})  # fmt: skip
    return rows


def loader_table(root: str | Path, count: int = 300) -> str:
    """The markdown table of :func:`loader_rows`, with how many photos decode identically."""
    paths = photos(root, count)
    same = identical_decodes(paths)
    rows = loader_rows(root, count)
    lines = [
        f"One loader worker (one thread) on {len(paths)} photos of {root}; decode_jpeg and Pillow decode "
        f"{same} of {len(paths)} identically (pixel for pixel). Workers: to feed one A100 training "
        f"ResNet-50 in mixed precision at {A100_RESNET50_AMP:,} images/s (224 px; at 384 px about "
        f"{gpu_rate(384):,.0f}, scaled by pixels).",
        "",
        "| size | augmentation | decoder | images/s per worker | workers for one A100 |",
        "| ---: | --- | --- | ---: | ---: |",
    ]
    for size in sorted({r["size"] for r in rows}):
        ours = [r for r in rows if r["size"] == size]
        for row in ours:
            lines.append(f"| {size} px | {row['augmentation']} | {row['decoder']} | {row['rate']:.0f} | "
                         f"{row['workers']} |")  # fmt: skip
        for augmentation in AUGMENTATIONS:
            pair = {r["decoder"]: r["rate"] for r in ours if r["augmentation"] == augmentation}
            lines.append(f"| {size} px | {augmentation} | decode_jpeg / Pillow | "
                         f"{pair['decode_jpeg'] / pair['Pillow']:.2f}x | |")  # fmt: skip
    return "\n".join(lines) + "\n"
