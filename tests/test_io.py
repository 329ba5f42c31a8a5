"""Atomic writes: a process SIGKILLed in the middle of a write leaves the old file, never half."""

import errno
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from coco_multilabel.errors import UserError
from coco_multilabel.io import AtomicCheckpointIO, write_text_atomic

# Run in a child process: os.fsync is the moment the new bytes are written but not yet renamed.
KILLED_WRITE = """
import os, signal, sys
os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)
{write}
"""


def run_killed(write: str) -> int:
    code = textwrap.dedent(KILLED_WRITE).format(write=textwrap.dedent(write))
    return subprocess.run([sys.executable, "-c", code], timeout=120).returncode


@pytest.mark.slow
def test_killed_text_write_leaves_the_old_file(tmp_path):
    target = tmp_path / "thresholds.json"
    write_text_atomic(target, '{"old": true}\n')
    returncode = run_killed(
        f"""
        from coco_multilabel.io import write_text_atomic
        write_text_atomic({str(target)!r}, '{{"new": true}}' * 100000)
        """
    )
    assert returncode == -9
    assert target.read_text() == '{"old": true}\n'


@pytest.mark.slow
def test_killed_checkpoint_save_leaves_the_old_checkpoint_and_the_next_save_cleans_up(tmp_path):
    target = tmp_path / "checkpoints" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"epoch": 1, "w": torch.ones(3)}, target)
    returncode = run_killed(
        f"""
        import torch
        from coco_multilabel.io import AtomicCheckpointIO
        AtomicCheckpointIO().save_checkpoint({{"epoch": 2, "w": torch.zeros(10**6)}}, {str(target)!r})
        """
    )
    assert returncode == -9
    assert torch.load(target)["epoch"] == 1  # complete and loadable
    assert list(target.parent.glob(".last.ckpt.*.tmp"))  # what the killed save left behind
    AtomicCheckpointIO().save_checkpoint({"epoch": 3}, target)
    assert [p.name for p in target.parent.iterdir()] == ["last.ckpt"]
    assert torch.load(target)["epoch"] == 3


def test_a_full_disk_is_a_user_error_and_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "split.json"
    write_text_atomic(target, "old\n")

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(UserError, match=f"no space left on device to write {target}"):
        write_text_atomic(target, "new\n")
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["split.json"]


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_writes_get_the_mode_the_umask_gives_a_new_file(tmp_path, umask, mode):
    """Not mkstemp's 0600: a report or a submission others on the machine may read."""
    previous = os.umask(umask)
    try:
        from coco_multilabel.io import current_umask

        assert current_umask() == umask
        text = write_text_atomic(tmp_path / "report.html", "<html></html>")
        ckpt = tmp_path / "checkpoints" / "last.ckpt"
        AtomicCheckpointIO().save_checkpoint({"w": torch.zeros(2)}, ckpt)
    finally:
        os.umask(previous)
    assert text.stat().st_mode & 0o777 == mode
    assert ckpt.stat().st_mode & 0o777 == mode


def test_short_disk_is_said_up_front_in_one_line(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    from coco_multilabel.io import check_free_space

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**12, 10**12 - 5 * 10**6, 5 * 10**6))
    check_free_space(tmp_path / "not" / "yet", 4 * 10**6, "checkpoints", "hydra.run.dir=<other disk>")
    with pytest.raises(UserError) as short:
        check_free_space(tmp_path / "not" / "yet", 6 * 10**6, "checkpoints", "hydra.run.dir=<other disk>")
    assert str(short.value) == (
        f"checkpoints needs about 6.0 MB on {tmp_path}, which has 5.0 MB free: "
        "free some space, or hydra.run.dir=<other disk>"
    )


def test_train_and_the_feature_cache_check_the_disk_before_they_write(train_cfg, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    from coco_multilabel.train import train

    usage = namedtuple("usage", "total used free")
    cache = tmp_path / "cache"  # a disk of its own, nearly full

    def disk_usage(path):
        free = 10**4 if str(path).startswith(str(cache)) else 10**5
        return usage(10**12, 10**12 - free, free)

    monkeypatch.setattr(shutil, "disk_usage", disk_usage)
    checkpoints = r"checkpoints \(last, best and one being written\) needs about .* MB"
    with pytest.raises(UserError, match=checkpoints):
        train(train_cfg(run_dir=tmp_path / "run"))
    assert not (tmp_path / "run" / "checkpoints").exists()
    monkeypatch.setattr("coco_multilabel.train.checkpoint_bytes", lambda model: 1)
    with pytest.raises(
        UserError, match="the feature cache does not fit: .* free on .* a disk with room: data.cache_dir="
    ):
        train(train_cfg("schedule=probe", f"data.cache_dir={cache}", run_dir=tmp_path / "probe"))
    assert not any(cache.rglob("*.npy"))
