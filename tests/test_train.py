"""End-to-end: the real entry points on a tiny generated dataset with a small random backbone."""

import json
import subprocess
import sys

import pytest
import torch

from coco_multilabel.errors import UserError
from coco_multilabel.evaluate import evaluate, evaluate_probabilities
from coco_multilabel.submit import submit
from coco_multilabel.train import train


@pytest.fixture(scope="module")
def trained(tiny_root, tmp_path_factory):
    """One tiny run of two epochs, shared by the tests that only read its outputs."""
    from hydra import compose, initialize_config_dir

    from coco_multilabel.cli import CONFIG_DIR
    from tests.conftest import TINY

    run_dir = tmp_path_factory.mktemp("run")
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[*TINY, f"data.root={tiny_root}", f"run_dir={run_dir}",
                                          "trainer.max_epochs=2"])  # fmt: skip
    return run_dir, train(cfg)


@pytest.mark.slow
def test_training_writes_best_and_last_checkpoints_and_the_split(trained):
    run_dir, summary = trained
    assert (run_dir / "checkpoints" / "best.ckpt").is_file()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    split = json.loads((run_dir / "split.json").read_text())
    assert len(split["train"]) == 36 and len(split["val"]) == 12
    assert summary["best_checkpoint"].endswith("best.ckpt") and 0 <= summary["best_score"] <= 1
    for name in ("macro_f1", "macro_precision", "macro_recall", "micro_f1", "cf1", "invfreq_f1", "map"):
        assert f"val/{name}" in summary  # at 0.5
    for name in ("macro_f1_tuned", "cf1_tuned", "macro_f1_xfit", "threshold"):
        assert f"val/{name}" in summary
    assert {"train/macro_f1", "train/map"} <= summary_keys_logged(run_dir)


@pytest.mark.slow
def test_the_run_says_at_which_precision_it_computed(trained):
    """On a CPU the default is float32 throughout; the checkpoint keeps it for submit."""
    run_dir, summary = trained
    assert (summary["precision"], summary["eval_precision"]) == ("32-true", "32")
    assert (
        json.loads((run_dir / "result.json").read_text())["precision"] == "32-true"
        if (run_dir / "result.json").exists()
        else True
    )
    checkpoint = torch.load(run_dir / "checkpoints" / "best.ckpt", weights_only=False)
    assert checkpoint["hyper_parameters"]["eval_precision"] == "32"


def summary_keys_logged(run_dir):
    header = (run_dir / "csv" / "metrics.csv").read_text().splitlines()[0]
    return set(header.split(","))


@pytest.mark.slow
def test_checkpoint_and_thresholds_json_carry_the_tuned_thresholds(trained):
    run_dir, summary = trained
    checkpoint = torch.load(run_dir / "checkpoints" / "best.ckpt", weights_only=False)
    tuned = checkpoint["threshold_tuning"]
    assert tuned["mode"] == "global" and tuned["objective"] == "macro_f1"
    assert tuned["min_labels"] == 1  # the rule the thresholds were tuned for (thresholds.min_labels)
    assert len(tuned["thresholds"]) == 80 and len(tuned["support"]) == 80
    assert sum(tuned["support"]) > 0
    assert checkpoint["state_dict"]["thresholds"].tolist() == pytest.approx(tuned["thresholds"])
    assert tuned["score_xfit"] == pytest.approx(summary["best_score"])  # the checkpoint monitor
    assert (
        json.loads((run_dir / "checkpoints" / "thresholds.json").read_text())["thresholds"]
        == tuned["thresholds"]
    )


@pytest.mark.slow
def test_per_class_mode_logs_both_kinds_of_threshold(train_cfg):
    summary = train(train_cfg("thresholds.mode=per_class", "thresholds.min_positives=1"))
    for name in ("macro_f1_tuned", "macro_f1_xfit", "macro_f1_tuned_global", "macro_f1_xfit_global"):
        assert f"val/{name}" in summary
    tuned = torch.load(summary["best_checkpoint"], weights_only=False)["threshold_tuning"]
    assert tuned["mode"] == "per_class" and len(tuned["thresholds"]) == 80


@pytest.mark.slow
def test_resume_continues_the_epoch_count(trained, train_cfg, tmp_path):
    run_dir, _ = trained
    import shutil

    resumed_dir = tmp_path / "resumed"
    shutil.copytree(run_dir, resumed_dir)
    last = resumed_dir / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["epoch"] == 1  # two epochs done: 0 and 1
    cfg = train_cfg("trainer.max_epochs=3", f"ckpt_path={last}", run_dir=resumed_dir)
    summary = train(cfg)
    assert summary["epochs"] == 3
    assert torch.load(last, weights_only=False)["epoch"] == 2  # one more epoch, not three


