"""make data: the challenge archive unpacked into place, with or without a folder around the data."""

import zipfile

import pytest

from coco_multilabel.data.checks import check_data
from coco_multilabel.data.synthetic import make_dataset
from coco_multilabel.errors import UserError
from coco_multilabel.unpack import main, unpack


@pytest.fixture(scope="module")
def small_root(tmp_path_factory):
    root = make_dataset(tmp_path_factory.mktemp("small"), n_train=4, n_test=2, size=32)
    for hidden in (root / "labels" / "test").iterdir():  # the challenge ships no test labels
        hidden.unlink()
    (root / "labels" / "test").rmdir()
    return root


def zip_of(root, path, top: str = "", compression=zipfile.ZIP_DEFLATED, extra=()):
    with zipfile.ZipFile(path, "w", compression) as zf:
        for file in sorted(root.rglob("*")):
            zf.write(file, top + file.relative_to(root).as_posix())
        for name in extra:
            zf.writestr(name, b"junk")
    return path


@pytest.mark.parametrize("top", ["", "ms-coco/"])
def test_the_data_root_is_unpacked_whether_or_not_a_folder_wraps_it(small_root, tmp_path, top):
    archive = zip_of(small_root, tmp_path / "ms-coco.zip", top, extra=[f"__MACOSX/{top}images/._x.jpg"])
    destination = unpack(archive, tmp_path / "data" / "ms-coco", progress=False)
    assert sorted(p.name for p in destination.iterdir()) == ["images", "labels"]
    assert len(list((destination / "images" / "train").iterdir())) == 4
    findings = check_data(destination)
    assert not findings.errors and findings.counts["images/train"] == 4
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["ms-coco"]  # no temporary left


def test_missing_corrupt_or_truncated_archives_are_clear_errors_and_leave_nothing(small_root, tmp_path):
    destination = tmp_path / "data" / "ms-coco"
    with pytest.raises(UserError, match="does not exist; download ms-coco.zip"):
        unpack(tmp_path / "nowhere.zip", destination)
    (tmp_path / "junk.zip").write_bytes(b"not a zip at all")
    with pytest.raises(UserError, match="is not a complete zip archive"):
        unpack(tmp_path / "junk.zip", destination)
    whole = zip_of(small_root, tmp_path / "whole.zip").read_bytes()
    (tmp_path / "cut.zip").write_bytes(whole[: len(whole) // 2])  # a download cut short
    with pytest.raises(UserError, match="is not a complete zip archive"):
        unpack(tmp_path / "cut.zip", destination)
    stored = zip_of(small_root, tmp_path / "stored.zip", compression=zipfile.ZIP_STORED).read_bytes()
    at = stored.index(b"\xff\xd8\xff") + 100  # inside the first image: its CRC no longer matches
    (tmp_path / "flipped.zip").write_bytes(stored[:at] + bytes([stored[at] ^ 0xFF]) + stored[at + 1 :])
    with pytest.raises(UserError, match="is not a complete zip archive"):
        unpack(tmp_path / "flipped.zip", destination)
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").iterdir())


def test_an_existing_data_root_is_never_overwritten(small_root, tmp_path, caplog):
    archive = zip_of(small_root, tmp_path / "ms-coco.zip")
    (tmp_path / "ms-coco").mkdir()
    (tmp_path / "ms-coco" / "mine.txt").write_text("keep me")
    with pytest.raises(SystemExit) as exit_info:
        main([str(archive), str(tmp_path / "ms-coco")])
    assert exit_info.value.code == 2 and "already holds files" in caplog.text
    assert [p.name for p in (tmp_path / "ms-coco").iterdir()] == ["mine.txt"]
