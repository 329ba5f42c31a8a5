"""``make bench``: how fast the data path, the feature cache, the default recipe and submit are.

Measured on a real data root (default ``../shared/coco-dev``); ratios are taken within one run,
since these machines are noisy. Prints one table and writes it to ``outputs/bench/bench.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from coco_multilabel.bench.loader import loader_table
from coco_multilabel.cli import CONFIG_DIR
from coco_multilabel.data.datamodule import CocoDataModule
from coco_multilabel.io import write_text_atomic
from coco_multilabel.models import MultiLabelClassifier
from coco_multilabel.models.checkpoints import read_checkpoint
from coco_multilabel.training.cache_build import build_here
from coco_multilabel.training.schedule import phases_from_config, top_stages_of

PLAIN = "experiment=plain"  # throughput of plain fine-tuning (the default recipe starts frozen)
GLIBC_TUNABLES = "glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=17179869184"


def config(root: str, *overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=[f"data.root={root}", "callbacks.progress_bar=null", *overrides])


def datamodule(cfg, **overrides) -> CocoDataModule:
    return instantiate(cfg.data, **overrides, _convert_="all")


def build(cfg) -> tuple[MultiLabelClassifier, torch.optim.Optimizer]:
    """The recipe's model in its first phase, and that phase's optimizer (no schedule: it needs a
    Trainer, and steps are few here)."""
    phases = phases_from_config(cfg.schedule)
    model = MultiLabelClassifier(
        backbone=cfg.backbone, optimizer=cfg.optimizer, scheduler=None, loss=cfg.get("loss"),
        **{**cfg.model, "top_stages": top_stages_of(cfg.model.get("top_stages"), phases)},
    )  # fmt: skip
    model.set_phase(phases[0])
    return model, model.configure_optimizers()


def train_steps(model, batches, optimizer) -> float:
    """Images per second of optimizer steps over ``batches`` (the DataModule's, or ``{images, targets}``)."""
    model.train()
    start = time.perf_counter()
    count = 0
    for batch in batches:
        inputs = {key: batch[key] for key in ("images", "features") if key in batch}
        loss = model.criterion(model(**inputs), batch["targets"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        count += len(batch["targets"])
    return count / (time.perf_counter() - start)


def model_step_rate(cfg, steps: int) -> float:
    """Training images/s of the model alone, on a batch already in memory."""
    model, optimizer = build(cfg)
    size, batch = cfg.data.image_size, cfg.data.batch_size
    x, y = torch.randn(batch, 3, size, size), (torch.rand(batch, 80) < 0.05).float()
    train_steps(model, [{"images": x, "targets": y}] * 2, optimizer)  # warm-up
    return train_steps(model, [{"images": x, "targets": y}] * steps, optimizer)


def compile_speedup(cfg, steps: int) -> tuple[float, float]:
    """Model-alone training images/s compiled (``model.compile``) over eager, and the seconds the
    compiled model's first steps took (the compiling)."""
    rates, warmups = {}, {}
    for mode in ("eager", "compiled"):
        torch.manual_seed(0)
        model, optimizer = build(cfg)
        size, batch = cfg.data.image_size, cfg.data.batch_size
        x, y = torch.randn(batch, 3, size, size), (torch.rand(batch, 80) < 0.05).float()
        start = time.perf_counter()
        if mode == "compiled":
            model.compile()
        train_steps(model, [{"images": x, "targets": y}] * 2, optimizer)  # warm-up; compiles
        warmups[mode] = time.perf_counter() - start
        rates[mode] = train_steps(model, [{"images": x, "targets": y}] * steps, optimizer)
    return rates["compiled"] / rates["eager"], warmups["compiled"]


def pipeline_rate(cfg, steps: int) -> float:
    """Training images/s from files: decode, augment, collate, step."""
    model, optimizer = build(cfg)
    images = datamodule(cfg)
    images.setup("fit")
    loader = iter(images.train_dataloader())
    train_steps(model, [next(loader) for _ in range(2)], optimizer)  # warm-up, workers started
    return train_steps(model, (next(loader) for _ in range(steps)), optimizer)


def frozen_epochs(cfg, cache_dir: Path) -> dict:
    """One epoch of a frozen backbone's head: features computed on the fly versus from the cache."""
    model, optimizer = build(cfg)  # a frozen backbone: the optimizer holds the head only
    images = datamodule(cfg, augment=False)
    images.setup("fit")
    start = time.perf_counter()
    train_steps(model, images.train_dataloader(), optimizer)
    on_the_fly = time.perf_counter() - start
    cached = datamodule(cfg, cache_dir=str(cache_dir))
    start = time.perf_counter()
    cached.serve(build_here(model, cached))
    build_time = time.perf_counter() - start
    start = time.perf_counter()
    train_steps(model, cached.train_dataloader(), optimizer)
    from_cache = time.perf_counter() - start
    return {"on_the_fly_s": on_the_fly, "cached_s": from_cache, "cache_build_s": build_time}


def inference_modes(cfg) -> list[dict]:
    """Eval images/s per memory format and precision, and how far their probabilities move."""
    model = build(cfg)[0].eval()
    x = torch.randn(32, 3, cfg.data.image_size, cfg.data.image_size)
    rows, reference = [], None
    for name, channels_last, dtype in (("fp32", False, None), ("fp32 channels_last", True, None),
                                       ("bf16 channels_last", True, torch.bfloat16)):  # fmt: skip
        model.hparams.channels_last = channels_last
        model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            model(images=x)
            start = time.perf_counter()
            probs = torch.cat([model(images=x).float().sigmoid() for _ in range(3)])
        rate = 3 * len(x) / (time.perf_counter() - start)
        reference = probs if reference is None else reference
        rows.append(
            {"mode": name, "images_per_s": rate, "max_prob_change": float((probs - reference).abs().max())}
        )
    return rows


def with_eval_precision(ckpt_path: str | Path, precision: str, folder: Path) -> Path:
    """A copy of a checkpoint that evaluates at ``precision`` (``model.eval_precision``)."""
    checkpoint = read_checkpoint(ckpt_path)
    checkpoint["hyper_parameters"]["eval_precision"] = precision
    path = folder / f"eval_{precision}.ckpt"
    torch.save(checkpoint, path)
    return path


def model_inference_rate(ckpt_path: str | Path, batch_size: int = 32, batches: int = 3) -> float:
    """Eval images/s of the model alone at the checkpoint's size and views (flip TTA as validated),
    on a uint8 batch already in memory: what submit could reach if reading images cost nothing."""
    from coco_multilabel.models.checkpoints import load_model, read_checkpoint
    from coco_multilabel.models.inference import checkpoint_image_size

    checkpoint = read_checkpoint(ckpt_path)
    model = load_model(checkpoint).to("cuda" if torch.cuda.is_available() else "cpu")
    size = checkpoint_image_size(checkpoint)
    x = torch.randint(0, 256, (batch_size, 3, size, size), dtype=torch.uint8, device=model.device)
    with torch.no_grad():
        model.probabilities({"images": x})  # warm-up
        _sync()
        start = time.perf_counter()
        for _ in range(batches):
            model.probabilities({"images": x})
        _sync()
    return batches * batch_size / (time.perf_counter() - start)


def submit_rates(
    ckpt_path: str | Path, root: str, out: Path, batch_size: int = 32, batches: int = 3, num_workers=None
) -> list:
    """Per eval precision (fp32, bf16): the model-only eval rate and submit's end to end (files,
    decode in workers, JSON), in images/s, and their ratio (target >= 0.9)."""
    from coco_multilabel.models.inference import checkpoint_image_size
    from coco_multilabel.submit import submit

    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for precision in ("32", "bf16"):
        ckpt = with_eval_precision(ckpt_path, precision, out)
        model_only = model_inference_rate(ckpt, batch_size, batches)
        start = time.perf_counter()
        path = submit(str(ckpt), root, str(out / f"submission_{precision}.json"), batch_size=batch_size,
                      num_workers=num_workers, progress_bar=False)  # fmt: skip
        n_test = len(json.loads(path.read_text()))
        end_to_end = n_test / (time.perf_counter() - start)
        checkpoint = read_checkpoint(ckpt)
        views = f"{checkpoint_image_size(checkpoint)} px" + (
            ", flip TTA" if checkpoint["hyper_parameters"].get("tta") else ""
        )
        rows.append({"precision": "fp32" if precision == "32" else precision, "model_only": model_only,
                     "submit": end_to_end, "ratio": end_to_end / model_only, "images": n_test,
                     "views": views})  # fmt: skip
    return rows


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def allocator_ratio(root: str, image_size: int) -> float:
    """Model-only training speed with GLIBC_TUNABLES set, over without (fresh processes)."""
    rates = []
    for tunables in (None, GLIBC_TUNABLES):
        env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
        if tunables:
            env["GLIBC_TUNABLES"] = tunables
        out = subprocess.run(
            [sys.executable, "-m", "coco_multilabel.bench.speed", "--data", root, "--only-model-step",
             "--image-size", str(image_size)],
            env=env, capture_output=True, text=True, check=True,
        )  # fmt: skip
        rates.append(float(out.stdout.strip().splitlines()[-1]))
    return rates[1] / rates[0]


def recipe(root: str, minutes: float, run_dir: Path, *overrides: str) -> dict:
    """The default recipe (embedded backbone), changed by ``overrides``, within a wall-clock budget."""
    from coco_multilabel.train import train

    seconds = int(minutes * 60)
    budget = f"00:{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"  # DD:HH:MM:SS
    cfg = config(root, f"run_dir={run_dir}", f"trainer.max_time={budget}", *overrides)
    start = time.perf_counter()
    summary = train(cfg)
    wall = time.perf_counter() - start
    best = {k.removeprefix("val/"): v for k, v in summary.items() if k.startswith("val/")}  # best epoch
    peak = (
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        + resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    )
    return {"summary": summary, "wall_s": wall, "peak_rss_gib": peak / 2**20, "best": best}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/coco-dev")
    parser.add_argument("--out", default="outputs/bench")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=10, help="training steps per throughput figure")
    parser.add_argument("--budget-minutes", type=float, default=15.0, help="the default recipe's budget")
    parser.add_argument("--loader-images", type=int, default=300, help="photos per loader measurement")
    parser.add_argument("--loader-only", action="store_true", help="only the loader table (a minute)")
    parser.add_argument("--only-model-step", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.manual_seed(0)
    size = f"data.image_size={args.image_size}"
    if args.only_model_step:
        print(model_step_rate(config(args.data, size, PLAIN), args.steps))
        return
    out = Path(args.out)
    command = " ".join(["python -m coco_multilabel.bench.speed", *sys.argv[1:]])
    header = f"`{command}` on {os.cpu_count()} CPUs, torch {torch.__version__}\n\n"
    loader = "## What one loader worker delivers\n\n" + loader_table(args.data, args.loader_images)
    print(loader, flush=True)
    if args.loader_only:
        path = write_text_atomic(out / "loader.md", "# make bench: the loader\n\n" + header + loader)
        print(f"written to {path}")
        return
    rows = []

    def add(what, value, note=""):
        rows.append((what, value, note))
        print(f"{what:<58} {value:>12}  {note}", flush=True)

    finetune = config(args.data, size, PLAIN)
    model_only = model_step_rate(finetune, args.steps)
    pipeline = pipeline_rate(finetune, args.steps)
    add("1. train step, model alone (images/s)", f"{model_only:.1f}", f"{args.image_size} px, fine-tuning")
    add("   train step, files -> decode -> augment -> step", f"{pipeline:.1f}")
    add("   pipeline efficiency", f"{pipeline / model_only:.2f}", "target >= 0.9")
    add("   GLIBC_TUNABLES speed-up (model alone)", f"{allocator_ratio(args.data, args.image_size):.2f}x")
    speedup, compiling = compile_speedup(finetune, args.steps)
    add("   torch.compile speed-up (model alone)", f"{speedup:.2f}x", f"compiling took {compiling:.0f} s")
    for row in inference_modes(finetune):
        add(f"   eval {row['mode']} (images/s)", f"{row['images_per_s']:.1f}",
            f"max prob change {row['max_prob_change']:.1e}")  # fmt: skip
    frozen = frozen_epochs(config(args.data, size, PLAIN, "schedule=probe"), out / "cache")
    add("2. frozen-backbone epoch, on the fly (s)", f"{frozen['on_the_fly_s']:.1f}")
    add("   frozen-backbone epoch, from the feature cache (s)", f"{frozen['cached_s']:.2f}")
    add("   cache speed-up", f"{frozen['on_the_fly_s'] / frozen['cached_s']:.0f}x", "target >= 20x")
    add("   cache build, once (s)", f"{frozen['cache_build_s']:.1f}", "with flipped copies")
    run = recipe(args.data, args.budget_minutes, out / "recipe")
    best = run["best"]
    nan = float("nan")
    add(f"3. default recipe, {args.budget_minutes:g} min budget: val macro F1 tuned",
        f"{best.get('macro_f1_tuned', nan):.3f}", f"at 0.5: {best.get('macro_f1', nan):.3f}")  # fmt: skip
    add("   val macro F1 cross-fitted", f"{best.get('macro_f1_xfit', nan):.3f}")
    add("   val mAP", f"{best.get('map', nan):.3f}")
    add("   wall time (s)", f"{run['wall_s']:.0f}", f"{run['summary']['epochs']} epochs")
    add("   peak memory (GiB)", f"{run['peak_rss_gib']:.1f}", "this process + workers")
    for i, row in enumerate(submit_rates(run["summary"]["best_checkpoint"], args.data, out / "submit")):
        add(f"{'4.' if not i else '  '} eval {row['precision']}, model alone (images/s)",
            f"{row['model_only']:.1f}", f"the recipe's size and views: {row['views']}")  # fmt: skip
        add(f"   submit {row['precision']}, {row['images']} test images end to end (images/s)",
            f"{row['submit']:.1f}", f"{row['ratio']:.2f}x model alone, target >= 0.9")  # fmt: skip
    table = [
        "| measurement | value | note |",
        "| --- | ---: | --- |",
        *(f"| {a} | {b} | {c} |" for a, b, c in rows),
    ]
    text = "# make bench\n\n" + header + "\n".join(table) + "\n\n" + loader
    print(f"written to {write_text_atomic(out / 'bench.md', text)}")


if __name__ == "__main__":
    main()