def test_a_finished_run_keeps_best_ckpt_only_and_says_how_to_train_on(train_cfg, tmp_path):
    run_dir = tmp_path / "finished"
    summary = train(train_cfg("keep_last_checkpoint=false", run_dir=run_dir))
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("*.ckpt")) == ["best.ckpt"]
    assert summary["best_checkpoint"].endswith("best.ckpt")
    with pytest.raises(
        UserError, match=r"a finished run keeps only best.ckpt; train on .* ckpt_path=.*best.ckpt"
    ):
        train(train_cfg("trainer.max_epochs=2", f"resume={run_dir}", run_dir=run_dir))


def test_an_unfinished_run_keeps_last_ckpt(tmp_path):
    from types import SimpleNamespace

    from coco_multilabel.models.checkpoints import drop_last_checkpoint

    (tmp_path / "checkpoints").mkdir()
    for name in ("best.ckpt", "last.ckpt"):
        (tmp_path / "checkpoints" / name).write_bytes(b"x")
    stopped = SimpleNamespace(interrupted=True, is_global_zero=True)
    assert drop_last_checkpoint(stopped, tmp_path) is None  # interrupted: it resumes from last.ckpt
    other_rank = SimpleNamespace(interrupted=False, is_global_zero=False)
    assert drop_last_checkpoint(other_rank, tmp_path) is None
    finished = SimpleNamespace(interrupted=False, is_global_zero=True)
    assert drop_last_checkpoint(finished, tmp_path, keep=True) is None
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert drop_last_checkpoint(finished, tmp_path) == tmp_path / "checkpoints" / "last.ckpt"
    assert not (tmp_path / "checkpoints" / "last.ckpt").exists()


@pytest.mark.slow
def test_resume_with_another_backbone_is_refused(trained, train_cfg):
    run_dir, _ = trained
    cfg = train_cfg(
        "backbone=resnet18", "backbone.weights=null", f"ckpt_path={run_dir}/checkpoints/last.ckpt"
    )
    with pytest.raises(UserError, match="trained with backbone"):
        train(cfg)


@pytest.mark.slow
def test_submit_covers_every_test_image_and_obeys_the_threshold(trained, tiny_root, tmp_path):
    run_dir, _ = trained
    ckpt = str(run_dir / "checkpoints" / "best.ckpt")
    common = dict(num_workers=0, accelerator="cpu", progress_bar=False)
    path = submit(ckpt, str(tiny_root), str(tmp_path / "tuned.json"), **common)
    predictions = json.loads(path.read_text())
    stems = sorted(p.stem for p in (tiny_root / "images" / "test").glob("*.jpg"))
    assert sorted(predictions) == stems
    assert all(v == sorted(set(v)) and len(v) >= 1 for v in predictions.values())
    # the scorer accepts it against the held-back labels
    assert 0 <= evaluate(path, tiny_root / "labels" / "test")["macro_f1"] <= 1

    everything = json.loads(
        submit(ckpt, str(tiny_root), str(tmp_path / "all.json"), threshold=0.0, **common).read_text()
    )
    assert all(v == list(range(80)) for v in everything.values())
    top1 = json.loads(
        submit(ckpt, str(tiny_root), str(tmp_path / "top.json"), threshold=1.0, **common).read_text()
    )
    assert all(len(v) == 1 for v in top1.values())  # min_labels=1 keeps the most likely class


@pytest.mark.slow
def test_thresholds_survive_save_and_load_and_drive_submit(trained, tiny_root, tmp_path, caplog):
    run_dir, _ = trained
    checkpoint = torch.load(run_dir / "checkpoints" / "best.ckpt", weights_only=False)
    checkpoint["state_dict"]["thresholds"] = torch.zeros(80)  # as if tuned to 0: every class
    torch.save(checkpoint, tmp_path / "zero.ckpt")
    common = dict(num_workers=0, accelerator="cpu", progress_bar=False)
    written = submit(str(tmp_path / "zero.ckpt"), str(tiny_root), str(tmp_path / "z.json"), **common)
    assert all(v == list(range(80)) for v in json.loads(written.read_text()).values())

    del checkpoint["threshold_tuning"]  # an untuned checkpoint falls back to 0.5 and says so
    torch.save(checkpoint, tmp_path / "untuned.ckpt")
    with caplog.at_level("WARNING"):
        fallback = submit(str(tmp_path / "untuned.ckpt"), str(tiny_root), str(tmp_path / "u.json"), **common)
    assert "no tuned thresholds; using 0.5" in caplog.text
    assert json.loads(fallback.read_text()) != json.loads(written.read_text())


