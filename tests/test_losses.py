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


def paper_asl(logits, targets, gamma_neg=4.0, gamma_pos=0.0, clip=0.05, eps=1e-8):
    """This project's own ASL before it took timm's, as the paper writes it: the reference."""
    p = torch.sigmoid(logits.float())
    p_neg = (p - clip).clamp(min=0) if clip > 0 else p
    log_pos = torch.log(p.clamp(min=eps)) * (1 - p) ** gamma_pos
    log_neg = torch.log((1 - p_neg).clamp(min=eps)) * p_neg**gamma_neg
    return -(targets * log_pos + (1 - targets) * log_neg).sum() / len(logits)


@pytest.mark.parametrize(
    ("gamma_neg", "gamma_pos", "clip"), [(4, 0, 0.05), (4, 1, 0.05), (2, 0, 0), (0, 0, 0)]
)
def test_timms_asl_equals_ours_in_value_and_gradient(gamma_neg, gamma_pos, clip):
    """loss=asl is timm's AsymmetricLossMultiLabel; it computes what this project's ASL did."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from coco_multilabel.cli import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        overrides = [
            "loss=asl",
            f"loss.gamma_neg={gamma_neg}",
            f"loss.gamma_pos={gamma_pos}",
            f"loss.clip={clip}",
        ]
        cfg = compose("train", overrides=overrides)
    timm_loss = instantiate(cfg.loss)
    assert type(timm_loss).__module__.startswith("timm.")
    generator = torch.Generator().manual_seed(gamma_neg + gamma_pos)
    logits = (torch.randn(16, 80, generator=generator) * 6).requires_grad_()  # saturated ones too
    targets = (torch.rand(16, 80, generator=generator) < 0.05).float()
    for loss in (timm_loss, AsymmetricLoss(gamma_neg, gamma_pos, clip)):
        ours, theirs = paper_asl(logits, targets, gamma_neg, gamma_pos, clip), loss(logits, targets)
        torch.testing.assert_close(theirs, ours, rtol=1e-6, atol=1e-5)
        (grad_ours,) = torch.autograd.grad(ours, logits)
        (grad_theirs,) = torch.autograd.grad(theirs, logits)
        torch.testing.assert_close(grad_theirs, grad_ours, rtol=1e-5, atol=1e-7)
