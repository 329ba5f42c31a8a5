"""A refused command changes nothing; an unexpected error is one line and a log with its traceback."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.helpers import cli


@pytest.fixture(scope="module")
def finished(tiny_root, tmp_path_factory):
    """A finished run made by the command line: its result.json says done."""
    cwd = tmp_path_factory.mktemp("cwd")
    run_dir = cwd / "run"
    done = cli(f"data.root={tiny_root}", f"hydra.run.dir={run_dir}", cwd=cwd)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((run_dir / "result.json").read_text())["status"] == "done"
    return cwd, run_dir


def test_a_refused_resume_leaves_the_finished_run_as_it_was(finished, tiny_root, tmp_path):
    cwd, original = finished
    run_dir = tmp_path / "run"
    shutil.copytree(original, run_dir)
    before = files(run_dir)
    refused = cli(
        f"data.root={tiny_root}", f"resume={run_dir}", "backbone=resnet18", "backbone.weights=null", cwd=cwd
    )
    assert refused.returncode == 2, refused.stderr[-2000:]
    output = refused.stdout + refused.stderr
    assert "trained with backbone" in output and "Traceback" not in output
    after = files(run_dir)
    assert after == before  # result.json, the config: nothing rewritten
    resumed = list((run_dir / ".hydra" / "resumed").glob("*/overrides.yaml"))
    assert len(resumed) == 1 and "backbone=resnet18" in resumed[0].read_text()  # the attempt, apart


def files(run_dir):
    """Every file the run had, and its bytes; the log (which records the refused attempt) aside."""
    return {
        p: p.read_bytes()
        for p in run_dir.rglob("*")
        if p.is_file() and p.suffix != ".log" and "resumed" not in p.parts
    }
