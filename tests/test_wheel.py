"""The wheel installs anywhere: built from the sources, installed apart from the source tree
(without reinstalling torch), it trains, submits and evaluates from a folder of its own, with the
configs it carries (conf/, mapped into the package); and under Python 3.12, installed with its
dependencies into a virtual environment of its own, it does the same."""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from filelock import FileLock, Timeout

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


PIP = ["-m", "pip", "--disable-pip-version-check", "--no-input"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The project's wheel, built offline from a copy of the sources (pure Python: any 3.11-3.13)."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"  # a copy: building leaves build/ and *.egg-info beside the sources
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for package in ("coco_multilabel", "hydra_plugins", "conf"):  # hydra_plugins: the Slurm launcher
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run([sys.executable, *PIP, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"),
         str(source)], tmp, env)  # fmt: skip
    (built,) = (tmp / "dist").glob("coco_multilabel-*-py3-none-any.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> tuple[Path, dict]:
    """The package installed from its wheel into a folder of its own; the env that uses it."""
    site = tmp_path_factory.mktemp("site")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run([sys.executable, *PIP, "install", "--no-deps", "--target", str(site), str(wheel)], site, env)
    return site, {**env, "PYTHONPATH": str(site)}


def trains_submits_and_evaluates(python: list[str], scripts: Path, site: Path, env: dict, folder: Path):
    """From ``folder``, outside the sources: import the installed package, make data, train, submit,
    and score the submission with the ``coco-evaluate`` console script."""
    where = run([*python, "-c", "import coco_multilabel; print(coco_multilabel.__file__)"], folder, env)
    assert Path(where.strip()).is_relative_to(site), f"imported from {where}, not the installed wheel"
    configs = run(
        [*python, "-c", "from coco_multilabel.cli import CONFIG_DIR; print(CONFIG_DIR)"], folder, env
    )
    assert Path(configs.strip()) == Path(where.strip()).parent / "conf", "the configs are not the wheel's"
    assert (Path(configs.strip()) / "experiment" / "top_csra.yaml").is_file()

    run([*python, "-m", "coco_multilabel.data.synthetic", "data", "--n-train", "48", "--n-test", "8",
         "--size", "48"], folder, env)  # fmt: skip
    run([*python, "-m", "coco_multilabel.train", "data.root=data", "hydra.run.dir=run", *TINY], folder, env)
    assert (folder / "run" / "checkpoints" / "best.ckpt").is_file()
    run([*python, "-m", "coco_multilabel.submit", "ckpt_path=run/checkpoints/best.ckpt", "data.root=data",
         "output=submission.json", "data.num_workers=0"], folder, env)  # fmt: skip
    scores = run([str(scripts / "coco-evaluate"), "predictions=submission.json", "labels=data/labels/test"],
                 folder, env)  # fmt: skip
    assert "macro_f1" in scores
    assert not (folder / "conf").exists() and not list(folder.glob("*.egg-info"))


@pytest.mark.slow
def test_the_wheel_carries_the_configs_and_trains_submits_and_evaluates_elsewhere(installed, tmp_path):
    site, env = installed
    assert (site / "coco_multilabel" / "conf" / "experiment" / "top_csra.yaml").is_file()
    assert (site / "hydra_plugins" / "coco_multilabel_submitit" / "__init__.py").is_file()
    python = [sys.executable, "-P"]  # -P: the working directory is not on the path either
    trains_submits_and_evaluates(python, site / "bin", site, env, tmp_path)


def test_pyproject_lists_every_package_of_the_sources():
    """pyproject.toml lists the packages by hand (find cannot see conf/, mapped into the package):
    a package of the sources left out of that list would be missing from the wheel alone."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for root in ("coco_multilabel", "hydra_plugins")
        for init in (ROOT / root).rglob("__init__.py")
    }
    namespaces = {"hydra_plugins"}  # no __init__.py: Hydra's plugins of every distribution share it
    assert set(setuptools["packages"]) == packages | namespaces | set(setuptools["package-dir"])


def find_python(version: str) -> str | None:
    """An interpreter of ``version`` that runs: ``python3.12`` on the PATH, else pyenv's (its shim
    runs only where that version is selected, its own binary always)."""
    pyenv = Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv")
    pyenvs = sorted(glob.glob(f"{pyenv}/versions/{version}.*/bin/python{version}"), reverse=True)
    candidates = [shutil.which(f"python{version}"), *pyenvs]
    check = f"import sys; sys.exit(sys.version_info[:2] != {tuple(map(int, version.split('.')))})"
    for candidate in filter(None, candidates):
        if subprocess.run([candidate, "-c", check], capture_output=True).returncode == 0:
            return candidate
    return None


def dependencies_venv(python: str, wheel: Path) -> Path:
    """A virtual environment of ``python`` with the wheel and its dependencies installed by pip, as a
    user installs them. Kept in ``$XDG_CACHE_HOME/coco-multilabel/test-venvs/``, one per Python, named
    by the hash of the dependencies pyproject.toml lists (its torch alone is 6 GB, minutes to install):
    a later run finds it and only reinstalls the wheel. A new one replaces the others of its Python,
    so edits to the dependencies do not pile up venvs on the disk."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    dependencies = "\n".join([project["requires-python"], *project["dependencies"]]).encode()
    key = hashlib.sha256(dependencies + python.encode()).hexdigest()[:12]
    cache = (
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "coco-multilabel" / "test-venvs"
    )
    prefix = f"python{Path(python).name.removeprefix('python')}-"
    venv = cache / f"{prefix}{key}"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYENV_VERSION")}
    pip = [str(venv / "bin" / "python"), *PIP, "install", "--quiet"]
    cache.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{venv}.lock"):  # test runs side by side: one builds it, the other waits
        if not (venv / "complete").exists():  # new, or left half-made by a killed run
            for stale in (path for path in cache.glob(f"{prefix}*") if path.is_dir() and path != venv):
                try:
                    with FileLock(f"{stale}.lock", timeout=0):
                        shutil.rmtree(stale, ignore_errors=True)
                except Timeout:  # a run of another checkout is building or updating it: leave it
                    pass
            shutil.rmtree(venv, ignore_errors=True)
            run([python, "-m", "venv", str(venv)], cache, env)
            run([*pip, str(wheel)], cache, env)
            (venv / "complete").touch()
        run([*pip, "--no-deps", "--force-reinstall", str(wheel)], cache, env)
    return venv


@pytest.mark.slow
def test_a_non_editable_install_under_python_3_12_trains_and_submits_elsewhere(wheel, tmp_path):
    """pip installs the wheel with its dependencies into a Python 3.12 virtual environment (torch
    from PyPI: about 5 minutes the first time here); from another folder it trains, submits and
    evaluates, and runs make gpu-check's script (--smoke). Skipped, saying so, where no Python 3.12
    is found."""
    python = find_python("3.12")
    if python is None:
        pytest.skip("no Python 3.12 found (python3.12 on PATH or pyenv's): the 3.12 install is not checked")
    venv = dependencies_venv(python, wheel)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYENV_VERSION")}
    python = str(venv / "bin" / "python")
    where = "import sys, sysconfig; print(sys.version_info[:2], sysconfig.get_path('purelib'))"
    version, site = run([python, "-c", where], tmp_path, env).strip().split(") ")
    assert version == "(3, 12"
    trains_submits_and_evaluates([python, "-P"], venv / "bin", Path(site), env, tmp_path)
    # make gpu-check's script, with the defaults it runs on a GPU, on CPU at tiny sizes (--smoke)
    run([python, "-P", "-m", "coco_multilabel.bench.gpu_check", "--smoke", "--out", "bench", "--work", "gpu"],
        tmp_path, env)  # fmt: skip
    assert "| total | 0 failed |" in (tmp_path / "bench" / "gpu.md").read_text()
