import json

import numpy as np
import pytest
import torch

from coco_multilabel.data.datamodule import CocoDataModule
from coco_multilabel.data.datasets import CocoImages, check_data_root, labelled_stems
from coco_multilabel.data.split import make_split
from coco_multilabel.errors import UserError

STEMS = [f"{i:012d}" for i in range(100)]


def test_split_is_deterministic_disjoint_and_complete():
    a, b = make_split(STEMS, 0.2, seed=1), make_split(list(reversed(STEMS)), 0.2, seed=1)
    assert a == b  # independent of listing order
    assert len(a["val"]) == 20 and not set(a["train"]) & set(a["val"])
    assert sorted(a["train"] + a["val"]) == STEMS
    assert make_split(STEMS, 0.2, seed=2)["val"] != a["val"]


def test_split_file_is_written_then_reused(tiny_root, tmp_path):
    split_file = tmp_path / "split.json"
    first = CocoDataModule(root=str(tiny_root), image_size=32, num_workers=0, split_file=str(split_file))
    first.setup("fit")
    saved = json.loads(split_file.read_text())
    assert saved["val"] == first.split["val"]
    # another seed and fraction: the run's own split wins, as on resume
    again = CocoDataModule(root=str(tiny_root), image_size=32, num_workers=0, seed=99, val_fraction=0.5,
                           split_file=str(split_file))  # fmt: skip
    again.setup("fit")
    assert again.split == first.split


def test_batches_have_images_and_multi_hot_targets(tiny_root):
    dm = CocoDataModule(root=str(tiny_root), image_size=32, batch_size=4, num_workers=0)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    images, targets, kept = batch["images"], batch["targets"], batch["kept"]
    assert kept.tolist() == [True] * 4
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.uint8  # the model normalises
    assert targets.shape == (4, 80) and set(targets.unique().tolist()) <= {0.0, 1.0}
    assert (targets.sum(1) >= 1).all()  # every synthetic image holds at least one object


def test_labelled_dataset_matches_label_files(tiny_root):
    stem = labelled_stems(tiny_root)[0]
    classes = [int(line) for line in (tiny_root / "labels" / "train" / f"{stem}.cls").read_text().split()]
    target = CocoImages.labelled(tiny_root, [stem])[0]["targets"]
    assert torch.nonzero(target).flatten().tolist() == sorted(classes)


def test_missing_or_wrong_data_root_says_what_to_put_there(tmp_path):
    with pytest.raises(UserError, match="data.root is not set.*images/train"):
        check_data_root(None)
    with pytest.raises(UserError, match=f"{tmp_path}/images/train is not a folder"):
        check_data_root(tmp_path)


def test_setup_reads_labels_from_the_index_into_numpy_arrays(tiny_root, tmp_path, monkeypatch):
    import coco_multilabel.data.label_index as label_index

    parsed = []
    real = label_index.read_label_file
    monkeypatch.setattr(label_index, "read_label_file", lambda *a: parsed.append(a) or real(*a))
    for _ in range(2):
        dm = CocoDataModule(root=str(tiny_root), image_size=32, num_workers=0, cache_dir=str(tmp_path))
        dm.setup("fit")
    assert len(parsed) == 48  # the first setup parsed every file, the second none
    train = dm.train_images
    assert train.targets.dtype == bool and train.targets.shape == (len(train), 80)
    assert isinstance(train.names, np.ndarray) and train.folder == tiny_root / "images" / "train"
    stem = dm.split["train"][0]
    classes = [int(line) for line in (tiny_root / "labels" / "train" / f"{stem}.cls").read_text().split()]
    assert np.flatnonzero(train.targets[0]).tolist() == sorted(classes)
