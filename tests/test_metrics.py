import json
import subprocess
import sys

import pytest
import torch

from coco_multilabel.evaluate import compare_predictions, evaluate
from coco_multilabel.metrics import (
    PresentClassesAP,
    label_scores,
    mean_average_precision,
    paired_bootstrap,
    per_class_table,
)

# 4 images, 3 classes; class 2 has no positives (and one false positive).
TARGETS = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0], [1, 0, 0]])
PREDS = torch.tensor([[1, 0, 1], [1, 1, 0], [0, 0, 0], [0, 0, 0]])
# class 0: TP 2, FP 0, FN 1 -> P 1, R 2/3, F1 4/5; class 1: TP 0, FP 1, FN 1 -> 0, 0, 0;
# class 2: TP 0, FP 1, FN 0 -> 0, 0 (no positives: R is 0/0 -> 0), 0.
EXPECTED = {
    "macro_f1": (4 / 5) / 3,
    "macro_precision": 1 / 3,
    "macro_recall": (2 / 3) / 3,
    "micro_f1": 0.5,  # TP 2, FP 2, FN 2
    "micro_precision": 0.5,
    "micro_recall": 0.5,
    "cp": 1 / 3,
    "cr": 2 / 9,
    "cf1": 4 / 15,  # 2 (1/3)(2/9) / (1/3 + 2/9)
    # weights 1/3, 1, 0 (class 2 absent): P = (1/3) / (4/3) = 1/4, R = (2/9) / (4/3) = 1/6
    "invfreq_f1": 1 / 5,
}


def test_every_score_on_a_hand_computed_case():
    scores = label_scores(PREDS, TARGETS)
    assert scores.keys() == EXPECTED.keys()
    for name, value in EXPECTED.items():
        assert scores[name] == pytest.approx(value), name


def test_map_leaves_out_classes_without_positives():
    probs = torch.tensor([[0.9, 0.2, 0.5], [0.8, 0.6, 0.1], [0.1, 0.1, 0.1], [0.3, 0.3, 0.1]])
    # class 0: positives ranked 1, 2, 3 -> AP 1; class 1: its positive ranked 3rd -> AP 1/3; class 2: none
    assert mean_average_precision(probs, TARGETS) == pytest.approx((1 + 1 / 3) / 2)
    metric = PresentClassesAP(3)
    metric.update(probs, TARGETS)
    assert float(metric.compute()) == pytest.approx((1 + 1 / 3) / 2)


def test_per_class_table_rows():
    rows = per_class_table(PREDS, TARGETS, ("a", "b", "c"), thresholds=torch.tensor([0.5, 0.4, 0.3]))
    expected = {"class": 0, "name": "a", "support": 3, "precision": 1.0, "recall": pytest.approx(2 / 3),
                "f1": pytest.approx(0.8), "threshold": 0.5}  # fmt: skip
    assert rows[0] == expected
    assert rows[2]["support"] == 0 and rows[2]["f1"] == 0.0


def test_evaluate_a_hand_made_submission_counts_absent_classes_as_zero(tmp_path):
    # class 0: F1 1; class 1: F1 0; class 2: P 1/2, R 1, F1 2/3; the other 77 classes count as 0.
    truth = {"a": [0, 1], "b": [0], "c": [2], "d": []}
    preds = {"a": [0], "b": [0, 1], "c": [2], "d": [2]}
    labels = tmp_path / "labels"
    labels.mkdir()
    for stem, classes in truth.items():
        (labels / f"{stem}.cls").write_text("".join(f"{c}\n" for c in classes))
    (tmp_path / "pred.json").write_text(json.dumps(preds))
    scores = evaluate(tmp_path / "pred.json", labels)
    assert scores["macro_f1"] == pytest.approx((1 + 0 + 2 / 3) / 80)
    assert scores["macro_precision"] == pytest.approx((1 + 0 + 0.5) / 80)
    assert scores["macro_recall"] == pytest.approx((1 + 0 + 1) / 80)
    assert scores["micro_f1"] == pytest.approx(2 * 3 / (2 * 3 + 2 + 1))  # TP 3, FP 2, FN 1


def test_paired_bootstrap_scores_each_resample_of_the_images_the_same_for_every_prediction():
    better = TARGETS.clone()  # right on every image
    boot = paired_bootstrap([PREDS, better], TARGETS, draws=50, seed=3)
    picks = torch.randint(4, (50, 4), generator=torch.Generator().manual_seed(3))
    for b in (0, 17, 49):  # each column is the metric of those very images, drawn with replacement
        rows = picks[b]
        assert boot[b, 0] == pytest.approx(label_scores(PREDS[rows], TARGETS[rows])["macro_f1"])
        assert boot[b, 1] == pytest.approx(label_scores(better[rows], TARGETS[rows])["macro_f1"])
    assert (boot[:, 1] >= boot[:, 0]).all()  # paired: the better one never loses on the same images


@pytest.mark.slow
def test_evaluate_compares_several_predictions_on_the_same_images(tmp_path):
    labels = tmp_path / "labels"
    labels.mkdir()
    stems = [f"{i:012d}" for i in range(40)]
    for i, stem in enumerate(stems):
        (labels / f"{stem}.cls").write_text(f"{i % 3}\n")
    right = {s: [i % 3] for i, s in enumerate(stems)}
    half_wrong = {s: [i % 3 if i % 2 else (i + 1) % 3] for i, s in enumerate(stems)}
    for name, preds in (("right", right), ("half", half_wrong)):
        (tmp_path / f"{name}.json").write_text(json.dumps(preds))
    rows = compare_predictions([tmp_path / "half.json", tmp_path / "right.json"], labels, draws=200)
    assert [r["macro_f1"] for r in rows] == [
        pytest.approx(evaluate(tmp_path / f"{n}.json", labels)["macro_f1"]) for n in ("half", "right")
    ]
    assert rows[0]["minus first"] is None
    assert rows[1]["minus first"] == pytest.approx(rows[1]["macro_f1"] - rows[0]["macro_f1"])
    assert rows[1]["minus first"] > 0
    assert rows[1]["higher in"] == "100% of resamples"
    low, high = (float(x) for x in rows[1]["95% interval"].strip("[]").split(","))
    assert 0 < low <= rows[1]["minus first"] <= high
    # the command line, quoted as make evaluate PRED=a,b quotes it
    result = subprocess.run(
        [sys.executable, "-m", "coco_multilabel.evaluate",
         f"predictions='{tmp_path / 'half.json'},{tmp_path / 'right.json'}'", f"labels={labels}",
         f"cache_dir={tmp_path / 'cache'}"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "2 predictions of the same images" in result.stdout and "100% of resamples" in result.stdout
