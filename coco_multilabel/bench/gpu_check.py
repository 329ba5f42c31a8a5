"""``make gpu-check``: the GPU paths, run for real on a GPU machine in about 10 minutes.

On its own synthetic images (``data/synthetic.py``, the demo's generator): the default recipe
trained and submitted on one GPU; training throughput of the model alone (one uint8 batch kept in
memory) against the full pipeline from JPEG files (decode in workers, copy as uint8, normalise on
the GPU) for ResNet-50 at 224 px and EfficientNet-Lite0 at 384 px, and the GPU recipe
(``experiment=finetune_384_asl_ema``, ConvNeXt-T at 384 px) compiled and eager; submit's end-to-end rate
against the model's own eval rate, fp32 and bf16; a 2-job multirun on the device pool; and a 2-GPU
DDP run when two GPUs are there. Every run takes the defaults a GPU user gets: precision, device and
loader workers by the machine. Writes ``outputs/bench/gpu.md``. ``--smoke``: the same on CPU at
tiny sizes, in a minute or two (the test of this script).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from torch.utils.data import DataLoader, Dataset

from coco_multilabel.bench.speed import build, config, submit_rates
from coco_multilabel.data.synthetic import make_dataset
from coco_multilabel.io import write_text_atomic

PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # subprocesses import this source tree
QUIET = ["logger=csv", "callbacks.progress_bar=null", "trainer.enable_progress_bar=false",
         "trainer.enable_model_summary=false"]  # fmt: skip


@dataclass
class Sizes:
    """How big each check is: the GPU's, or the smoke test's on CPU."""

    n_train: int
    n_test: int
    image_px: int
    device: list[str]  # trainer overrides of a one-device run
    recipe: list[str]  # overrides of the default recipe's runs
    throughput: list[tuple[str, list[str]]]  # (name, overrides) of each throughput row
    steps: int
    warmup: int
    eval_batch: int
    accelerator: str
    submit: list[str] = field(default_factory=list)  # overrides of submit
    workers: int | None = None  # submit's DataLoader workers (None: one per core)


# the GPU recipe with ConvNeXt-T's random weights: a GPU machine may have no network
GPU_RECIPE = ["experiment=finetune_384_asl_ema", "backbone=timm", "backbone.pretrained=false"]
GPU = Sizes(  # the defaults: precision, workers and device by the machine, no trainer=gpu
    n_train=1600, n_test=400, image_px=480, device=[], recipe=["data.batch_size=64"],
    throughput=[
        ("ResNet-50 @ 224", ["backbone=resnet50", "backbone.weights=null", "data.image_size=224",
                             "data.batch_size=128"]),
        ("Lite0 @ 384", ["backbone=efficientnet_lite0", "data.image_size=384", "data.batch_size=64"]),
        ("GPU recipe, ConvNeXt-T @ 384, compiled", GPU_RECIPE),
        ("GPU recipe, ConvNeXt-T @ 384, eager", [*GPU_RECIPE, "model.compile=false"]),
    ],
    steps=30, warmup=5, eval_batch=64, accelerator="gpu",
)  # fmt: skip
SMOKE = Sizes(
    n_train=40, n_test=8, image_px=48, device=["trainer=cpu"],
    recipe=["data.image_size=64", "data.batch_size=8", "data.num_workers=0", "schedule.top.epochs=1"],
    throughput=[("MobileNetV3-S @ 32 (smoke)", ["backbone=mobilenet_v3_small", "backbone.weights=null",
                 "data.image_size=32", "data.batch_size=4", "data.num_workers=0"]),
                ("GPU recipe @ 32, eager (smoke)", [*GPU_RECIPE, "model.compile=false", "data.image_size=32",
                 "data.batch_size=4", "data.num_workers=0"])],
    steps=2, warmup=1, eval_batch=4, accelerator="cpu", submit=["data.num_workers=0"], workers=0,
)  # fmt: skip


class Table:
    def __init__(self):
        self.rows: list[tuple[str, str, str, str]] = []
        self.failed = 0

    def add(self, check: str, result: str, wall: float | None = None, note: str = "") -> None:
        self.rows.append((check, result, "" if wall is None else f"{wall:.0f}", note))
        print(f"{check:<52} {result:>14} {'' if wall is None else f'{wall:6.0f} s'}  {note}", flush=True)

    def markdown(self) -> str:
        lines = ["| check | result | wall (s) | note |", "| --- | ---: | ---: | --- |"]
        return "\n".join([*lines, *(f"| {' | '.join(row)} |" for row in self.rows)])


def cli(module: str, *args: str, cwd: Path) -> tuple[subprocess.CompletedProcess, float]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(PACKAGE_ROOT), os.environ.get("PYTHONPATH")])),
    }
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True
    )
    return done, time.perf_counter() - start


def failure(done: subprocess.CompletedProcess) -> str:
    lines = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    return (errors or lines or ["(no output)"])[-1][:200]


class Rate(L.Callback):
    """Training images/s after ``warmup`` batches, the GPU synchronised at both ends."""

    def __init__(self, warmup: int):
        self.warmup, self.images, self.start, self.rate = warmup, 0, None, float("nan")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.warmup:
            _sync()
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx >= self.warmup:
            self.images += len(batch["targets"])

    def on_train_epoch_end(self, trainer, pl_module):
        _sync()
        if self.start is not None:
            self.rate = self.images / (time.perf_counter() - self.start)


class OneBatch(Dataset):
    """The same collated uint8 batch ``n`` times: the model's speed with reading taken away."""

    def __init__(self, batch, n: int):
        self.batch, self.n = batch, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.batch


