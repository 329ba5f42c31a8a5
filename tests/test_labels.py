import pytest

from coco_multilabel.data.labels import parse_label_text, read_label_dir, read_label_file, to_multi_hot
from coco_multilabel.errors import UserError


def test_parses_sorted_distinct_classes():
    assert parse_label_text("56\n0\n62\n0\n") == [0, 56, 62]


def test_tolerates_bom_crlf_blank_lines_and_empty_files():
    assert parse_label_text("\ufeff3\r\n\r\n7\r\n") == [3, 7]
    assert parse_label_text("") == []


@pytest.mark.parametrize("text, line", [("1\ncat\n", 2), ("80\n", 1), ("-1\n", 1), ("1.5\n", 1)])
def test_bad_lines_name_the_file_and_line(text, line):
    with pytest.raises(UserError, match=rf"a\.cls, line {line}"):
        parse_label_text(text, source="a.cls")


def test_reads_files_and_folders(tmp_path):
    (tmp_path / "000000000001.cls").write_text("2\n1\n")
    (tmp_path / "000000000002.cls").write_text("")
    assert read_label_file(tmp_path / "000000000001.cls") == [1, 2]
    assert read_label_dir(tmp_path) == {"000000000001": [1, 2], "000000000002": []}
    with pytest.raises(UserError, match="does not exist"):
        read_label_dir(tmp_path / "missing")


def test_multi_hot():
    target = to_multi_hot([0, 79])
    assert target.shape == (80,) and target.sum() == 2 and target[0] == target[79] == 1
