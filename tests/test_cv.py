"""make cv end to end: folds trained as a multirun, killed and resumed, then the out-of-fold table."""

import json
import os
import subprocess
import sys

import pytest
import torch

from coco_multilabel.data.split import read_split
from coco_multilabel.decisions.probabilities import read_probabilities
from coco_multilabel.decisions.thresholds import describe
from coco_multilabel.models.checkpoints import load_model, read_checkpoint
from coco_multilabel.models.inference import predict_files
from coco_multilabel.submit import submit
from tests.conftest import tiny
from tests.helpers import ROOT


def cv(*args: str, cwd, new_session: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "coco_multilabel.cv", *args], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=900, start_new_session=new_session,
    )  # fmt: skip


@pytest.mark.slow
def test_a_killed_cv_resumes_its_unfinished_fold_and_its_oof_rows_come_from_held_out_models(
    tiny_root, tmp_path
):
    cv_dir, marker = tmp_path / "cv", tmp_path / "killed"
    kill = ["+callbacks.kill._target_=tests.helpers.KillAtEpoch", "+callbacks.kill.epoch=1",
            f"+callbacks.kill.marker={marker}", "+callbacks.kill.job_num=2"]  # fmt: skip
    pool = ["device_pool.ids=[0]", f"device_pool.lock_dir={tmp_path / 'locks'}"]
    args = [
        "--data",
        str(tiny_root),
        "--folds",
        "3",
        "--dir",
        str(cv_dir),
        *tiny("trainer.max_epochs=2", *pool),
    ]
    first = cv(*args, *kill, cwd=tmp_path, new_session=True)
    assert first.returncode != 0 and marker.exists(), first.stderr[-3000:]
    done = [json.loads((cv_dir / str(j) / "result.json").read_text()) for j in (0, 1)]
    assert [d["status"] for d in done] == ["done", "done"]
    assert json.loads((cv_dir / "2" / "result.json").read_text())["status"] == "running"
    folds = (cv_dir / "folds.json").read_text()

    second = cv("--refit", *args, *kill, cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert [json.loads((cv_dir / str(j) / "result.json").read_text()) for j in (0, 1)] == done  # skipped
    resumed = json.loads((cv_dir / "2" / "result.json").read_text())
    assert resumed["status"] == "done" and resumed["resumed_from"].endswith("2/checkpoints/last.ckpt")
    assert (cv_dir / "folds.json").read_text() == folds

    record = json.loads((cv_dir / "cv.json").read_text())
    assert record["images"] == 48 and [f["fold"] for f in record["folds"]] == [0, 1, 2]
    assert (
        len(record["rarest_classes"]) == 10 and "Out of fold: all 48 images" in (cv_dir / "cv.md").read_text()
    )
    oof = read_probabilities(cv_dir / "oof.probs.pt")
    rows = {stem: i for i, stem in enumerate(oof["stems"])}
    for fold in range(3):
        split = read_split(cv_dir / str(fold) / "split.json")
        checkpoint = read_checkpoint(record["folds"][fold]["checkpoint"])
        assert split["fold"] == fold and not set(split["val"]) & set(split["train"])
        # the OOF rows of this fold's images are what this fold's model, which never trained on them, predicts
        paths = [tiny_root / "images" / "train" / f"{s}.jpg" for s in split["val"]]
        probs, _ = predict_files(load_model(checkpoint), checkpoint, paths, num_workers=0, progress_bar=False,
                                 accelerator="cpu")  # fmt: skip
        expected = oof["probs"][[rows[s] for s in split["val"]]]
        torch.testing.assert_close(probs, expected, atol=1e-4, rtol=1e-3)
    assert sorted(rows) == sorted(s for f in json.loads(folds)["folds"] for s in f)

    refit = record["refit"]
    assert refit["epochs"] == round(sum(f["best_epoch"] for f in record["folds"]) / 3)  # best_epoch: from 1
    split = read_split(cv_dir / "refit" / "split.json")
    assert sorted(split["train"]) == sorted(rows) and split["val"] == []
    checkpoint = read_checkpoint(refit["checkpoint"])
    assert checkpoint["state_dict"]["thresholds"].tolist() == pytest.approx(record["thresholds"])
    assert (
        checkpoint["threshold_tuning"]["tuned_on"] == "out-of-fold, for a refit"
        and checkpoint["epoch"] == refit["epochs"] - 1
    )
    assert "no figure of its own" in describe(checkpoint["threshold_tuning"])  # the folds' figure, said so
    text = (cv_dir / "cv.md").read_text()
    assert "at least 1 label(s) an image" in text and "best epoch was chosen on these rows" in text
    out = submit(
        refit["checkpoint"], str(tiny_root), str(tmp_path / "refit.json"), num_workers=0, accelerator="cpu"
    )
    assert len(json.loads(out.read_text())) == 8
    assert f"make submit CKPT={refit['checkpoint']}" in (cv_dir / "cv.md").read_text()


def test_make_cv_trains_the_leaderboard_recipe_unless_told_another():
    from hydra import compose, initialize_config_dir

    from coco_multilabel.cli import CONFIG_DIR
    from coco_multilabel.cv import with_recipe

    assert with_recipe(["backbone.weights=null"]) == ["experiment=leaderboard", "backbone.weights=null"]
    for named in (["experiment=lp_ft"], ["~experiment"], tiny()):
        assert with_recipe(named) == named
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["experiment=leaderboard"])  # the default recipe on Lite2
        default = compose("train")
    assert cfg.backbone.name == "efficientnet_lite2" and default.backbone.name == "efficientnet_lite0"
    for group in ("model", "schedule", "optimizer", "data"):
        assert cfg[group] == default[group], group
