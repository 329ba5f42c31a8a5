import pytest
import torch
from torch.nn import functional as F

from coco_multilabel.models.losses import AsymmetricLoss, PositiveWeightedBCE


@pytest.fixture
def batch():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 80, generator=generator) * 3
    targets = (torch.rand(16, 80, generator=generator) < 0.1).float()
    return logits, targets


def test_asl_without_focusing_or_clip_is_bce_summed_over_classes(batch):
    logits, targets = batch
    asl = AsymmetricLoss(gamma_neg=0, gamma_pos=0, clip=0)(logits, targets)
    assert asl == pytest.approx(float(F.binary_cross_entropy_with_logits(logits, targets) * 80), rel=1e-5)


def test_asl_ignores_easy_negatives_and_down_weights_the_rest():
    targets = torch.zeros(1, 2)
    logits = torch.logit(torch.tensor([[0.03, 0.6]]))  # an easy negative (p < clip) and a hard one
    loss = AsymmetricLoss(gamma_neg=4, gamma_pos=0, clip=0.05)
    gradient = torch.autograd.functional.jacobian(lambda x: loss(x, targets), logits)
    assert gradient[0, 0] == 0  # below the clip: no gradient at all
    assert 0 < gradient[0, 1] < torch.sigmoid(logits[0, 1])  # BCE's gradient would be p itself


def test_positive_weights_follow_class_frequency():
    targets = torch.zeros(100, 3)
    targets[:50, 0] = 1  # f = 0.5: weight 1
    targets[:10, 1] = 1  # f = 0.1: weight 9 ** power
    loss = PositiveWeightedBCE(num_classes=3, power=1.0, max_weight=5.0)
    loss.fit_class_frequencies(targets)  # class 2 never seen: capped
    assert loss.pos_weight.tolist() == pytest.approx([1.0, 5.0, 5.0])
    loss = PositiveWeightedBCE(num_classes=3, power=0.5, max_weight=100)
    loss.fit_class_frequencies(targets)
    assert loss.pos_weight[:2].tolist() == pytest.approx([1.0, 3.0])
    logits = torch.zeros(100, 3)
    expected = F.binary_cross_entropy_with_logits(logits, targets, pos_weight=loss.pos_weight)
    assert loss(logits, targets) == pytest.approx(float(expected))
