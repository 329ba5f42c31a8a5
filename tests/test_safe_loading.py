"""A checkpoint is data: crafted ones are refused by submit, predict, report and resume, and nothing runs."""

from __future__ import annotations

import builtins
import shutil
import subprocess
import sys

import pytest
import torch

from coco_multilabel.errors import UserError
from coco_multilabel.models.checkpoints import read_checkpoint
from coco_multilabel.models.registry import allowed, check_model_configs
from coco_multilabel.predict import predict
from coco_multilabel.reporting.report import report
from coco_multilabel.submit import submit
from coco_multilabel.train import train
from tests.helpers import ROOT


class Payload:
    """Pickled, it calls ``open(marker, "w")`` on load: creates the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.open, (self.marker, "w")


@pytest.fixture(scope="module")
def finished_run(tiny_root, tmp_path_factory):
    from tests.conftest import compose_tiny

    run_dir = tmp_path_factory.mktemp("finished")
    summary = train(compose_tiny(f"data.root={tiny_root}", f"run_dir={run_dir}"))
    return run_dir, summary


def crafted(kind: str, good: dict, folder, marker):
    """A run folder whose checkpoints are crafted: a pickle payload, or configs naming callables."""
    run = folder / kind
    shutil.copytree(good, run, ignore=shutil.ignore_patterns("*.ckpt", "report"))
    checkpoint = dict(torch.load(good / "checkpoints" / "last.ckpt", weights_only=True))
    hparams = dict(checkpoint["hyper_parameters"])
    if kind == "pickle":
        checkpoint["payload"] = Payload(marker)
    elif kind == "copyfile":
        hparams["backbone"] = {"_target_": "shutil.copyfile", "src": __file__, "dst": str(marker)}
    elif kind == "open":
        hparams["loss"] = {"_target_": "builtins.open", "file": str(marker), "mode": "w"}
    elif kind == "nested":
        hparams["backbone"] = {
            **hparams["backbone"],
            "name": {"_target_": "builtins.open", "file": str(marker)},
        }
    checkpoint["hyper_parameters"] = hparams
    for name in ("last.ckpt", "best.ckpt"):
        torch.save(checkpoint, run / "checkpoints" / name)
    return run


KINDS = {
    "pickle": "holds pickled objects",
    "copyfile": "'shutil.copyfile', which is not one of this project's backbone builders",
    "open": "'builtins.open', which is not one of this project's loss builders",
    "nested": "backbone.name is 'builtins.open'",
}


@pytest.mark.parametrize("kind", KINDS)
def test_crafted_checkpoints_are_refused_everywhere_and_nothing_runs(
    kind, finished_run, tiny_root, tmp_path, train_cfg
):
    good, _ = finished_run
    marker = tmp_path / "marker"
    run = crafted(kind, good, tmp_path, marker)
    ckpt = run / "checkpoints" / "best.ckpt"
    commands = {
        "submit": lambda: submit(str(ckpt), str(tiny_root), str(tmp_path / "sub.json"), image_size=32),
        "predict": lambda: predict(ckpt, tiny_root / "images" / "test"),
        "report": lambda: report(run, data_root=str(tiny_root), progress=False),
        "resume": lambda: train(train_cfg(f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", run_dir=run)),
    }
    for name, command in commands.items():
        with pytest.raises(UserError) as refused:
            command()
        message = str(refused.value)
        assert KINDS[kind] in message and str(run / "checkpoints") in message, (name, message)
        assert "\n" not in message, name
        assert not marker.exists(), f"{name} ran the {kind} payload"
    assert not (tmp_path / "sub.json").exists()


@pytest.mark.slow
def test_a_crafted_checkpoint_is_one_line_from_the_command_line(finished_run, tiny_root, tmp_path):
    good, _ = finished_run
    marker = tmp_path / "marker"
    ckpt = crafted("pickle", good, tmp_path, marker) / "checkpoints" / "best.ckpt"
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-m", "coco_multilabel.predict", str(ckpt), str(tiny_root / "images" / "test")],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "(GLOBAL io.open)" in done.stderr and not marker.exists()


def test_real_checkpoints_load_as_data_only(finished_run):
    good, summary = finished_run
    checkpoint = read_checkpoint(summary["best_checkpoint"])  # weights_only=True inside
    assert checkpoint["random_states"]["numpy"][0] == "MT19937"
    torch.load(good / "checkpoints" / "last.ckpt", weights_only=True)


def test_the_allowlist_is_the_project_and_torch_builders():
    assert allowed("backbone", "coco_multilabel.models.backbones.timm_backbone")
    assert allowed("optimizer", "torch.optim.RMSprop")
    assert allowed("scheduler", "torch.optim.lr_scheduler.StepLR")
    assert allowed("loss", "torch.nn.BCEWithLogitsLoss")
    assert allowed("loss", "coco_multilabel.models.losses.AsymmetricLoss")
    refused = [
        ("optimizer", "torch.optim.Optimizer.zero_grad"),
        ("loss", "torch.nn.Linear"),
        ("backbone", "torch.hub.load"),
        ("scheduler", "os.system"),
        ("optimizer", "torch.load"),
    ]
    for slot, target in refused:
        assert not allowed(slot, target), target
    with pytest.raises(UserError, match="optimizer._target_ is 'torch.hub.load'"):
        check_model_configs(
            {"backbone": {"_target_": "coco_multilabel.models.backbones.timm_backbone"},
             "optimizer": {"_target_": "torch.hub.load"}}, "this run"
        )  # fmt: skip
