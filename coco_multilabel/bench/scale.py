"""``make bench-scale``: the pipeline at the challenge's size, on synthetic data.

Generates once (``outputs/bench/scale-data``) a data root in the challenge layout with as many
images as the challenge (65,000 labelled, 5,000 test, 640 x 480 JPEGs, the demo's generator
scaled, written in parallel chunks into a folder renamed into place when complete), then measures:
check-data, the datamodule's setup (labels index and split) in a fresh process the first time and
again, one training run of the default recipe (its feature cache built through the trainer, one
epoch from it) with the peak memory of the process and its workers, the model's own rates
(the cache's trunk on images, the cached phase's training step on features), and submit of the
test images. Writes ``outputs/bench/scale.md`` with the command that made it.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import lightning as L
import numpy as np
import torch

from coco_multilabel.classes import NUM_CLASSES
from coco_multilabel.data.synthetic import TEST_LABELS, draw_image
from coco_multilabel.io import write_json_atomic, write_text_atomic

DEFAULT_DATA = Path("outputs/bench/scale-data")
CHUNK = 500  # images per generating task


# --- the data -------------------------------------------------------------------------------------


def generate(root: Path, n_train: int, n_test: int, width: int, height: int, workers: int) -> float:
    """The synthetic data root, made once (seconds spent making it; 0 when it was there)."""
    spec = {"train": n_train, "test": n_test, "width": width, "height": height}
    marker = root / "scale.json"
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        return 0.0
    if root.exists():
        raise SystemExit(f"{root} exists but holds another data set; remove it or pass --data elsewhere")
    start = time.perf_counter()
    tmp = root.with_name(f".{root.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for sub in ("images/train", "labels/train", "images/test", TEST_LABELS):
        (tmp / sub).mkdir(parents=True)
    chunks = [("train", s, min(s + CHUNK, n_train)) for s in range(0, n_train, CHUNK)]
    chunks += [("test", s, min(s + CHUNK, n_test)) for s in range(0, n_test, CHUNK)]
    with ProcessPoolExecutor(workers) as pool:
        for _ in pool.map(_write_chunk, [(tmp, n_train, width, height, *c) for c in chunks]):
            pass
    write_json_atomic(tmp / "scale.json", spec)
    tmp.rename(root)
    return time.perf_counter() - start


def _write_chunk(args) -> None:
    tmp, n_train, width, height, split, start, stop = args
    rng = np.random.default_rng([start, split == "test"])  # each chunk its own stream: any order
    image_dir, label_dir = tmp / "images" / split, tmp / ("labels/train" if split == "train" else TEST_LABELS)
    for i in range(start, stop):
        stem = f"{(0 if split == 'train' else n_train) + i + 1:012d}"
        classes = sorted(rng.choice(NUM_CLASSES, size=int(rng.integers(1, 5)), replace=False).tolist())
        image = draw_image(classes, min(width, height), rng).resize((width, height))
        image.save(image_dir / f"{stem}.jpg", quality=90)
        (label_dir / f"{stem}.cls").write_text("".join(f"{c}\n" for c in classes))


# --- measuring in fresh processes -----------------------------------------------------------------


def run(args: list[str], env: dict | None = None) -> tuple[float, int, str]:
    """``(seconds, peak memory in bytes of the process and its children, stdout)`` of a command;
    memory is the sum of their proportional set sizes (shared pages counted once), sampled."""
    env = {**os.environ, **(env or {})}
    start = time.perf_counter()
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peak = [0]

    def sample():
        while process.poll() is None:
            peak[0] = max(peak[0], tree_memory(process.pid))
            time.sleep(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = process.communicate()
    seconds = time.perf_counter() - start
    sampler.join()
    if process.returncode:
        raise SystemExit(f"{shlex.join(args)} failed ({process.returncode}):\n{err[-4000:]}")
    return seconds, peak[0], out


def tree_memory(pid: int) -> int:
    """Pss (else Rss) of ``pid`` and its descendants, in bytes."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        todo += children.get(current, [])
        try:
            fields = dict(
                line.split(":", 1)
                for line in Path(f"/proc/{current}/smaps_rollup").read_text().splitlines()[1:]
            )
            total += int(fields.get("Pss", fields.get("Rss", "0 kB")).split()[0]) * 1024
        except (OSError, ValueError):
            continue
    return total


