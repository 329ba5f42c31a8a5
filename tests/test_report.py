"""make report on a finished run, a run without a best checkpoint yet, and a sweep."""

import json
import shutil

import pytest

from coco_multilabel.errors import UserError
from coco_multilabel.report import main
from coco_multilabel.reporting.report import read_scalars, report

RUN_FIGURES = ("learning_curves", "per_class", "thresholds", "pr_curves", "worst_classes", "class_frequency")


@pytest.mark.slow
def test_report_of_a_run_embeds_every_figure_and_the_config(tensorboard_run, tmp_path, capsys):
    run_dir, _ = tensorboard_run
    main([str(run_dir), "--out", str(tmp_path / "report")])
    assert "report written to" in capsys.readouterr().out
    page = (tmp_path / "report" / "report.html").read_text()
    for name in RUN_FIGURES:
        png = tmp_path / "report" / f"{name}.png"
        assert png.read_bytes().startswith(b"\x89PNG")
        assert f'alt="{name}.png"' in page
    assert page.count("data:image/png;base64,") == len(RUN_FIGURES)  # self-contained
    assert "backbone:" in page and "mobilenet_v3_small" in page  # the config
    assert (tmp_path / "report" / "val.probs.pt").is_file()  # kept for the next report
    series = read_scalars(run_dir)
    # epochs as a person counts them, also for the learning rate (logged without its epoch)
    assert [epoch for epoch, _ in series["val/macro_f1_xfit"]] == [1, 2]
    assert [epoch for epoch, _ in series["lr-AdamW/head"]] == [1, 2]


@pytest.mark.slow
def test_a_run_without_best_checkpoint_or_data_is_reported_with_notes(tensorboard_run, tmp_path):
    run_dir, _ = tensorboard_run
    running = tmp_path / "running"
    shutil.copytree(run_dir, running, ignore=shutil.ignore_patterns("checkpoints", "tensorboard", "cache"))
    (running / "result.json").write_text(json.dumps({"status": "running", "overrides": []}))
    (running / "csv").mkdir()  # a run logged by the CSV logger
    (running / "csv" / "metrics.csv").write_text(
        "epoch,lr-AdamW,step,train/loss_epoch,val/loss\n,0.1,0,,\n0,,1,0.7,\n0,,1,,0.6\n,0.2,2,,\n"
        ",0.25,2,,\n1,,3,0.5,\n"  # killed in its second epoch, resumed: that epoch's start logged again
    )
    page = report(running, progress=False).read_text()
    assert "still going" in page and "no checkpoints/best.ckpt yet" in page
    assert read_scalars(running) == {  # epochs from 1; the resumed epoch once, as it ran last
        "lr-AdamW": [(1, 0.1), (2, 0.25)],
        "train/loss_epoch": [(1, 0.7), (2, 0.5)],
        "val/loss": [(1, 0.6)],
    }
    assert (running / "report" / "class_frequency.png").is_file()
    (running / ".hydra" / "config.yaml").unlink()  # nothing says where the data is
    assert "pass --data DIR" in report(running, progress=False).read_text()
    with pytest.raises(UserError, match="nowhere/images/train is not a folder"):
        report(running, data_root=str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match="neither a run folder"):
        report(tmp_path / "running" / "csv")


@pytest.mark.slow
def test_report_of_a_sweep_compares_its_jobs(tensorboard_run, tmp_path):
    run_dir, summary = tensorboard_run
    sweep = tmp_path / "sweep"
    shutil.copytree(run_dir, sweep / "0", ignore=shutil.ignore_patterns("checkpoints", "cache"))
    (sweep / "0" / "result.json").write_text(
        json.dumps({"status": "done", "overrides": ["seed=0", "optimizer.lr=0.01"], **summary})
    )
    (sweep / "1" / ".hydra").mkdir(parents=True)
    (sweep / "1" / "result.json").write_text(
        json.dumps({"status": "failed", "overrides": ["seed=0", "optimizer.lr=9"], "error": "boom"})
    )
    page = report(sweep).read_text()
    assert (sweep / "report" / "comparison.png").is_file() and (sweep / "report" / "curves.png").is_file()
    assert "shared overrides: seed=0" in page and "optimizer.lr=0.01" in page and "failed" in page
    assert f"make report RUN={sweep / '1'}" in page


def test_every_name_the_report_embeds_is_escaped(tmp_path):
    from coco_multilabel.reporting.report import render, sweep_sections

    job = '<img src=x onerror="alert(1)">'
    (tmp_path / job / "report").mkdir(parents=True)
    (tmp_path / job / "report" / "report.html").write_text("")
    rows = [
        {"job": job, "status": "failed", "overrides": ["data.root=<script>alert(2)</script>"]},
        {"job": "<b>other</b>", "status": "failed", "overrides": []},
    ]
    page = render("sweep <i>", sweep_sections(tmp_path, rows))
    assert "<script>" not in page and "<img src=x" not in page and "<b>" not in page and "<i>" not in page
    assert "&lt;script&gt;" in page and "&lt;b&gt;other&lt;/b&gt;" in page
    assert 'href="../%3Cimg%20src%3Dx%20onerror%3D%22alert%281%29%22%3E/report/report.html"' in page


def test_wall_time_reads_in_hours_minutes_and_seconds():
    from coco_multilabel.reporting.report import duration

    assert [duration(s) for s in (None, 12.4, 220.3, 3725)] == [None, "12 s", "3 min 40 s", "1 h 02 min"]


def test_table_numbers_keep_small_values_and_round_seconds():
    from coco_multilabel.reporting.report import number

    assert [number(v) for v in (0.39951, 0.002047, 1.293e-05, 0.0, 2337.4, 991.4)] == [
        "0.400", "0.00205", "1.29e-05", "0.000", "2337", "991"]  # fmt: skip
