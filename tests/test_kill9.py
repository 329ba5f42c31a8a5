"""kill -9 at several moments of train, submit, report and make data: every file a later command
reads is complete or absent, and the next run continues."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile

import pytest
import torch
from omegaconf import OmegaConf

from tests.conftest import tiny
from tests.helpers import ROOT

# Runs ``module`` as ``python -m`` would, SIGKILLed at the n-th call of ``attr`` (os.fsync: the
# moment a file's new bytes are written but not yet renamed into place; shutil.copyfileobj: a file
# of the archive being unpacked).
KILLER = """
import importlib, os, runpy, signal, sys
owner, attr, n = sys.argv[1].rpartition(".")[0], sys.argv[1].rpartition(".")[2], int(sys.argv[2])
owner = importlib.import_module(owner)
real, calls = getattr(owner, attr), [0]
def killing(*args, **kwargs):
    calls[0] += 1
    if calls[0] == n:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args, **kwargs)
setattr(owner, attr, killing)
sys.argv = [sys.argv[3], *sys.argv[4:]]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


def run(module: str, *args: str, cwd, kill_at: tuple[str, int] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = ["-c", KILLER, kill_at[0], str(kill_at[1])] if kill_at else []
    return subprocess.run(
        [sys.executable, *command, *(["-m"] if not kill_at else []), module, *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def assert_complete_or_absent(folder) -> list[str]:
    """Every file a command reads parses whole; temporary files (``.*.tmp``) are read by none."""
    checked = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        if any(part.startswith(".") and part.endswith(".tmp") for part in path.parts):
            continue
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix in (".ckpt", ".pt"):
            torch.load(path, weights_only=True)
        elif path.suffix == ".html":
            assert path.read_text().endswith("</html>\n"), path
        elif path.suffix == ".png":
            assert path.read_bytes().endswith(b"IEND\xaeB`\x82"), path
        elif path.suffix == ".yaml":
            OmegaConf.load(path)
        checked.append(path.name)
    return checked


@pytest.mark.slow
def test_train_submit_and_report_killed_at_several_moments(tiny_root, tmp_path):
    run_dir = tmp_path / "run"
    train = [*tiny(f"data.root={tiny_root}", "trainer.max_epochs=2"), f"hydra.run.dir={run_dir}"]
    for moment in (1, 5, 9):  # result.json "running"; best.ckpt, then last.ckpt of epoch 1, mid-write
        killed = run("coco_multilabel.train", *train, cwd=tmp_path, kill_at=("os.fsync", moment))
        assert killed.returncode == -9, killed.stderr[-2000:]
        assert_complete_or_absent(run_dir)
    last = run_dir / "checkpoints" / "last.ckpt"
    assert last.is_file(), "the last kill came after the first epoch's last.ckpt"
    again = run("coco_multilabel.train", *tiny(f"data.root={tiny_root}", "trainer.max_epochs=2"),
                f"resume={run_dir}", cwd=tmp_path)  # fmt: skip
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads((run_dir / "result.json").read_text())["status"] == "done"
    assert torch.load(last, weights_only=True)["epoch"] == 1  # continued: epoch 1 after epoch 0
    best = run_dir / "checkpoints" / "best.ckpt"

    out = tmp_path / "sub" / "submission.json"
    submit = [f"ckpt_path={best}", f"data.root={tiny_root}", f"output={out}", "data.image_size=32",
              "submit.save_probs=true", "accelerator=cpu"]  # fmt: skip
    killed = run("coco_multilabel.submit", *submit, cwd=tmp_path, kill_at=("os.fsync", 2))
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert assert_complete_or_absent(tmp_path / "sub") == ["submission.json"]  # the probabilities: absent
    assert run("coco_multilabel.submit", *submit, cwd=tmp_path).returncode == 0
    assert sorted(assert_complete_or_absent(tmp_path / "sub")) == ["submission.json", "submission.probs.pt"]

    report = [str(run_dir), "--data", str(tiny_root)]
    for moment in (1, 3):  # the val probabilities; a figure
        killed = run("coco_multilabel.report", *report, cwd=tmp_path, kill_at=("os.fsync", moment))
        assert killed.returncode == -9, killed.stderr[-2000:]
        assert "report.html" not in assert_complete_or_absent(run_dir / "report")
    done = run("coco_multilabel.report", *report, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "report.html" in assert_complete_or_absent(run_dir / "report")


@pytest.mark.slow
def test_make_data_killed_mid_archive_leaves_no_data_root_and_the_next_unpack_cleans_up(tiny_root, tmp_path):
    archive = tmp_path / "ms-coco.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for file in sorted(tiny_root.rglob("*")):
            if "labels/test" not in file.relative_to(tiny_root).as_posix():
                zf.write(file, file.relative_to(tiny_root).as_posix())
    destination = tmp_path / "data" / "ms-coco"
    for moment in (1, 30):
        killed = run(
            "coco_multilabel.unpack", str(archive), str(destination), cwd=tmp_path,
            kill_at=("shutil.copyfileobj", moment),
        )  # fmt: skip
        assert killed.returncode == -9, killed.stderr[-2000:]
        assert not destination.exists()  # never a half-filled data root
    assert len(list(destination.parent.glob(".ms-coco.*.tmp"))) == 1  # each unpack clears the dead one's
    done = run("coco_multilabel.unpack", str(archive), str(destination), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not list(destination.parent.glob(".ms-coco.*.tmp"))  # cleared by the next unpack
    assert sorted(p.name for p in (destination / "images" / "test").iterdir()) == sorted(
        p.name for p in (tiny_root / "images" / "test").iterdir()
    )