SETUP = """
import sys, time
from coco_multilabel.data.datamodule import CocoDataModule
start = time.perf_counter()
dm = CocoDataModule(root=sys.argv[1], cache_dir=sys.argv[2], split_file=sys.argv[3], num_workers=0)
dm.setup("fit")
print(time.perf_counter() - start, len(dm.train_images), len(dm.val_images))
"""


class PhaseTimer(L.Callback):
    """Loaded into the benchmarked training run: when the cache build and each epoch start and end,
    and how many images they covered, written to ``out`` as JSON."""

    def __init__(self, out: str):
        self.out, self.times = out, {}

    def on_predict_start(self, trainer, pl_module):
        self.times["cache_start"] = time.perf_counter()

    def on_predict_end(self, trainer, pl_module):
        self.times["cache_s"] = time.perf_counter() - self.times.pop("cache_start")
        self.times["cache_images"] = len(pl_module.request.images)
        self._save()

    def on_train_epoch_start(self, trainer, pl_module):
        self.times["epoch_start"] = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        """The epoch's training batches only: validation, which follows, is not counted."""
        self.times["epoch_s"] = time.perf_counter() - self.times["epoch_start"]
        self.times["epoch_images"] = self.times.get("epoch_images", 0) + len(batch["targets"])

    def on_train_epoch_end(self, trainer, pl_module):
        self._save()

    def _save(self):
        write_json_atomic(self.out, {k: v for k, v in self.times.items() if not k.endswith("_start")})


# --- the model's own rates ------------------------------------------------------------------------


