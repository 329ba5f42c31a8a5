"""The end-of-run summary and the progress bar's throughput column."""

from pathlib import Path
from types import SimpleNamespace

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from coco_multilabel.callbacks.progress import ImagesPerSecond, ThroughputProgressBar
from coco_multilabel.cli import CONFIG_DIR
from coco_multilabel.reporting.run_summary import print_summary


@pytest.mark.slow
def test_the_summary_names_the_best_epoch_its_files_and_the_exact_submit_line(tensorboard_run, capsys):
    run_dir, summary = tensorboard_run
    print_summary(summary, run_dir, "data/ms-coco")
    out = capsys.readouterr().out
    best = summary["best_checkpoint"]
    rows = {
        line.split("│")[1].strip(): line.split("│")[2].strip() for line in out.splitlines() if "│" in line
    }
    assert rows["best epoch"] == f"{summary['best_epoch']} of 2"
    assert rows["val/macro_f1_xfit (picks best.ckpt)"] == f"{summary['best_score']:.4f}"
    assert {"val/map", "threshold (global)", "best checkpoint", "thresholds", "report"} <= set(rows)
    # the commands are never wrapped: they are meant to be copied
    assert f"submit: make submit CKPT={best} DATA=data/ms-coco OUT=submission.json\n" in out
    assert f"report: make report RUN={run_dir}\n" in out


def test_the_progress_bar_shows_images_per_second():
    trainer = SimpleNamespace(datamodule=SimpleNamespace(hparams={"batch_size": 32}))
    assert str(ImagesPerSecond(trainer).render(SimpleNamespace(speed=2.5))) == "80.0 img/s"
    assert str(ImagesPerSecond(trainer).render(SimpleNamespace(speed=None))) == ""
    callbacks = OmegaConf.load(Path(CONFIG_DIR) / "callbacks" / "default.yaml")
    assert isinstance(instantiate(callbacks.progress_bar), ThroughputProgressBar)  # the default bar
