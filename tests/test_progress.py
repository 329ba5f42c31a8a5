"""Progress without a terminal: a line per epoch and lines through long steps, epochs counted from 1
over the whole run, in the log, in result.json, in the summary and in the report alike."""

import io
import json
import logging
import os
import pty
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest

from coco_multilabel.callbacks.progress import ImagesPerSecond
from coco_multilabel.progress import EVERY_S, ProgressLines, duration, plural, progress, track
from coco_multilabel.reporting.report import read_scalars
from tests.conftest import tiny
from tests.helpers import ROOT, cli


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_the_bars_images_per_second_are_its_batches_per_second_times_the_batch_size():
    trainer = SimpleNamespace(datamodule=SimpleNamespace(hparams={"batch_size": 32}))
    assert ImagesPerSecond(trainer).render(SimpleNamespace(speed=2.5)).plain == "80.0 img/s"
    assert ImagesPerSecond(trainer).render(SimpleNamespace(speed=None)).plain == ""  # not measured yet
    no_datamodule = SimpleNamespace(datamodule=None)  # a bare trainer.fit(model, loader): no batch size
    assert ImagesPerSecond(no_datamodule).render(SimpleNamespace(speed=2.5)).plain == ""


def test_lines_come_every_tenth_of_the_way_and_every_30_seconds_but_not_in_bursts():
    clock, lines = Clock(), []
    shown = ProgressLines("building the feature cache", 1000, write=lines.append, clock=clock)
    for _ in range(5):  # 50 % in under a second: no burst of five lines
        clock.now += 0.1
        shown.advance(100)
    assert lines == []
    clock.now += 3.5
    shown.advance(10)  # far enough, and long enough after the start
    assert lines == [
        "building the feature cache: 510 of 1,000 images (51 %), 127.5 images/s, 4s elapsed, ETA 4s"
    ]
    clock.now += EVERY_S  # slow now: a line after 30 s, however little was done
    shown.advance(1)
    assert len(lines) == 2 and "511 of 1,000 images" in lines[1] and "34s elapsed" in lines[1]
    clock.now += 1
    shown.advance(489)
    shown.finish()
    assert lines[-1] == "building the feature cache: done, 1,000 images in 35s, 28.6 images/s"


def test_within_an_epoch_a_line_comes_each_tenth_of_the_way_at_most_once_a_minute():
    clock, lines = Clock(), []
    clock.now = 100.0
    within = ProgressLines("epoch 3/10 (finetune)", 1280, write=lines.append, clock=clock,
                           every_s=float("inf"), min_gap_s=60, started=90.0)  # fmt: skip
    for _ in range(4):  # 50 % in 40 s: no line yet
        clock.now += 10
        within.advance(160)
    assert lines == []
    clock.now += 11
    within.advance(128)  # 60 %, 61 s after the epoch started
    assert lines == [
        "epoch 3/10 (finetune): 768 of 1,280 images (60 %), 12.6 images/s, 1m01s elapsed, ETA 41s"
    ]
    clock.now += 600  # slow, but a tenth more is not done: the epoch line will tell
    within.advance(10)
    assert len(lines) == 1


def test_a_step_written_to_a_file_prints_lines_and_in_a_terminal_a_bar(monkeypatch):
    out = io.StringIO()  # not a terminal
    assert list(track(range(5), "checking images", 5, stream=out)) == list(range(5))
    assert out.getvalue() == "checking images: done, 5 images in 0s, " + out.getvalue().split(", ")[-1]
    with progress("checking images", 5, stream=out, enabled=False) as shown:
        shown.advance(5)  # nothing shown, nothing fails
    assert out.getvalue().count("\n") == 1


def test_durations_and_plurals_read_as_a_person_writes_them():
    assert [duration(s) for s in (0.4, 45, 245, 7620)] == ["0s", "45s", "4m05s", "2h07m"]
    assert plural(1, "val positive") == "1 val positive"
    assert plural(2, "val positive") == "2 val positives"
    assert plural(0, "image") == "0 images" and plural(1200, "image") == "1,200 images"
    assert plural(3, "index", "indexes") == "3 indexes"


EPOCH_LINE = re.compile(
    r"epoch (\d+)/(\d+) \((\w+), phase (\d)/2\), train loss [\d.]+, val/macro_f1_xfit ([\d.]+) "
    r"\((?:best so far|best [\d.]+, epoch (\d+))\), [\d,.]+ images/s, elapsed \w+, (?:ETA|phase ends in) \w+"
)
QUIET = (  # what a default run no longer prints (library_messages.py, training/phases.py)
    "Tip:", "LeafSpec", "in eval mode at the start of training", "was configured so", "srun",
    "smaller than the logging interval", "estimate number of stepping batches", "`Trainer.fit` stopped",
)  # fmt: skip