def model_rates(overrides: list[str], repeats: int = 3) -> dict:
    """Images/s of the trunk the cache runs (image and mirror image, at the builder's batch size)
    and of the cached phase's training step (at the training batch size), on batches already in
    memory, in this process."""
    from coco_multilabel.bench.speed import build, config

    cfg = config("unused", *overrides)
    model, optimizer = build(cfg)
    size, batch = cfg.data.image_size, max(cfg.data.batch_size, 64)
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
    model.trunk_features(images)  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        features = model.trunk_features(images)
        model.trunk_features(images.flip(-1))
    trunk = repeats * batch / (time.perf_counter() - start)
    batch = cfg.data.batch_size
    features = (features.half() if features.dim() == 4 else features)[:batch]
    targets = (torch.rand(len(features), NUM_CLASSES) < 0.05).float()
    model.train()
    for i in range(repeats + 1):
        if i == 1:
            start = time.perf_counter()
        loss = model.criterion(model(features=features), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    step = repeats * len(features) / (time.perf_counter() - start)
    return {"trunk_images_per_s": trunk, "step_images_per_s": step}


def submit_overrides(overrides: list[str]) -> list[str]:
    """The train overrides submit also takes (its data keys, the accelerator)."""
    kept = [o for o in overrides if o.split("=")[0] in ("data.num_workers", "data.on_bad_image")]
    return kept + [o.replace("trainer.", "", 1) for o in overrides if o.startswith("trainer.accelerator=")]


# --- the whole bench ------------------------------------------------------------------------------


def bench(args) -> str:
    root, out_dir = Path(args.data), Path(args.out).parent
    work = out_dir / "scale-work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(Path.cwd()), os.environ.get("PYTHONPATH")]))}
    width, height = (int(v) for v in args.size.split("x"))
    made = generate(root, args.images, args.test_images, width, height, args.workers)
    py = sys.executable
    rows = []

    check_s, _, _ = run([py, "-m", "coco_multilabel.check_data", str(root)], env)
    rows.append(("check-data (header checks, Python start included)", f"{check_s:.1f} s"))
    setups = []
    for attempt in ("first", "again"):
        _, _, printed = run([py, "-c", SETUP, str(root), str(work / "cache"), str(work / "split.json")], env)
        seconds, n_train, n_val = printed.split()
        setups.append(float(seconds))
        rows.append(
            (f"datamodule setup, {attempt} ({n_train} train + {n_val} val)", f"{float(seconds):.2f} s")
        )

    run_dir, timer = work / "run", work / "timer.json"
    train = [
        py, "-m", "coco_multilabel.train", f"data.root={root}", f"hydra.run.dir={run_dir}",
        f"data.cache_dir={work / 'cache'}", "trainer.max_epochs=1", "callbacks.figures=null",
        "callbacks.progress_bar=null", "trainer.enable_progress_bar=false",
        "+callbacks.timer._target_=coco_multilabel.bench.scale.PhaseTimer", f"+callbacks.timer.out={timer}",
        *args.override,
    ]  # fmt: skip
    train_s, train_peak, _ = run(train, env)
    times = json.loads(timer.read_text())
    rates = model_rates(args.override)
    cache_rate = times["cache_images"] / times["cache_s"]
    epoch_rate = times["epoch_images"] / times["epoch_s"]
    rows += [
        ("training run: cache build + 1 epoch + validation (wall)", f"{train_s:.0f} s"),
        ("peak memory of the training process and its workers (PSS)", f"{train_peak / 2**30:.2f} GiB"),
        ("label matrix (N x 80 bool)", f"{args.images * NUM_CLASSES / 2**20:.1f} MiB"),
        ("cache build through the trainer (image + mirror image)", f"{cache_rate:.0f} images/s"),
        ("model only: the trunk on images in memory (image + mirror image)",
         f"{rates['trunk_images_per_s']:.0f} images/s"),
        ("cache build / model only", f"{cache_rate / rates['trunk_images_per_s']:.2f}x"),
        ("one epoch from the cache", f"{epoch_rate:.0f} images/s ({times['epoch_s']:.0f} s)"),
        ("model only: the cached phase's training step", f"{rates['step_images_per_s']:.0f} images/s"),
        ("cached epoch / model only", f"{epoch_rate / rates['step_images_per_s']:.2f}x"),
    ]  # fmt: skip
    submit_s, _, _ = run(
        [py, "-m", "coco_multilabel.submit", f"ckpt_path={run_dir / 'checkpoints' / 'best.ckpt'}",
         f"data.root={root}", f"output={work / 'submission.json'}",
         *submit_overrides(args.override)],
        env,
    )  # fmt: skip
    rows.append((f"submit of {args.test_images} test images (Python start included)",
                 f"{submit_s:.0f} s, {args.test_images / submit_s:.1f} images/s"))  # fmt: skip

    command = shlex.join(["python", "-m", "coco_multilabel.bench.scale", *args.argv])
    lines = [
        "# bench-scale: the pipeline at the challenge's size",
        "",
        f"`{command}` on {len(os.sched_getaffinity(0))} cores, {time.strftime('%Y-%m-%d')}; data: "
        f"{args.images} labelled + {args.test_images} test JPEGs of {args.size} in {root}"
        + (f" (generated in {made:.0f} s)" if made else " (already there)"),
        "",
        "| measure | value |",
        "| --- | ---: |",
        *[f"| {name} | {value} |" for name, value in rows],
        "",
    ]
    text = "\n".join(lines)
    write_text_atomic(args.out, text)
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--images", type=int, default=65_000, help="labelled images (default: the challenge's)"
    )
    parser.add_argument("--test-images", type=int, default=5_000)
    parser.add_argument("--size", default="640x480", help="JPEG width x height")
    parser.add_argument(
        "--data", default=str(DEFAULT_DATA), help="where the synthetic data root is made once"
    )
    parser.add_argument("--out", default="outputs/bench/scale.md")
    parser.add_argument(
        "--workers", type=int, default=len(os.sched_getaffinity(0)), help="generating processes"
    )
    parser.add_argument("override", nargs="*", help="train overrides, e.g. trainer=gpu backbone=resnet50")
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    print(bench(args))


if __name__ == "__main__":
    main()
