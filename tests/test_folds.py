"""Cross-validation folds: an exact, seeded, order-independent partition that spreads every class."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coco_multilabel.bench.holdout import hold_out
from coco_multilabel.data.datamodule import CocoDataModule
from coco_multilabel.data.folds import load_or_make_folds, make_folds, repair, stratified_folds
from coco_multilabel.errors import UserError


def random_labels(rng: np.random.Generator, n: int, c: int = 80) -> dict[str, list[int]]:
    """COCO-like label sets: class frequencies from very common to a handful, 0-6 classes per image."""
    popularity = rng.power(0.3, c) + 1e-3
    labels = {}
    for i in range(n):
        size = int(rng.integers(0, 7))
        labels[f"{rng.integers(10**11):012d}_{i}"] = sorted(
            set(rng.choice(c, size=size, p=popularity / popularity.sum()).tolist())
        )
    return labels


def as_fold_of(record: dict) -> dict[str, int]:
    return {s: j for j, part in enumerate(record["folds"]) for s in part}


def assert_spread(labels: dict[str, list[int]], record: dict, k: int) -> None:
    """Every class with >= k images has at least one in every fold."""
    fold = as_fold_of(record)
    counts = np.zeros((k, 80), dtype=int)
    for stem, classes in labels.items():
        counts[fold[stem], classes] += 1
    spread = counts.sum(0) >= k
    assert (counts[:, spread] >= 1).all(), np.flatnonzero(spread & (counts == 0).any(0))


label_sets = st.dictionaries(
    st.text("0123456789", min_size=3, max_size=8),
    st.lists(st.integers(0, 11), max_size=4, unique=True),
    min_size=6,
    max_size=60,
)


@settings(max_examples=60, deadline=None)
@given(labels=label_sets, k=st.integers(2, 6), seed=st.integers(0, 3))
def test_folds_partition_the_stems_exactly_and_independently_of_their_order(labels, k, seed):
    k = min(k, len(labels))
    record = make_folds(labels, k, seed)
    stems = [s for part in record["folds"] for s in part]
    assert sorted(stems) == sorted(labels) and len(stems) == len(set(stems))  # complete, disjoint
    assert len(record["folds"]) == k and all(record["folds"])  # no empty fold
    reordered = dict(reversed(list(labels.items())))
    assert make_folds(reordered, k, seed) == record
    assert make_folds(labels, k, seed) == record  # seeded: the same draw again


@settings(max_examples=80, deadline=None)
@given(
    main=st.lists(st.integers(0, 7), min_size=8, max_size=60),
    rare=st.lists(st.lists(st.integers(8, 15), max_size=2, unique=True), min_size=60, max_size=60),
    k=st.integers(2, 5),
    seed=st.integers(0, 3),
)
def test_every_class_with_k_images_is_in_every_fold_when_each_image_has_one_such_class(main, rare, k, seed):
    """The repair's guarantee: no image holds two classes of >= k images, so moves always exist.
    Classes 8-15 are added with few images each; only those that reach k images must be spread."""
    labels = {f"{i:04d}": [m] for i, m in enumerate(main)}
    counts = np.bincount(main, minlength=16)
    for i, extra in enumerate(rare[: len(main)]):
        for c in extra:
            if counts[c] + 1 < k:  # stays below k: no image gets a second class of >= k images
                labels[f"{i:04d}"].append(c)
                counts[c] += 1
    record = make_folds(labels, k, seed)
    assert_spread(labels, record, k)


def test_coco_like_labels_spread_every_class_and_keep_folds_balanced():
    rng = np.random.default_rng(0)
    for trial in range(6):
        labels = random_labels(rng, int(rng.integers(100, 600)))
        for k in (3, 5):
            record = make_folds(labels, k, seed=trial)
            assert_spread(labels, record, k)
            sizes = [len(p) for p in record["folds"]]
            assert max(sizes) - min(sizes) <= 0.1 * len(labels) / k + 2, sizes


def test_the_seed_draws_other_folds():
    labels = random_labels(np.random.default_rng(1), 200)
    assert make_folds(labels, 5, seed=0)["folds"] != make_folds(labels, 5, seed=1)["folds"]


def test_the_repair_fills_a_fold_that_lacks_a_class_and_keeps_the_others_covered():
    labels = np.zeros((6, 3), dtype=bool)
    labels[[0, 1, 2], 0] = True  # class 0: three images, all in fold 0
    labels[[3, 4, 5], 1] = True
    fold = np.array([0, 0, 0, 1, 1, 0])
    fixed = repair(labels, fold.copy(), 2)
    assert set(fixed[labels[:, 0]]) == {0, 1} and set(fixed[labels[:, 1]]) == {0, 1}


def test_labels_that_admit_no_spread_folds_still_give_a_partition(caplog):
    # three classes of two images each, in a triangle: with two folds one class must share a fold
    labels = np.array([[1, 1, 0], [0, 1, 1], [1, 0, 1]], dtype=bool)
    fold = stratified_folds(labels, 2, seed=0)
    assert sorted(set(fold.tolist())) == [0, 1]
    assert "could not be put in every one of 2 folds" in caplog.text


def test_too_many_folds_are_refused():
    with pytest.raises(UserError, match="data.folds must be between 2"):
        make_folds({"a": [0], "b": [1]}, 3, 0)


def test_the_folds_file_is_written_once_and_reused(tmp_path):
    labels = random_labels(np.random.default_rng(2), 50)
    path = tmp_path / "cv" / "folds.json"
    first = load_or_make_folds(path, lambda: labels, 3, seed=0)
    assert json.loads(path.read_text()) == first
    again = load_or_make_folds(path, lambda: pytest.fail("the file is read, not redrawn"), 3, seed=7)
    assert again == first
    with pytest.raises(UserError, match="holds 3 folds, but data.folds=4"):
        load_or_make_folds(path, lambda: labels, 4, seed=0)


def test_the_datamodule_trains_on_the_other_folds_and_validates_on_its_own(tiny_root, tmp_path):
    folds_file = tmp_path / "folds.json"

    def datamodule(fold: int, run: int):
        split_file = str(tmp_path / f"{run}" / "split.json")
        return CocoDataModule(root=str(tiny_root), image_size=32, num_workers=0, folds=3, fold=fold,
                              folds_file=str(folds_file), split_file=split_file)  # fmt: skip

    splits = []
    for fold in range(3):
        dm = datamodule(fold, fold)
        dm.setup("fit")
        splits.append(dm.split)
        assert json.loads((tmp_path / f"{fold}" / "split.json").read_text()) == dm.split
        assert not set(dm.split["train"]) & set(dm.split["val"])
        assert dm.split["fold"] == fold and len(dm.val_images) == len(dm.split["val"])
    vals = [s for split in splits for s in split["val"]]
    assert sorted(vals) == sorted(splits[0]["train"] + splits[0]["val"]) and len(vals) == 48
    assert len({split["folds_digest"] for split in splits}) == 1
    # resuming fold 1 with another fold asked for is refused
    dm = datamodule(2, 1)
    with pytest.raises(UserError, match="is the split of data.folds=3 data.fold=1"):
        dm.setup("fit")


def test_a_held_out_fold_becomes_a_labelled_test_set_of_links(tiny_root, tmp_path):
    labels = {
        p.stem: [int(x) for x in p.read_text().split()]
        for p in (tiny_root / "labels" / "train").glob("*.cls")
    }
    folds = make_folds(labels, 3, seed=0)
    (tmp_path / "folds.json").write_text(json.dumps(folds))
    out = tmp_path / "held"
    counts = hold_out(tiny_root, tmp_path / "folds.json", 1, out)
    train = {p.stem for p in (out / "images" / "train").iterdir()}
    test = {p.stem for p in (out / "images" / "test").iterdir()}
    assert test == set(folds["folds"][1]) == {p.stem for p in (out / "test-labels").iterdir()}
    assert train == set(labels) - test == {p.stem for p in (out / "labels" / "train").iterdir()}
    assert counts == {"train": len(train), "test": len(test)}
    stem = sorted(test)[0]
    link = out / "test-labels" / f"{stem}.cls"
    assert (
        link.is_symlink() and link.read_text() == (tiny_root / "labels" / "train" / f"{stem}.cls").read_text()
    )
    with pytest.raises(UserError, match="exists"):
        hold_out(tiny_root, tmp_path / "folds.json", 0, out)
    folds["folds"][0].append("000000999999")  # drawn on other data
    (tmp_path / "other.json").write_text(json.dumps(folds))
    with pytest.raises(UserError, match="drawn on other data"):
        hold_out(tiny_root, tmp_path / "other.json", 0, tmp_path / "other")
    assert not (tmp_path / "other").exists() and not list(tmp_path.glob(".other*"))
