"""check-data on a generated data root with one planted case of every problem."""

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from coco_multilabel.check_data import main
from coco_multilabel.data.checks import PROBLEMS, check_data
from coco_multilabel.data.labels import LABEL_ERRORS, read_label_file
from coco_multilabel.errors import UserError


def jpeg_bytes(tmp_path, seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    path = tmp_path / f"src{seed}.jpg"
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(path, quality=90)
    data = path.read_bytes()
    path.unlink()
    return data


def broken_stream(data: bytes) -> bytes:
    """Zeroed Huffman table counts: the header reads fine, decoding fails."""
    i = data.find(b"\xff\xc4")
    return data[: i + 5] + b"\x00" * 16 + data[i + 21 :]


@pytest.fixture
def broken_root(tmp_path):
    root = tmp_path / "data"
    train, labels, test = root / "images/train", root / "labels/train", root / "images/test"
    for folder in (train, labels, test):
        folder.mkdir(parents=True)
    good = jpeg_bytes(tmp_path)
    files = {
        "ok": ("3\n7\n", good),
        "nolabel": (None, good),
        "noimage": ("1\n", None),
        "cut": ("1\n", good[: len(good) // 2]),
        "garbage": ("1\n", b"this is not an image"),
        "png": ("1\n", None),
        "blank": ("1\n\n2\n", good),
        "cat": ("1\ncat\n", good),
        "big": ("80\n", good),
        "dup": ("4\n4\n", good),
        "bom": ("\ufeff5\n", good),
        "crlf": ("5\r\n6\r\n", good),
        "empty": ("", good),
        "latin": (None, good),
        "broken": ("1\n", broken_stream(good)),
    }
    for stem, (text, image) in files.items():
        if text is not None:
            (labels / f"{stem}.cls").write_bytes(text.encode("utf-8"))
        if image is not None:
            (train / f"{stem}.jpg").write_bytes(image)
    (labels / "latin.cls").write_bytes("1\n\xe9\n".encode("latin-1"))
    Image.new("RGB", (8, 8)).save(train / "png.jpg", format="PNG")  # a PNG named .jpg
    (train / "renamed.png").write_bytes(good)  # a JPEG named .png
    (labels / "renamed.cls").write_text("2\n")
    (train / "notes.txt").write_text("hello")
    (train / "nested").mkdir()
    return root  # images/test stays empty


EXPECTED = {
    "empty_folder": "images/test/",
    "image_without_label": "images/train/nolabel.jpg",
    "label_without_image": "labels/train/noimage.cls",
    "truncated": "images/train/cut.jpg",
    "unreadable": "images/train/garbage.jpg",
    "not_jpeg": "images/train/png.jpg",
    "wrong_extension": "images/train/renamed.png",
    "blank": "labels/train/blank.cls (line 2)",
    "non_integer": "labels/train/cat.cls (line 2: 'cat')",
    "out_of_range": "labels/train/big.cls (line 1: '80')",
    "duplicate": "labels/train/dup.cls (line 2: '4')",
    "bom": "labels/train/bom.cls",
    "crlf": "labels/train/crlf.cls",
    "empty_label": "labels/train/empty.cls",
    "not_utf8": "labels/train/latin.cls",
    "other_file": "images/train/notes.txt",
    "nested_folder": "images/train/nested/",
}


def test_every_planted_problem_is_found_with_its_file(broken_root):
    findings = check_data(broken_root)
    for kind, item in EXPECTED.items():
        assert any(found.startswith(item) for found in findings.problems[kind]), (kind, findings.problems)
    # training sees .jpg files only: the renamed JPEG leaves its label file orphaned
    assert [item.split()[0] for item in findings.problems["label_without_image"]] == [
        "labels/train/noimage.cls", "labels/train/renamed.cls"
    ]  # fmt: skip
    assert "images/train/broken.jpg" not in findings.problems["unreadable"]  # headers only


def test_full_decoding_finds_damage_inside_a_file(broken_root):
    assert "images/train/broken.jpg" in check_data(broken_root, full=True).problems["unreadable"]


def test_report_prints_counts_and_the_first_files(broken_root, capsys):
    assert main([str(broken_root)]) == 1
    out = capsys.readouterr().out
    assert "error: 1 truncated images\n    images/train/cut.jpg" in out
    assert "info: 1 empty label files (valid: images with no objects)\n    labels/train/empty.cls" in out
    assert "warning: 1 label files with Windows (CRLF) line ends" in out
    assert f"checked {broken_root}" in out and "errors" in out


def test_report_lists_a_few_files_and_counts_the_rest(tmp_path, capsys):
    root = tmp_path / "data"
    for folder in ("images/train", "labels/train", "images/test"):
        (root / folder).mkdir(parents=True)
    good = jpeg_bytes(tmp_path)
    (root / "images/test/t.jpg").write_bytes(good)
    for i in range(8):
        (root / f"images/train/{i:012d}.jpg").write_bytes(good)
    assert main([str(root)]) == 1
    out = capsys.readouterr().out
    assert "error: 8 images without a label file" in out and "... and 3 more" in out
    assert "images/train/000000000004.jpg" in out and "images/train/000000000005.jpg" not in out


def test_clean_data_passes(tiny_root, capsys):
    assert main([str(tiny_root)]) == 0
    assert "no errors, 0 warnings" in capsys.readouterr().out


def test_missing_root_names_the_expected_folders(tmp_path):
    findings = check_data(tmp_path / "nowhere")
    assert findings.problems["missing_folder"] == ["images/train/", "labels/train/", "images/test/"]
    assert findings.errors == 3


def test_every_kind_has_a_severity():
    assert {severity for severity, _ in PROBLEMS.values()} == {"error", "warning", "info"}


@pytest.mark.slow
def test_cli_exits_non_zero_without_a_traceback(broken_root):
    result = subprocess.run(
        [sys.executable, "-m", "coco_multilabel.check_data", str(broken_root)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1
    assert "images/train/garbage.jpg" in result.stdout and "Traceback" not in result.stderr


def test_check_data_and_training_refuse_the_same_label_files(broken_root):
    findings = check_data(broken_root)
    reported = {item.split()[0] for kind in LABEL_ERRORS for item in findings.problems[kind]}
    for path in sorted((broken_root / "labels" / "train").glob("*.cls")):
        try:
            read_label_file(path)
            refused = False
        except UserError:
            refused = True
        assert refused == (f"labels/train/{path.name}" in reported), path.name


def test_the_progress_bar_does_not_change_the_findings(broken_root, monkeypatch):
    monkeypatch.setattr("coco_multilabel.data.checks.PROGRESS_FROM", 0)
    assert check_data(broken_root, progress=True).problems == check_data(broken_root).problems