def train_rates(root: Path, overrides: list[str], sizes: Sizes) -> tuple[float, float]:
    """(model alone, full pipeline) training images/s of fine-tuning everything, same Trainer settings;
    the plain recipe unless ``overrides`` name another experiment."""
    plain = [] if any(o.startswith("experiment=") for o in overrides) else ["experiment=plain"]
    cfg = config(str(root), *plain, "scheduler=none", *sizes.device, *overrides, *QUIET)
    data = instantiate(cfg.data, split_file=None, _convert_="all")
    data.setup("fit")
    n = sizes.warmup + sizes.steps
    rates = []
    for source in ("model", "pipeline"):
        model = build(cfg)[0]
        rate = Rate(sizes.warmup)
        trainer = L.Trainer(
            accelerator=sizes.accelerator, devices=1, precision=cfg.trainer.precision, max_epochs=1,
            limit_train_batches=n, limit_val_batches=0, num_sanity_val_steps=0, logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            callbacks=[rate],
        )  # fmt: skip
        if source == "model":
            batch = next(iter(data.train_dataloader()))
            one = {"images": batch["images"], "targets": batch["targets"]}
            loader = DataLoader(OneBatch(one, n), batch_size=None, pin_memory=sizes.accelerator == "gpu")
            trainer.fit(model, train_dataloaders=loader)
        else:
            trainer.fit(model, datamodule=data)  # its own hooks: what training does
        rates.append(rate.rate)
    return rates[0], rates[1]


def check_recipe(table: Table, root: Path, work: Path, sizes: Sizes) -> Path | None:
    run = work / "train"
    common = [f"data.root={root}", f"data.cache_dir={work / 'cache'}", *sizes.device, *sizes.recipe, *QUIET]
    done, wall = cli("coco_multilabel.train", *common, f"hydra.run.dir={run}", cwd=work)
    if done.returncode:
        table.failed += 1
        table.add("default recipe, train on one device", f"failed ({done.returncode})", wall, failure(done))
        return None
    result = json.loads((run / "result.json").read_text())
    f1 = result.get("val/macro_f1_xfit", float("nan"))
    table.add("default recipe, train on one device", f"F1 {f1:.3f}", wall,
              f"{result.get('epochs')} epochs, cache built, cross-fitted val macro F1")  # fmt: skip
    ckpt = run / "checkpoints" / "best.ckpt"
    args = [f"ckpt_path={ckpt}", f"data.root={root}", f"output={work / 'submission.json'}"]
    done, wall = cli(
        "coco_multilabel.submit", *args, f"accelerator={sizes.accelerator}", *sizes.submit, cwd=work
    )
    if done.returncode:
        table.failed += 1
        table.add("default recipe, submit", f"failed ({done.returncode})", wall, failure(done))
        return ckpt
    n_test = len(json.loads((work / "submission.json").read_text()))
    table.add(
        "default recipe, submit",
        f"{n_test / wall:.1f} img/s",
        wall,
        f"{n_test} images, process start included",
    )
    return ckpt


def check_submit_speed(table: Table, ckpt: Path, root: Path, work: Path, sizes: Sizes) -> None:
    rows = submit_rates(
        ckpt, str(root), work / "submit", sizes.eval_batch, batches=3, num_workers=sizes.workers
    )
    for row in rows:
        note = f"submit {row['submit']:.1f} vs model alone {row['model_only']:.1f} img/s, {row['views']}"
        table.add(f"eval {row['precision']}: submit vs model alone", f"{row['ratio']:.2f}x", note=note)


