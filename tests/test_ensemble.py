"""Ensembles: the mean of the members' probabilities, thresholds tuned for the ensemble on images
none of its members trained on, and members of different splits refused."""

import json
from pathlib import Path

import pytest
import torch

from coco_multilabel.cv import oof_table
from coco_multilabel.data.datasets import list_images
from coco_multilabel.decisions.oof import out_of_fold
from coco_multilabel.decisions.probabilities import read_probabilities
from coco_multilabel.decisions.thresholds import describe, tune
from coco_multilabel.errors import UserError
from coco_multilabel.folders import member_paths, read_member, split_kind
from coco_multilabel.models.backbones import StagedBackbone
from coco_multilabel.models.checkpoints import load_model
from coco_multilabel.models.ensemble import ensemble_probabilities, ensemble_thresholds, shared_trunk_groups
from coco_multilabel.models.inference import predict_files
from coco_multilabel.reporting.report import report
from coco_multilabel.submit import submit
from coco_multilabel.sweeps.job import run_job
from coco_multilabel.train import train
from tests.conftest import compose_tiny

CPU = dict(num_workers=0, accelerator="cpu", progress_bar=False)


@pytest.fixture(scope="module")
def runs(tiny_root, tmp_path_factory):
    """A 2-fold CV folder, and a sweep folder of two runs on one split plus a run on another split."""
    base = tmp_path_factory.mktemp("ensembles")
    cv_dir, sweep = base / "cv", base / "sweep"

    def fit(run_dir, *overrides):
        run_job(compose_tiny(f"data.root={tiny_root}", f"run_dir={run_dir}", *overrides), train)
        return run_dir / "checkpoints" / "best.ckpt"

    shared = f"data.folds_file={cv_dir / 'folds.json'}"
    folds = [fit(cv_dir / str(k), "data.folds=2", f"data.fold={k}", shared) for k in range(2)]
    same = [fit(sweep / "0", "optimizer.lr=0.01"), fit(sweep / "1", "optimizer.lr=0.001")]
    other = fit(base / "other", "seed=5")
    return {"cv": cv_dir, "folds": folds, "sweep": sweep, "same": same, "other": other}


@pytest.mark.slow
def test_ensemble_probabilities_are_the_mean_of_the_members(runs, tiny_root):
    members = [read_member(p) for p in runs["folds"]]
    paths = list_images(tiny_root / "images" / "test")
    each = []
    for m in members:
        probs, kept = predict_files(load_model(m.checkpoint), m.checkpoint, paths, **CPU)
        assert kept.all()
        each.append(probs)
    mean, kept = ensemble_probabilities(members, paths, **CPU)
    assert kept.all() and not torch.allclose(each[0], each[1])
    torch.testing.assert_close(mean, (each[0] + each[1]) / 2)


@pytest.mark.slow
def test_a_cv_folder_submits_its_folds_with_thresholds_tuned_out_of_fold(runs, tiny_root, tmp_path):
    assert member_paths(str(runs["cv"])) == runs["folds"]
    record = oof_table(runs["cv"])
    out = submit(str(runs["cv"]), str(tiny_root), str(tmp_path / "cv.json"), save_probs=True, **CPU)
    saved = read_probabilities(out.with_suffix(".probs.pt"))
    assert saved["thresholds"].tolist() == pytest.approx(record["thresholds"])
    assert saved["threshold_tuning"]["tuned_on"] == "out-of-fold"
    members = [read_member(p) for p in runs["folds"]]
    mean, _ = ensemble_probabilities(members, list_images(tiny_root / "images" / "test"), **CPU)
    torch.testing.assert_close(saved["probs"], mean)
    predictions = json.loads(out.read_text())
    assert len(predictions) == 8 and all(predictions.values())
    # the same ensemble named by its checkpoints (a comma-separated list) decides the same
    listed = submit(",".join(map(str, runs["folds"])), str(tiny_root), str(tmp_path / "list.json"), **CPU)
    assert json.loads(listed.read_text()) == predictions


