import pytest
import torch
from torchmetrics.functional.classification import multilabel_f1_score

from coco_multilabel.callbacks.thresholds import ThresholdTuner
from coco_multilabel.decisions.thresholds import (
    GRID,
    count_table,
    cross_fit,
    decide,
    evaluate_thresholds,
    halves,
    objective_of,
    score_at,
    tune_global,
    tune_per_class,
)
from coco_multilabel.metrics import class_counts


def separable(n=400, classes=5, low=0.05, gap=(0.35, 0.45), seed=0):
    """Positives score in ``gap``, negatives below 0.25: any cut in (0.25, gap[0]) is perfect."""
    generator = torch.Generator().manual_seed(seed)
    targets = (torch.rand(n, classes, generator=generator) < 0.4).long()
    noise = torch.rand(n, classes, generator=generator)
    probs = torch.where(targets.bool(), gap[0] + (gap[1] - gap[0]) * noise, low + 0.2 * noise)
    return probs, targets


def test_grid_scores_match_torchmetrics():
    probs, targets = separable()
    probs = probs + 0.3 * torch.rand(probs.shape, generator=torch.Generator().manual_seed(1))
    scores = objective_of(count_table(probs, targets), "macro_f1")
    for i in (10, 40, 70):
        expected = multilabel_f1_score(
            probs, targets, num_labels=5, threshold=float(GRID[i]), average="macro"
        )
        assert float(scores[i]) == pytest.approx(float(expected), abs=1e-6)


@pytest.mark.parametrize("objective", ["macro_f1", "cf1", "micro_f1"])
def test_global_tuning_recovers_the_known_best_threshold(objective):
    probs, targets = separable()
    tuning = tune_global(probs, targets, objective)
    assert 0.25 <= tuning.global_threshold < 0.35 and tuning.score == pytest.approx(1.0)
    assert score_at(probs, targets, torch.tensor(0.5), objective) == 0.0  # 0.5 would miss everything


@pytest.mark.parametrize("objective", ["macro_f1", "cf1", "micro_f1"])
def test_per_class_tuning_finds_each_class_its_own_cut(objective):
    low, targets_low = separable(classes=1, gap=(0.35, 0.45), seed=2)  # best cut in (0.25, 0.35)
    high, targets_high = separable(classes=1, low=0.55, gap=(0.9, 0.95), seed=3)  # best cut in (0.75, 0.9)
    probs, targets = torch.cat([low, high], 1), torch.cat([targets_low, targets_high], 1)
    assert tune_global(probs, targets, objective).score < 1.0  # no single cut separates both
    tuning = tune_per_class(probs, targets, objective, min_positives=1, shrinkage=0.0)
    assert 0.25 <= tuning.thresholds[0] < 0.35 and 0.75 <= tuning.thresholds[1] < 0.9
    assert tuning.score == pytest.approx(1.0)


def test_per_class_thresholds_shrink_toward_the_global_one():
    probs, targets = separable(classes=1, low=0.55, gap=(0.9, 0.95), seed=3)
    glob = tune_global(probs, targets).global_threshold
    raw = float(tune_per_class(probs, targets, shrinkage=0.0).thresholds[0])
    n = int(targets.sum())
    shrunk = float(tune_per_class(probs, targets, shrinkage=n).thresholds[0])  # k = n: half way
    assert shrunk == pytest.approx((raw + glob) / 2, abs=1e-5)


def test_rare_classes_keep_the_global_threshold():
    probs, targets = separable(classes=3, seed=4)
    targets[:, 2] = 0
    targets[:3, 2] = 1  # 3 positives, fewer than min_positives
    probs[:3, 2] = 0.99
    tuning = tune_per_class(probs, targets, min_positives=5)
    assert float(tuning.thresholds[2]) == pytest.approx(tuning.global_threshold)


def test_cross_fitting_never_tunes_and_scores_on_the_same_sample():
    n = 101
    ids = torch.arange(n, dtype=torch.float).unsqueeze(1)  # column 0 identifies each sample
    probs, targets = torch.cat([ids, torch.rand(n, 2)], 1), torch.zeros(n, 3)
    seen = []

    def tune_fn(p, t):
        seen.append(("tune", set(p[:, 0].tolist())))
        return torch.full((3,), 0.5)

    def score_fn(p, t, thresholds):
        seen.append(("score", set(p[:, 0].tolist())))
        return float(len(p))

    assert cross_fit(probs, targets, tune_fn, score_fn) == pytest.approx(n / 2)
    (_, tune_a), (_, score_a), (_, tune_b), (_, score_b) = seen
    assert not tune_a & score_a and not tune_b & score_b
    assert tune_a | score_a == set(range(n)) and tune_a == score_b and tune_b == score_a


def test_tuner_refuses_unknown_settings():
    with pytest.raises(ValueError, match="objective"):
        ThresholdTuner(objective="accuracy")
    with pytest.raises(ValueError, match="mode"):
        ThresholdTuner(mode="per_image")


def _gather_on_rank(rank: int, init_file: str, shards: list, out: str) -> None:
    import torch.distributed as dist
    from lightning.fabric.utilities.distributed import _all_gather_ddp_if_available

    from coco_multilabel.callbacks.thresholds import gather_by_index

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    probs, targets = separable(n=41, classes=4, seed=5)
    probs = probs + 0.3 * torch.rand(probs.shape, generator=torch.Generator().manual_seed(6))
    mine = torch.tensor(shards[rank])
    gathered = gather_by_index(_all_gather_ddp_if_available, probs[mine], targets[mine].float(), mine)
    if rank == 0:
        torch.save(gathered, out)
    dist.destroy_process_group()


