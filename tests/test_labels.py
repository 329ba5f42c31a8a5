import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coco_multilabel.data.labels import (
    inspect_label_text,
    parse_label_text,
    read_label_dir,
    read_label_file,
    to_multi_hot,
)
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


@pytest.mark.parametrize(
    "text, kinds",
    [
        ("\ufeff3\n", ["bom"]),
        ("3\r\n4\r\n", ["crlf"]),
        ("3\n\n4\n", ["blank"]),
        ("3\n3\n", ["duplicate"]),
        ("3\nx\n", ["non_integer"]),
        ("3\n99\n", ["out_of_range"]),
        ("", []),
    ],
)
def test_inspection_names_each_deviation(text, kinds):
    assert [issue.kind for issue in inspect_label_text(text).issues] == kinds


def test_files_keep_crlf_visible_and_refuse_other_encodings(tmp_path):
    (tmp_path / "a.cls").write_bytes(b"1\r\n2\r\n")
    assert read_label_file(tmp_path / "a.cls") == [1, 2]
    (tmp_path / "b.cls").write_bytes("1\n\xe9\n".encode("latin-1"))
    with pytest.raises(UserError, match=r"b\.cls is not UTF-8 text.*check-data"):
        read_label_file(tmp_path / "b.cls")


LINE_ENDS = st.sampled_from(["\n", "\r\n"])


@settings(deadline=None, max_examples=60)
@given(
    classes=st.lists(st.integers(0, 79), max_size=12),
    end=LINE_ENDS,
    bom=st.booleans(),
    blanks=st.lists(st.integers(0, 12), max_size=3),
)
def test_any_valid_file_parses_to_its_sorted_distinct_classes(classes, end, bom, blanks):
    lines = [str(c) for c in classes]
    for position in blanks:
        lines.insert(min(position, len(lines)), "  ")
    text = ("\ufeff" if bom else "") + "".join(line + end for line in lines)
    assert parse_label_text(text) == sorted(set(classes))


@settings(deadline=None, max_examples=60)
@given(st.text(alphabet=st.sampled_from("0123456789-+ x.\n\r\t\ufeff"), max_size=40))
def test_any_text_parses_to_valid_classes_or_a_user_error(text):
    report = inspect_label_text(text)
    try:
        classes = parse_label_text(text, source="f.cls")
    except UserError as err:
        assert report.errors and str(err).startswith("f.cls, line ")
        return
    assert not report.errors
    assert classes == sorted(set(classes)) and all(0 <= c <= 79 for c in classes)