@pytest.mark.slow
def test_members_of_one_split_are_tuned_on_their_mean_val_probabilities(runs):
    members = [read_member(p) for p in runs["same"]]
    assert split_kind(members) == "split"
    thresholds, record = ensemble_thresholds(members, "split")
    held = [m.held_out() for m in members]
    mean = torch.stack([h.probs for h in held]).mean(0)
    expected = tune(mean, held[0].targets, "global", "macro_f1", min_labels=record["min_labels"])
    assert thresholds.tolist() == pytest.approx(expected.thresholds.tolist())
    assert record["tuned_on"] == "selecting val" and record["min_labels"] == 1  # thresholds.min_labels
    said = describe(record)  # what submit logs: where the figure was measured, never "held out"
    assert "val images that selected the members" in said and "not held out" in said


@pytest.mark.slow
def test_members_of_different_splits_are_refused(runs, tiny_root, tmp_path):
    for mix in ([runs["same"][0], runs["other"]], [runs["folds"][0], runs["same"][0]]):
        with pytest.raises(UserError, match="trained on different splits"):
            submit(",".join(map(str, mix)), str(tiny_root), str(tmp_path / "x.json"), **CPU)
    assert not (tmp_path / "x.json").exists()


@pytest.mark.slow
def test_two_folds_holding_the_same_images_are_refused():
    held = [read_member_like(0, ["a", "b"]), read_member_like(1, ["b", "c"])]
    with pytest.raises(UserError, match="image b is held out by two folds"):
        out_of_fold(held)


def read_member_like(fold, stems):
    from coco_multilabel.decisions.oof import HeldOut

    return HeldOut(fold, stems, torch.rand(len(stems), 80), torch.zeros(len(stems), 80), f"fold {fold}")


@pytest.mark.slow
def test_a_sweep_folder_gives_its_top_jobs_by_the_cross_fitted_objective(runs):
    results = [json.loads((runs["sweep"] / j / "result.json").read_text()) for j in ("0", "1")]
    best = max(results, key=lambda r: r["best_score"])
    assert member_paths(str(runs["sweep"]), top=1) == [
        runs["sweep"] / str(results.index(best)) / "checkpoints" / "best.ckpt"
    ]
    assert len(member_paths(str(runs["sweep"]), top=2)) == 2
    with pytest.raises(UserError, match="TOP=n"):
        member_paths(str(runs["sweep"]))
    with pytest.raises(UserError, match="fewer than TOP=3"):
        member_paths(str(runs["sweep"]), top=3)


@pytest.mark.slow
def test_predict_shows_what_the_ensemble_submits(runs, tiny_root, tmp_path):
    from coco_multilabel.predict import predict

    out = submit(str(runs["cv"]), str(tiny_root), str(tmp_path / "cv.json"), **CPU)
    results = predict(runs["cv"], tiny_root / "images" / "test", accelerator="cpu")
    submitted = json.loads(out.read_text())
    for r in results:  # the same rule: above the thresholds, and at least the most likely class
        assert sorted(e["class"] for e in r["labels"]) == submitted[Path(r["image"]).stem]


@pytest.mark.slow
def test_a_run_folder_names_its_best_checkpoint(runs):
    assert member_paths(str(runs["sweep"] / "0")) == [runs["sweep"] / "0" / "checkpoints" / "best.ckpt"]


@pytest.fixture(scope="module")
def top_folds(tiny_root, tmp_path_factory):
    """Two folds of the default recipe's kind: the top stage and a CSRA head on one frozen trunk."""
    cv_dir = tmp_path_factory.mktemp("top_folds")
    shared = ["data.folds=2", f"data.folds_file={cv_dir / 'folds.json'}", "backbone=efficientnet_lite0",
              "backbone.weights=null", "data.image_size=64", "schedule=top", "model.top_stages=1",
              "model.head=csra", "model.tta=true", f"data.cache_dir={cv_dir / 'cache'}"]  # fmt: skip
    for k in range(2):
        cfg = compose_tiny(f"data.root={tiny_root}", f"run_dir={cv_dir / str(k)}", *shared, f"data.fold={k}")
        run_job(cfg, train)
    return [cv_dir / str(k) / "checkpoints" / "best.ckpt" for k in range(2)]