@pytest.mark.slow
def test_a_run_written_to_a_file_shows_a_line_per_epoch_and_numbers_epochs_alike(tiny_root, tmp_path):
    """Two phases (a probe on cached features, then fine-tuning): the cache build and each epoch
    print a line on stdout (a pipe here, as in ``make train > log``) and in train.log; epochs count
    1, 2, 3 over both phases in the lines, result.json, the summary and the report's curves."""
    run_dir = tmp_path / "run"
    done = cli(
        f"data.root={tiny_root}", f"hydra.run.dir={run_dir}", f"data.cache_dir={tmp_path / 'cache'}",
        "schedule=probe_finetune", "schedule.probe.epochs=2", "schedule.finetune.epochs=1",
        "trainer.max_epochs=3", "logger=tensorboard", cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    log = (run_dir / "train.log").read_text()
    for text in (done.stdout, log):
        lines = [m.groups() for m in EPOCH_LINE.finditer(text)]
        assert [(k, n, phase, p) for k, n, phase, p, *_ in lines] == [
            ("1", "3", "probe", "1"), ("2", "3", "probe", "1"), ("3", "3", "finetune", "2")
        ]  # fmt: skip
        assert re.search(r"building the feature cache: done, 48 images in \w+", text)
        assert "in eval mode on purpose" in text  # the frozen backbone, said once per phase in our words
    result = json.loads((run_dir / "result.json").read_text())
    scores = [float(score) for *_, score, _ in lines]
    best = max(range(3), key=lambda i: (scores[i], -i)) + 1  # the first of the best
    assert result["best_epoch"] == best and result["epochs"] == 3 and "epoch" not in result
    assert re.search(rf"best epoch\s+│ {best} of 3\s", done.stdout)  # the summary table
    series = read_scalars(run_dir)
    assert [e for e, _ in series["val/macro_f1_xfit"]] == [1, 2, 3]
    assert [e for e, _ in series["lr-AdamW/head"]] == [1, 2, 3]
    for quiet in QUIET:
        assert quiet not in done.stdout + done.stderr, quiet


@pytest.mark.slow
def test_in_a_terminal_the_epoch_lines_go_to_train_log_only(tiny_root, tmp_path):
    """Where the bar shows progress (stdout a terminal), the per-epoch line is written to train.log
    but not over the bar."""
    primary, secondary = pty.openpty()
    run_dir = tmp_path / "run"
    overrides = tiny(f"data.root={tiny_root}", f"hydra.run.dir={run_dir}", "trainer.max_epochs=2")
    command = [sys.executable, "-m", "coco_multilabel.train", *overrides]
    process = subprocess.Popen(
        command, cwd=tmp_path, stdout=secondary, stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    os.close(secondary)
    shown = b""
    while True:
        try:
            chunk = os.read(primary, 65536)
        except OSError:  # the run ended: no process holds the terminal
            break
        if not chunk:
            break
        shown += chunk
    assert process.wait(timeout=600) == 0, process.stderr.read()[-3000:]
    os.close(primary)
    assert "epoch 2/2" in (run_dir / "train.log").read_text()
    assert "epoch 1/2" not in shown.decode(errors="replace")  # the log lines stayed off the terminal
    assert "best epoch" in shown.decode(errors="replace")  # while the run's output came through


@pytest.mark.slow
def test_submit_and_check_data_print_lines_when_their_output_goes_to_a_file(
    tiny_root, monkeypatch, caplog, capsys
):
    """Predicting thousands of images (submit, report) and checking a data root are long steps:
    outside a terminal each says how far it got instead of drawing a bar nobody sees."""
    from coco_multilabel.data.checks import check_data
    from coco_multilabel.models.inference import predict_files
    from tests.test_precision import model

    paths = sorted((tiny_root / "images" / "train").glob("*.jpg"))
    checkpoint = {"datamodule_hyper_parameters": {"image_size": 32}}
    with caplog.at_level(logging.INFO, logger="coco_multilabel.progress"):
        probs, _ = predict_files(model(), checkpoint, paths, batch_size=8, num_workers=0, accelerator="cpu")
    assert len(probs) == 48
    assert re.search(r"predicting: done, 48 images in \w+, [\d.]+ images/s", caplog.text)
    assert "Predicting" not in capsys.readouterr().out  # no bar's last frame
    monkeypatch.setattr("coco_multilabel.data.checks.PROGRESS_FROM", 0)
    check_data(tiny_root, progress=True)
    assert re.search(r"checking images: done, 56 images in \w+", capsys.readouterr().err)
