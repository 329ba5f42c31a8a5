"""The wheel installs anywhere: built from the sources, installed apart from the source tree
(without reinstalling torch), it trains, submits and evaluates from a folder of its own."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY = (
    "~experiment backbone=mobilenet_v3_small backbone.weights=null data.image_size=32 data.batch_size=16 "
    "data.num_workers=0 data.val_fraction=0.25 trainer.max_epochs=1 trainer.accelerator=cpu "
    "trainer.enable_progress_bar=false callbacks.progress_bar=null logger=csv"
).split()


def run(args: list[str], cwd: Path, env: dict) -> str:
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{' '.join(map(str, args))}\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, dict]:
    """The package installed from its wheel into a folder of its own; the env that uses it."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"  # a copy: building leaves build/ and *.egg-info beside the sources
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for package in ("coco_multilabel", "hydra_plugins"):  # hydra_plugins: the Slurm launcher
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"), str(source)], tmp, env)
    (wheel,) = (tmp / "dist").glob("coco_multilabel-*.whl")
    run([*pip, "install", "--no-deps", "--target", str(tmp / "site"), str(wheel)], tmp, env)
    return tmp / "site", {**env, "PYTHONPATH": str(tmp / "site")}


def test_the_wheel_carries_the_configs_and_trains_submits_and_evaluates_elsewhere(installed, tmp_path):
    site, env = installed
    assert (site / "coco_multilabel" / "conf" / "experiment" / "top_csra.yaml").is_file()
    assert (site / "hydra_plugins" / "coco_multilabel_submitit" / "__init__.py").is_file()
    python = [sys.executable, "-P"]  # -P: the working directory is not on the path either
    where = run([*python, "-c", "import coco_multilabel; print(coco_multilabel.__file__)"], tmp_path, env)
    assert Path(where.strip()).is_relative_to(site), f"imported from {where}, not the installed wheel"

    run([*python, "-m", "coco_multilabel.data.synthetic", "data", "--n-train", "48", "--n-test", "8",
         "--size", "48"], tmp_path, env)  # fmt: skip
    run([*python, "-m", "coco_multilabel.train", "data.root=data", "hydra.run.dir=run", *TINY], tmp_path, env)
    assert (tmp_path / "run" / "checkpoints" / "best.ckpt").is_file()
    run([*python, "-m", "coco_multilabel.submit", "ckpt_path=run/checkpoints/best.ckpt", "data.root=data",
         "output=submission.json", "data.num_workers=0"], tmp_path, env)  # fmt: skip
    evaluate = site / "bin" / "coco-evaluate"  # the console script
    scores = run([str(evaluate), "predictions=submission.json", "labels=data/labels/test"], tmp_path, env)
    assert "macro_f1" in scores
    assert not (tmp_path / "conf").exists() and not list(tmp_path.glob("*.egg-info"))