@pytest.mark.slow
def test_members_sharing_a_frozen_trunk_run_it_once(top_folds, runs, tiny_root, monkeypatch):
    members = [read_member(p) for p in top_folds]
    paths = list_images(tiny_root / "images" / "test")
    alone = [predict_files(load_model(m.checkpoint), m.checkpoint, paths, **CPU)[0] for m in members]
    assert not torch.allclose(alone[0], alone[1])  # the tops trained apart
    calls = []
    trunk = StagedBackbone.trunk

    def counted(*args, **kwargs):
        calls.append(len(args[1]))  # the batch's size (building a model runs it on one image)
        return trunk(*args, **kwargs)

    monkeypatch.setattr(StagedBackbone, "trunk", counted)
    mean, kept = ensemble_probabilities(members, paths, **CPU)
    assert kept.all()
    torch.testing.assert_close(mean, (alone[0] + alone[1]) / 2, atol=1e-5, rtol=1e-4)
    assert calls.count(len(paths)) == 2  # the images and their mirror images, once for both

    # a fine-tuned trunk is not shared: the tiny folds trained their whole backbone
    mixed = [*members, *(read_member(p) for p in runs["folds"])]
    models = [load_model(m.checkpoint) for m in mixed]
    assert shared_trunk_groups(mixed, models) == [[0, 1], [2], [3]]
    assert shared_trunk_groups(mixed, models, image_size=48)[0] == [0, 1]


@pytest.mark.slow
def test_the_report_of_a_cv_folder_shows_its_out_of_fold_predictions(runs, tiny_root, tmp_path):
    record = oof_table(runs["cv"])
    path = report(runs["cv"], str(tiny_root), out=tmp_path / "report", progress=False)
    page = path.read_text()
    assert page.startswith("<!") and f"{record['images']} images from 2 fold models" in page
    assert f"{record['score_xfit']:.4f}" in page and "out of fold" in page
    for figure in ("per_class.png", "thresholds.png", "pr_curves.png", "worst_classes.png", "comparison.png"):
        assert (tmp_path / "report" / figure).stat().st_size > 1000, figure


@pytest.mark.slow
def test_the_report_of_an_ensemble_shows_its_members_and_their_mean_at_submits_thresholds(runs, tiny_root):
    members = [read_member(p) for p in runs["same"]]
    thresholds, tuning = ensemble_thresholds(members, split_kind(members))
    listed = report(",".join(map(str, runs["same"])), str(tiny_root), progress=False)
    assert listed == runs["sweep"] / "report-ensemble" / "report.html"  # beside the members' runs
    top = report(runs["sweep"], str(tiny_root), progress=False, top=2)
    assert top == runs["sweep"] / "report-top2" / "report.html"
    for page in (listed.read_text(), top.read_text()):  # the val chose them: never called held out
        assert "Ensemble of 2 models" in page and "the val images that selected the members" in page
        assert "held out of every member" not in page and "make cv" in page
        assert all(str(p) in page for p in runs["same"])
        assert f"chosen {tuning['global_threshold']}" in page  # the threshold make submit applies
    for figure in ("per_class.png", "thresholds.png", "pr_curves.png", "worst_classes.png"):
        assert (runs["sweep"] / "report-top2" / figure).stat().st_size > 1000, figure
    with pytest.raises(UserError, match="different splits"):
        report(f"{runs['same'][0]},{runs['other']}", str(tiny_root), progress=False)


@pytest.mark.slow
def test_submit_says_a_top_n_figure_was_measured_on_the_images_that_selected_it(
    runs, tiny_root, tmp_path, caplog
):
    with caplog.at_level("INFO"):
        submit(str(runs["sweep"]), str(tiny_root), str(tmp_path / "top.json"), top=2, **CPU)
    decision = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("decision:"))
    assert "cross-fitted on the 12 val images that selected the members" in decision
    assert "not held out" in decision and "make cv" in decision
    caplog.clear()
    with caplog.at_level("INFO"):
        submit(str(runs["cv"]), str(tiny_root), str(tmp_path / "cv.json"), **CPU)
    decision = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("decision:"))
    assert "out-of-fold images" in decision and "best epochs were chosen on them" in decision