def check_multirun(table: Table, root: Path, work: Path, sizes: Sizes) -> None:
    sweep = work / "multirun"
    args = [f"data.root={root}", f"data.cache_dir={work / 'cache'}", *sizes.device, *sizes.recipe, *QUIET,
            "schedule.top.epochs=2", "seed=0,1", f"hydra.sweep.dir={sweep}", "-m"]  # fmt: skip
    done, wall = cli("coco_multilabel.train", *args, cwd=work)
    rows = list(csv.DictReader((sweep / "summary.csv").open())) if (sweep / "summary.csv").exists() else []
    statuses = [r.get("status", "?") for r in rows]
    devices = sorted({r.get("device") or "cpu" for r in rows})
    ok = done.returncode == 0 and statuses.count("done") == 2
    table.failed += not ok
    table.add("2-job multirun on the device pool", "2 done" if ok else f"failed ({done.returncode})", wall,
              f"devices {', '.join(devices)}" if ok else failure(done))  # fmt: skip


def check_ddp(table: Table, root: Path, work: Path, sizes: Sizes) -> None:
    gpus = torch.cuda.device_count()
    if sizes.accelerator != "gpu" or gpus < 2:
        table.add("2-GPU DDP run", "skipped", note=f"{gpus} GPU(s) here")
        return
    run = work / "ddp"
    args = [f"data.root={root}", f"data.cache_dir={work / 'cache'}", "trainer=ddp", "trainer.devices=2",
            *sizes.recipe, *QUIET, "schedule.top.epochs=2", f"hydra.run.dir={run}"]  # fmt: skip
    done, wall = cli("coco_multilabel.train", *args, cwd=work)
    ok = done.returncode == 0 and json.loads((run / "result.json").read_text()).get("status") == "done"
    table.failed += not ok
    table.add(
        "2-GPU DDP run", "done" if ok else f"failed ({done.returncode})", wall, "" if ok else failure(done)
    )


def run_checks(out: Path, work: Path, sizes: Sizes) -> tuple[Path, int]:
    """Every check, each on its own so one failure does not hide the others; ``(gpu.md, failures)``."""
    start = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    table = Table()
    root = work / "data"
    if not (root / "images" / "test").is_dir():
        t = time.perf_counter()
        make_dataset(root, n_train=sizes.n_train, n_test=sizes.n_test, size=sizes.image_px)
        table.add("synthetic images", f"{sizes.n_train} + {sizes.n_test}", time.perf_counter() - t,
                  f"{sizes.image_px} px JPEGs, challenge layout")  # fmt: skip
    ckpt = check_recipe(table, root, work, sizes)
    if ckpt is not None and ckpt.is_file():
        check_submit_speed(table, ckpt, root, work, sizes)
    for name, overrides in sizes.throughput:
        t = time.perf_counter()
        try:
            model_only, pipeline = train_rates(root, overrides, sizes)
        except Exception as err:  # noqa: BLE001 - a row of the table says what failed
            table.failed += 1
            table.add(
                f"train throughput, {name}", "failed", time.perf_counter() - t, f"{type(err).__name__}: {err}"
            )
            continue
        note = f"pipeline {pipeline:.1f} vs model alone {model_only:.1f} img/s, target >= 0.9"
        table.add(f"train throughput, {name}", f"{pipeline / model_only:.2f}x", time.perf_counter() - t, note)
    check_multirun(table, root, work, sizes)
    check_ddp(table, root, work, sizes)
    total = time.perf_counter() - start
    table.add("total", f"{table.failed} failed", total, "target <= 600 s on a GPU machine")
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    command = " ".join(["python -m coco_multilabel.bench.gpu_check", *sys.argv[1:]])
    header = (
        f"# make gpu-check\n\n`{command}` on {device} x {torch.cuda.device_count()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, Lightning {L.__version__}, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC\n\n"
    )
    return write_text_atomic(out / "gpu.md", header + table.markdown() + "\n"), table.failed


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/bench", help="where gpu.md goes")
    parser.add_argument("--work", default="outputs/gpu-check", help="its synthetic data and runs")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on CPU: checks the script itself")
    args = parser.parse_args(argv)
    sizes = SMOKE if args.smoke else GPU
    if not args.smoke and not torch.cuda.is_available():
        sys.exit(
            "error: make gpu-check needs a GPU (torch.cuda.is_available() is False); --smoke runs it on CPU"
        )
    path, failed = run_checks(Path(args.out).resolve(), Path(args.work).resolve(), sizes)
    print(f"written to {path}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