@pytest.mark.slow
def test_thresholds_from_two_ranks_with_uneven_shards_equal_the_single_process_ones(tmp_path):
    import torch.multiprocessing as mp

    from coco_multilabel.callbacks.thresholds import gather_by_index

    # a DistributedSampler's shards of 41 samples: 21 each, rank 1 padded with sample 0; rank 0
    # could not read samples 6 and 10 (on_bad_image=skip), so it holds 19 rows and rank 1 21
    shards = [[i for i in range(0, 41, 2) if i not in (6, 10)], [*range(1, 41, 2), 0]]
    out = tmp_path / "gathered.pt"
    mp.spawn(_gather_on_rank, args=(str(tmp_path / "init"), shards, str(out)), nprocs=2, join=True)
    probs, targets, indices = torch.load(out)
    expected_probs, expected_targets = separable(n=41, classes=4, seed=5)
    expected_probs += 0.3 * torch.rand(expected_probs.shape, generator=torch.Generator().manual_seed(6))
    kept = torch.tensor([i for i in range(41) if i not in (6, 10)])
    assert torch.equal(probs, expected_probs[kept]) and torch.equal(targets, expected_targets[kept].float())
    assert torch.equal(indices, kept)
    backwards = kept.flip(0)  # one process, rows in any order: the same rows, in dataset order
    single = gather_by_index(
        lambda t: t, expected_probs[backwards], expected_targets[backwards].float(), backwards
    )
    assert torch.equal(single[0], probs) and torch.equal(single[1], targets)
    ddp, one = (
        evaluate_thresholds(p, t, "per_class", "macro_f1", min_labels=1)
        for p, t in ((probs, targets), single[:2])
    )
    assert torch.equal(ddp.pop("tuning").thresholds, one.pop("tuning").thresholds) and ddp == one


def top_hidden(n=300, classes=4, seed=7):
    """Every image's most likely class is one of its labels, but often under 0.3, while negatives
    elsewhere reach 0.45: thresholds alone must cut low and take false positives; with the most
    likely class forced, a high cut keeps the forced hits and drops the negatives."""
    generator = torch.Generator().manual_seed(seed)
    targets = torch.zeros(n, classes)
    first = torch.randint(classes, (n,), generator=generator)
    targets[torch.arange(n), first] = 1
    probs = 0.05 * torch.rand(n, classes, generator=generator)
    probs[torch.arange(n), first] = 0.2 + 0.08 * torch.rand(n, generator=generator)
    noisy = torch.rand(n, generator=generator) < 0.3  # some images' top class is confident
    probs[noisy, first[noisy]] = 0.6
    decoys = torch.rand(n, generator=generator) < 0.15  # a negative on another image, near 0.2-0.45
    other = (first + 1) % classes
    probs[decoys, other[decoys]] = 0.15 + 0.3 * torch.rand(int(decoys.sum()), generator=generator)
    probs[decoys, first[decoys]] = 0.5  # ... where the true class still comes first
    return probs, targets


@pytest.mark.parametrize("min_labels", [0, 1, 2])
def test_the_count_table_counts_the_rule_submit_applies(min_labels):
    probs, targets = separable(n=97, classes=6, seed=8)
    probs = probs + 0.4 * torch.rand(probs.shape, generator=torch.Generator().manual_seed(9))
    probs[:20] = GRID[
        torch.randint(0, len(GRID), (20, 6), generator=torch.Generator().manual_seed(3))
    ]  # ties
    expected = torch.stack([class_counts(decide(probs, float(t), min_labels), targets) for t in GRID])
    assert torch.equal(count_table(probs, targets, min_labels=min_labels), expected)


def test_min_labels_changes_the_tuned_threshold_and_every_figure_scores_it():
    probs, targets = top_hidden()
    alone, forced = (tune_global(probs, targets, "macro_f1", min_labels=m) for m in (0, 1))
    assert alone.global_threshold < 0.3 < forced.global_threshold  # forcing the top class moves the cut
    assert forced.score > alone.score
    for m, tuning in ((0, alone), (1, forced)):
        figures = evaluate_thresholds(probs, targets, "global", "macro_f1", min_labels=m)
        assert figures["tuning"].global_threshold == tuning.global_threshold
        assert figures["macro_f1_tuned"] == pytest.approx(
            score_at(probs, targets, tuning.thresholds, "macro_f1", m)
        )
        assert figures["macro_f1"] == pytest.approx(
            score_at(probs, targets, torch.tensor(0.5), "macro_f1", m)
        )
    with pytest.raises(TypeError):  # no figure without saying which rule it scores
        evaluate_thresholds(probs, targets, "global", "macro_f1")


def test_cross_fitting_halves_keep_a_rare_class_in_both():
    targets = torch.zeros(40, 3)
    targets[:, 0] = 1
    targets[torch.arange(0, 40, 3), 1] = 1
    targets[[5, 23], 2] = 1  # two positives: a random half would hold both one time in two
    for seed in range(20):
        first, second = halves(targets, seed)
        assert sorted(torch.cat([first, second]).tolist()) == list(range(40))
        assert abs(len(first) - len(second)) <= 1
        assert targets[first].sum(0).min() >= 1 and targets[second].sum(0).min() >= 1
    assert not torch.equal(halves(targets, 0)[0], halves(targets, 1)[0])  # the seed draws them
