import pytest
import torch
from torchmetrics.functional.classification import multilabel_f1_score

from coco_multilabel.callbacks.thresholds import best_global_threshold
from coco_multilabel.evaluate import evaluate
from coco_multilabel.metrics import hard_scores, macro_f1_at


def test_hand_computed_scores_count_absent_classes_as_zero(tmp_path):
    # class 0: tp 2 -> P 1, R 1, F1 1; class 1: fp 1, fn 1 -> 0; class 2: tp 1, fp 1 -> P 1/2, R 1, F1 2/3;
    # the other 77 classes are absent from labels and predictions and count as 0.
    truth = {"a": [0, 1], "b": [0], "c": [2], "d": []}
    preds = {"a": [0], "b": [0, 1], "c": [2], "d": [2]}
    labels = tmp_path / "labels"
    labels.mkdir()
    for stem, classes in truth.items():
        (labels / f"{stem}.cls").write_text("".join(f"{c}\n" for c in classes))
    (tmp_path / "pred.json").write_text(__import__("json").dumps(preds))
    scores = evaluate(tmp_path / "pred.json", labels)
    assert scores["f1_macro"] == pytest.approx((1 + 0 + 2 / 3) / 80)
    assert scores["precision_macro"] == pytest.approx((1 + 0 + 0.5) / 80)
    assert scores["recall_macro"] == pytest.approx((1 + 0 + 1) / 80)
    assert scores["f1_micro"] == pytest.approx(2 * 3 / (2 * 3 + 2 + 1))  # tp 3, fp 2, fn 1


def test_macro_f1_grid_matches_torchmetrics():
    generator = torch.Generator().manual_seed(0)
    probs = torch.rand(50, 6, generator=generator)
    targets = (torch.rand(50, 6, generator=generator) < 0.3).long()
    grid = torch.tensor([0.1, 0.5, 0.8])
    ours = macro_f1_at(probs, targets, grid)
    for t, score in zip(grid, ours, strict=True):
        expected = multilabel_f1_score(probs, targets, num_labels=6, threshold=float(t), average="macro")
        assert score == pytest.approx(float(expected), abs=1e-6)


def test_tuner_recovers_the_known_best_threshold():
    # positives score 0.35..0.45, negatives 0.05..0.25: every cut in (0.25, 0.35) is perfect
    generator = torch.Generator().manual_seed(0)
    targets = (torch.rand(400, 5, generator=generator) < 0.4).long()
    noise = torch.rand(400, 5, generator=generator) * 0.1
    probs = torch.where(targets.bool(), 0.35 + noise, 0.05 + 2 * noise)
    threshold, score = best_global_threshold(probs, targets, torch.linspace(0.02, 0.98, 97))
    assert 0.25 <= threshold < 0.35 and score == pytest.approx(1.0)
    assert hard_scores((probs > 0.5).long(), targets)["f1_macro"] == 0.0  # 0.5 would miss everything
