"""Bad input a student can produce: each gets one line naming the file and the fix, in check-data
and in what train, submit, predict and evaluate read (load_rgb, list_images, the label readers)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from coco_multilabel.data.checks import check_data
from coco_multilabel.data.datasets import labelled_stems, list_images
from coco_multilabel.data.images import image_problem, load_rgb
from coco_multilabel.data.labels import read_label_dir, read_label_file
from coco_multilabel.decisions.probabilities import read_probabilities
from coco_multilabel.errors import UserError
from coco_multilabel.models.backbones import _read_state_dict
from coco_multilabel.models.checkpoints import read_checkpoint
from coco_multilabel.predict import image_files


def photo(size=(96, 64), seed=0) -> bytes:
    arr = (np.random.default_rng(seed).random((size[1], size[0], 3)) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(arr).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture
def root(tmp_path):
    root = tmp_path / "data"
    for folder in ("images/train", "labels/train", "images/test"):
        (root / folder).mkdir(parents=True)
    for stem in ("a", "b"):
        (root / f"images/train/{stem}.jpg").write_bytes(photo())
        (root / f"labels/train/{stem}.cls").write_text("1\n")
    (root / "images/test/t.jpg").write_bytes(photo())
    return root


def test_a_jpeg_cut_short_and_closed_with_an_end_marker_is_found_by_full(root):
    data = photo((160, 120), seed=1)
    cut = root / "images/train/cut.jpg"
    cut.write_bytes(data[: len(data) // 2] + b"\xff\xd9")
    (root / "labels/train/cut.cls").write_text("2\n")
    Image.open(cut).load()  # Pillow itself decodes it without a word
    assert image_problem(cut) is None  # the header check cannot see it
    assert image_problem(cut, full=True) == "truncated"
    assert check_data(root, full=True).problems["truncated"] == ["images/train/cut.jpg"]
    flat = root / "images/train/flat.jpg"  # a flat image, but not the decoder's grey
    Image.new("RGB", (64, 64), (200, 30, 30)).save(flat)
    assert image_problem(flat, full=True) is None
    for stem in "ab":
        assert image_problem(root / f"images/train/{stem}.jpg", full=True) is None


@pytest.mark.parametrize("factor", [1.5, 3])  # Pillow warns above the limit, refuses above twice it
def test_decompression_bombs_are_refused_before_decoding(root, monkeypatch, factor):
    bomb = root / "images/train/bomb.jpg"
    Image.new("RGB", (200, 200)).save(bomb)
    (root / "labels/train/bomb.cls").write_text("3\n")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", int(200 * 200 / factor))
    with pytest.raises(UserError, match=r"bomb.jpg is too large to decode safely .*shrink it .*or delete it"):
        load_rgb(bomb)
    findings = check_data(root)
    assert findings.problems["too_large"] == ["images/train/bomb.jpg"]
    assert "images too large to decode" in findings.report()


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ("1\n2\n".encode("utf-16"), "UTF-16 text, not UTF-8"),  # with a byte-order mark
        ("1\n2\n".encode("utf-16-le"), "UTF-16 text, not UTF-8"),  # without: NULs between digits
        ("1\n# caf\xe9\n".encode("latin-1"), "not UTF-8 text .*Latin-1.*iconv -f LATIN1"),
    ],
)
def test_label_files_in_another_encoding_name_the_encoding_and_the_fix(root, data, expected):
    label = root / "labels/train/a.cls"
    label.write_bytes(data)
    with pytest.raises(UserError, match=f"a.cls is {expected}"):
        read_label_file(label)  # train, submit images=val and evaluate read labels through this
    with pytest.raises(UserError, match=expected):
        read_label_dir(root / "labels/train")
    (item,) = check_data(root).problems["not_utf8"]
    assert item.startswith("labels/train/a.cls (") and ("UTF-16" in item or "LATIN1" in item)


def test_folders_named_like_data_files_are_not_data(root):
    (root / "images/train/c.jpg").mkdir()
    (root / "labels/train/c.cls").write_text("4\n")
    (root / "labels/train/a.cls").unlink()
    (root / "labels/train/a.cls").mkdir()
    (root / "images/test/folder.jpg").mkdir()
    assert [p.name for p in list_images(root / "images/train")] == ["a.jpg", "b.jpg"]
    assert [p.name for p in list_images(root / "images/test")] == ["t.jpg"]  # what submit predicts
    assert labelled_stems(root) == ["b"]  # a.cls is a folder; c.jpg too
    assert list(read_label_dir(root / "labels/train")) == ["b", "c"]
    with pytest.raises(UserError, match="label file .*a.cls is a folder; remove or rename it"):
        read_label_file(root / "labels/train/a.cls")
    with pytest.raises(UserError, match="image .*c.jpg is a folder, not an image; rename or remove it"):
        load_rgb(root / "images/train/c.jpg")
    findings = check_data(root)
    assert "images/train/c.jpg/ (named like a data file: rename it)" in findings.problems["nested_folder"]
    assert "labels/train/a.cls/ (named like a data file: rename it)" in findings.problems["nested_folder"]
    assert findings.problems["image_without_label"][0].startswith("images/train/a.jpg")
    assert findings.problems["label_without_image"][0].startswith("labels/train/c.cls")
    with pytest.raises(UserError, match="holds no image file"):
        image_files(root / "images/test/folder.jpg")  # predict on it: an empty folder


def test_files_that_are_folders_or_pickles_where_tensors_belong(tmp_path):
    with pytest.raises(UserError, match=r"checkpoint .*ckpt_dir is a folder; pass the .ckpt file in it"):
        (tmp_path / "ckpt_dir").mkdir()
        read_checkpoint(tmp_path / "ckpt_dir")

    class Payload:
        def __reduce__(self):
            return print, ("ran",)

    for name, reader, what in [
        ("p.probs.pt", read_probabilities, "probabilities file"),
        ("w.pth", _read_state_dict, "weights file"),
        ("c.ckpt", read_checkpoint, "checkpoint"),
    ]:
        torch.save({"probs": Payload()}, tmp_path / name)
        with pytest.raises(UserError, match=f"{what} .*{name} holds pickled objects.*GLOBAL .*print"):
            reader(str(tmp_path / name))


def test_a_predictions_file_in_another_encoding_or_a_folder_says_so(tmp_path):
    from coco_multilabel.decisions.submission import parse_submission_file

    (tmp_path / "utf16.json").write_bytes('{"a": [1]}'.encode("utf-16"))
    with pytest.raises(UserError, match="utf16.json is UTF-16 text, not UTF-8 .*iconv -f UTF-16"):
        parse_submission_file(tmp_path / "utf16.json")  # what evaluate predictions= reads
    (tmp_path / "folder.json").mkdir()
    with pytest.raises(UserError, match="folder.json is a folder; pass the JSON file submit wrote"):
        parse_submission_file(tmp_path / "folder.json")


def test_a_run_config_cut_short_leaves_the_report_asking_for_the_data_root(tmp_path):
    from coco_multilabel.reporting.report import find_data_root

    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text("data:\n  root: [unclosed\n")
    assert find_data_root(tmp_path, None) is None  # the report then says "pass --data DIR"


def test_bad_headers_names_the_bad_images_of_a_list_without_decoding(root):
    from coco_multilabel.data.checks import bad_headers

    good = root / "images/train/a.jpg"
    (root / "images/train/garbage.jpg").write_bytes(b"not an image")
    (root / "images/train/cut.jpg").write_bytes(good.read_bytes()[:300])
    paths = [good, root / "images/train/garbage.jpg", root / "images/train/cut.jpg"]
    assert bad_headers(paths) == [(paths[1], "unreadable"), (paths[2], "truncated")]
