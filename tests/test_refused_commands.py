"""A refused command changes nothing; an unexpected error is one line and a log with its traceback."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, cli


@pytest.fixture(scope="module")
def finished(tiny_root, tmp_path_factory):
    """A finished run made by the command line: its result.json says done."""
    cwd = tmp_path_factory.mktemp("cwd")
    run_dir = cwd / "run"
    done = cli(f"data.root={tiny_root}", f"hydra.run.dir={run_dir}", cwd=cwd)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((run_dir / "result.json").read_text())["status"] == "done"
    return cwd, run_dir


@pytest.mark.slow
def test_a_refused_resume_leaves_the_finished_run_as_it_was(finished, tiny_root, tmp_path):
    cwd, original = finished
    run_dir = tmp_path / "run"
    shutil.copytree(original, run_dir)
    before = files(run_dir)
    outputs = []
    for change in (["data.image_size=64"], ["backbone=resnet18", "backbone.weights=null"]):
        refused = cli(f"data.root={tiny_root}", f"resume={run_dir}", *change, cwd=cwd, small=False)
        assert refused.returncode == 2, refused.stderr[-2000:]
        outputs.append(refused.stdout + refused.stderr)
        assert "Traceback" not in outputs[-1] and "start a new run instead" in outputs[-1]
        assert files(run_dir) == before  # result.json, the config, the checkpoints: nothing rewritten
    assert f"{run_dir} was made with data.image_size=32, which a resume cannot change" in outputs[0]
    assert "backbone.name=mobilenet_v3_small" in outputs[1] and "backbone.name=resnet18" in outputs[1]
    resumed = sorted((run_dir / ".hydra" / "resumed").glob("*/overrides.yaml"))
    assert any("backbone=resnet18" in r.read_text() for r in resumed)  # the attempts, kept apart


def files(run_dir):
    """Every file the run had, and its bytes; the log (which records the refused attempt) aside."""
    return {
        p: p.read_bytes()
        for p in run_dir.rglob("*")
        if p.is_file() and p.suffix != ".log" and "resumed" not in p.parts
    }


# entry point -> (the function its main calls, its arguments): the function is replaced by one that fails
ENTRY_POINTS = {
    "train": ("coco_multilabel.train", "run_job", ["data.root=."]),
    "submit": ("coco_multilabel.submit", "submit", ["ckpt_path=x.ckpt"]),
    "evaluate": ("coco_multilabel.evaluate", "evaluate_predictions", ["predictions=p.json", "labels=l"]),
    "demo": ("coco_multilabel.demo", "make_dataset", []),
    "predict": ("coco_multilabel.predict", "predict", ["x.ckpt", "x.jpg"]),
    "report": ("coco_multilabel.report", "report", ["."]),
    "check_data": ("coco_multilabel.check_data", "check_data", ["."]),
    "unpack": ("coco_multilabel.unpack", "unpack", ["x.zip", "out"]),
    "sweeps summary": ("coco_multilabel.sweeps.summary", "write_summary", ["."]),
}
CRASH = """
import sys, {module} as entry
def boom(*args, **kwargs):
    raise RuntimeError("something the code did not expect\\nsecond line")
setattr(entry, {name!r}, boom)
sys.argv = ["{module}", *{args!r}]
entry.main()
"""


@pytest.mark.slow
@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_an_unexpected_error_is_one_line_and_a_log_with_the_traceback(entry, tmp_path):
    module, name, args = ENTRY_POINTS[entry]
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "XDG_CACHE_HOME": ""}
    done = subprocess.run(
        [sys.executable, "-c", CRASH.format(module=module, name=name, args=args), *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    output = (done.stdout + done.stderr).strip()
    assert done.returncode == 1, output
    assert "Traceback" not in output and "second line" not in output
    line = next(line for line in output.splitlines() if "internal error" in line)
    assert "RuntimeError: something the code did not expect; not caused by your input" in line
    log = Path(line.rpartition(" in ")[2])
    assert log.parent == tmp_path / ".cache" / "coco-multilabel" / "logs"
    assert "Traceback" in log.read_text() and "second line" in log.read_text()


def test_user_errors_exit_2_and_internal_errors_exit_1():
    from coco_multilabel.cli import report_user_errors
    from coco_multilabel.errors import UserError

    def fails(err):
        raise err

    with pytest.raises(SystemExit) as user:
        report_user_errors(fails)(UserError("bad input"))
    with pytest.raises(SystemExit) as internal:
        report_user_errors(fails)(KeyError("bug"))
    assert (user.value.code, internal.value.code) == (2, 1)
