import os

import numpy as np
import pytest

from coco_multilabel.data.label_index import index_file, load_label_index
from coco_multilabel.errors import UserError


@pytest.fixture
def label_dir(tmp_path):
    folder = tmp_path / "labels"
    folder.mkdir()
    for i, classes in enumerate([[0, 5], [79], [], [3]]):
        (folder / f"{i:012d}.cls").write_text("".join(f"{c}\n" for c in classes))
    return folder


def test_index_holds_every_file_and_is_reused_while_nothing_changes(label_dir, tmp_path):
    first = load_label_index(label_dir, tmp_path / "cache")
    assert first.parsed == 4 and index_file(label_dir, tmp_path / "cache").is_file()
    assert first.stems.tolist() == [f"{i:012d}" for i in range(4)]
    assert first.targets.dtype == bool and first.targets.shape == (4, 80)
    assert first.classes() == {"000000000000": [0, 5], "000000000001": [79], "000000000002": [],
                               "000000000003": [3]}  # fmt: skip
    again = load_label_index(label_dir, tmp_path / "cache")
    assert again.parsed == 0
    assert np.array_equal(again.targets, first.targets) and again.stems.tolist() == first.stems.tolist()
    assert again.targets_of(["000000000003", "000000000000"]).nonzero()[1].tolist() == [3, 0, 5]


def test_a_changed_added_or_removed_label_file_is_parsed_again(label_dir, tmp_path):
    cache = tmp_path / "cache"
    load_label_index(label_dir, cache)
    changed = label_dir / "000000000001.cls"
    stat = changed.stat()
    changed.write_text("7\n")  # same size: only the modification time tells
    os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    index = load_label_index(label_dir, cache)
    assert index.parsed == 1 and index.classes()["000000000001"] == [7]
    (label_dir / "000000000009.cls").write_text("1\n2\n")
    (label_dir / "000000000000.cls").unlink()
    index = load_label_index(label_dir, cache)
    assert index.parsed == 1
    assert index.stems.tolist() == ["000000000001", "000000000002", "000000000003", "000000000009"]
    assert index.classes()["000000000009"] == [1, 2]
    assert load_label_index(label_dir, cache).parsed == 0  # the removal was written too


def test_a_bad_label_file_is_refused_and_a_damaged_index_rebuilt(label_dir, tmp_path):
    cache = tmp_path / "cache"
    load_label_index(label_dir, cache)
    index_file(label_dir, cache).write_bytes(b"not an npz")
    assert load_label_index(label_dir, cache).parsed == 4
    (label_dir / "000000000002.cls").write_text("cat\n")
    with pytest.raises(UserError, match=r"000000000002.cls, line 1: 'cat' is not a class index"):
        load_label_index(label_dir, cache)
    (label_dir / "000000000002.cls").write_text("")
    with pytest.raises(UserError, match="no label file for image 000000000042"):
        load_label_index(label_dir, None).targets_of(["000000000042"])
