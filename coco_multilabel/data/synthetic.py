"""A synthetic dataset in the challenge layout, for the demo and the tests.

Each of the 80 classes is a shape in a colour (ten shapes, eight colours); an image holds a few
of them drawn at random places and sizes on a noisy background. A pretrained backbone separates
them easily, so a short run shows the whole pipeline working without the real data.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from coco_multilabel.classes import NUM_CLASSES

TEST_LABELS = "labels/test"  # the hidden answers, kept apart like the leaderboard's


COLORS = (  # eight hues far apart
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (250, 250, 250),
    (20, 20, 20),
)
SHAPES = ("disc", "square", "triangle", "cross", "ring", "hstripes", "vstripes", "checker", "diamond", "bar")


def class_mask(index: int, side: int) -> np.ndarray:
    """Boolean ``side`` x ``side`` mask of the shape of class ``index`` (ten shapes x eight colours)."""
    shape = SHAPES[index // len(COLORS)]
    y, x = np.mgrid[0:side, 0:side] / max(side - 1, 1) * 2 - 1  # coordinates in [-1, 1]
    r = np.hypot(x, y)
    stripe = max(side // 6, 2)
    rows, cols = np.mgrid[0:side, 0:side] // stripe
    return {
        "disc": r <= 1,
        "square": np.ones((side, side), bool),
        "triangle": y >= 2 * np.abs(x) - 1,
        "cross": (np.abs(x) < 0.3) | (np.abs(y) < 0.3),
        "ring": (r <= 1) & (r >= 0.55),
        "hstripes": rows % 2 == 0,
        "vstripes": cols % 2 == 0,
        "checker": (rows + cols) % 2 == 0,
        "diamond": np.abs(x) + np.abs(y) <= 1,
        "bar": np.abs(y) < 0.35,
    }[shape]


def draw_image(classes: list[int], size: int, rng: np.random.Generator) -> Image.Image:
    """An RGB image with one drawn object per class in ``classes``."""
    base = rng.integers(90, 166, size=3)
    noise = rng.normal(0, 12, size=(size, size, 3))
    canvas = np.clip(base + noise, 0, 255).astype(np.uint8)
    cells = rng.permutation(4)[: len(classes)]  # a 2x2 grid keeps objects apart
    half = size // 2
    for index, cell in zip(classes, cells, strict=True):
        side = int(half * rng.uniform(0.6, 0.95))
        top = (cell // 2) * half + rng.integers(0, half - side + 1)
        left = (cell % 2) * half + rng.integers(0, half - side + 1)
        window = canvas[top : top + side, left : left + side]
        window[class_mask(index, side)] = COLORS[index % len(COLORS)]
    return Image.fromarray(canvas)


def make_dataset(
    root: str | Path,
    n_train: int = 800,
    n_test: int = 100,
    size: int = 160,
    objects: tuple[int, int] = (1, 4),
    num_classes: int = NUM_CLASSES,
    seed: int = 0,
) -> Path:
    """Write ``images/train``, ``labels/train``, ``images/test`` and the hidden ``labels/test``."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for split, count in (("train", n_train), ("test", n_test)):
        image_dir = root / "images" / split
        label_dir = root / ("labels/train" if split == "train" else TEST_LABELS)
        image_dir.mkdir(parents=True, exist_ok=True)
        label_dir.mkdir(parents=True, exist_ok=True)
        offset = 0 if split == "train" else n_train
        for i in range(count):
            stem = f"{offset + i + 1:012d}"
            k = int(rng.integers(objects[0], objects[1] + 1))
            classes = sorted(rng.choice(num_classes, size=k, replace=False).tolist())
            draw_image(classes, size, rng).save(image_dir / f"{stem}.jpg", quality=90)
            (label_dir / f"{stem}.cls").write_text("".join(f"{c}\n" for c in classes))
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--n-train", type=int, default=800)
    parser.add_argument("--n-test", type=int, default=100)
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    make_dataset(args.root, args.n_train, args.n_test, args.size, seed=args.seed)
    print(f"synthetic dataset written to {args.root}")


if __name__ == "__main__":
    main()