@pytest.mark.slow
def test_val_probabilities_can_be_retuned_offline(trained, tiny_root, tmp_path):
    run_dir, _ = trained
    common = dict(num_workers=0, accelerator="cpu", progress_bar=False)
    path = submit(str(run_dir / "checkpoints" / "best.ckpt"), str(tiny_root), str(tmp_path / "val.json"),
                  images="val", save_probs=True, **common)  # fmt: skip
    val_stems = json.loads((run_dir / "split.json").read_text())["val"]
    assert sorted(json.loads(path.read_text())) == val_stems
    scores, study, table = evaluate_probabilities(
        path.with_suffix(".probs.pt"), tiny_root / "labels" / "train"
    )
    assert [row["thresholds"] for row in study] == ["0.5", "tuned global", "tuned per_class"]
    assert study[1]["macro_f1"] >= study[0]["macro_f1"]  # tuned on these labels: never worse than 0.5
    assert len(table) == 80 and {"ap", "threshold", "support"} <= table[0].keys()
    assert 0 <= scores["map"] <= 1


@pytest.mark.slow
@pytest.mark.parametrize("min_labels", [0, 1])
def test_submit_applies_the_rule_stored_with_the_thresholds_and_evaluate_scores_it(
    trained, tiny_root, tmp_path, min_labels, caplog
):
    run_dir, _ = trained
    checkpoint = torch.load(run_dir / "checkpoints" / "best.ckpt", weights_only=False)
    checkpoint["state_dict"]["thresholds"] = torch.full((80,), 0.99)  # hardly a class passes
    checkpoint["threshold_tuning"] |= {"min_labels": min_labels, "thresholds": [0.99] * 80}
    torch.save(checkpoint, tmp_path / "rule.ckpt")
    common = dict(num_workers=0, accelerator="cpu", progress_bar=False)
    with caplog.at_level("INFO"):
        path = submit(str(tmp_path / "rule.ckpt"), str(tiny_root), str(tmp_path / "s.json"), save_probs=True,
                      **common)  # fmt: skip
    assert f"at least {min_labels} label" in caplog.text or (min_labels == 0 and "no minimum" in caplog.text)
    written = json.loads(path.read_text())
    probs = torch.load(path.with_suffix(".probs.pt"), weights_only=False)["probs"]
    assert min(map(len, written.values())) == min_labels  # the stored rule, not submit.yaml's
    # make evaluate PROBS= scores exactly the labels submit wrote
    labels = tiny_root / "labels" / "test"
    by_probs, _, table = evaluate_probabilities(path.with_suffix(".probs.pt"), labels)
    assert by_probs["macro_f1"] == pytest.approx(evaluate(path, labels)["macro_f1"])
    assert sum(r["support"] for r in table) > 0 and probs.shape == (8, 80)
    overridden = submit(str(tmp_path / "rule.ckpt"), str(tiny_root), str(tmp_path / "o.json"),
                        min_labels=1 - min_labels, **common)  # fmt: skip
    assert min(map(len, json.loads(overridden.read_text()).values())) == 1 - min_labels
    assert f"but the thresholds were tuned for min_labels={min_labels}" in caplog.text


@pytest.mark.slow
def test_evaluate_scores_a_val_json_against_all_labels_when_told_to(trained, tiny_root, tmp_path):
    run_dir, _ = trained
    common = dict(num_workers=0, accelerator="cpu", progress_bar=False)
    path = submit(str(run_dir / "checkpoints" / "best.ckpt"), str(tiny_root), str(tmp_path / "val.json"),
                  images="val", **common)  # fmt: skip
    labels = tiny_root / "labels" / "train"  # the natural command: every labelled image's folder
    with pytest.raises(UserError, match="covers 12 of the 48 labelled images.*only_predicted=true"):
        evaluate(path, labels)
    val = evaluate(path, labels, only_predicted=True)
    assert val == evaluate(path, labels_of(tmp_path / "val-labels", labels, json.loads(path.read_text())))


def labels_of(folder, labels, stems):
    """A label folder holding just ``stems``: what only_predicted must amount to."""
    folder.mkdir()
    for stem in stems:
        (folder / f"{stem}.cls").write_bytes((labels / f"{stem}.cls").read_bytes())
    return folder


@pytest.mark.slow
def test_cli_reports_a_missing_data_root_without_a_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "coco_multilabel.train", f"hydra.run.dir={tmp_path}"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2
    assert "data.root is not set" in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr


@pytest.mark.slow
def test_cli_evaluate_names_the_first_bad_key(tmp_path):
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "000000000001.cls").write_text("3\n")
    (tmp_path / "pred.json").write_text('{"000000000001.jpg": [3]}')
    result = subprocess.run(
        [sys.executable, "-m", "coco_multilabel.evaluate", f"predictions={tmp_path / 'pred.json'}",
         f"labels={tmp_path / 'labels'}"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2
    assert "'000000000001.jpg' is not the stem" in result.stdout + result.stderr
