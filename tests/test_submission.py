import json
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from coco_multilabel.decisions.submission import (
    decide_labels,
    parse_submission,
    read_submission,
    validate_submission,
    write_submission,
)
from coco_multilabel.errors import UserError

STEMS = ["000000000139", "000000000285"]


def test_decide_labels_thresholds_and_minimum():
    probs = torch.tensor([[0.9, 0.2, 0.6], [0.1, 0.3, 0.2]])
    assert decide_labels(probs, torch.tensor([0.5, 0.5, 0.5]), min_labels=1) == [[0, 2], [1]]
    assert decide_labels(probs, torch.tensor([0.5, 0.5, 0.5]), min_labels=0) == [[0, 2], []]
    assert decide_labels(probs, torch.tensor([0.95, 0.1, 0.5]), min_labels=0) == [[1, 2], [1]]


@pytest.mark.parametrize(
    "predictions, message",
    [
        ([], "JSON object"),
        ({"000000000139.jpg": [1], "000000000285": [1]}, "'000000000139.jpg' is not the stem.*no extension"),
        ({"000000000139": [2, 1], "000000000285": [1]}, "'000000000139': \\[2, 1\\] is not a sorted list"),
        ({"000000000139": [1, 1], "000000000285": [1]}, "not a sorted list of distinct"),
        ({"000000000139": [80], "000000000285": [1]}, "0..79"),
        ({"000000000139": [True], "000000000285": [1]}, "'000000000139'"),
        ({"000000000139": "1", "000000000285": [1]}, "'000000000139'"),
        ({"000000000139": [1]}, "1 images have no prediction; the first is '000000000285'"),
    ],
)
def test_validation_names_the_first_bad_key(predictions, message):
    with pytest.raises(UserError, match=message):
        validate_submission(predictions, STEMS)


def test_duplicate_keys_are_refused():
    with pytest.raises(UserError, match="appears twice"):
        parse_submission('{"000000000139": [1], "000000000139": [2]}')


def test_written_file_is_exactly_the_challenge_format(tmp_path):
    path = write_submission(tmp_path / "out.json", {STEMS[1]: [], STEMS[0]: [56, 60, 62]}, STEMS)
    assert json.loads(path.read_text()) == {STEMS[0]: [56, 60, 62], STEMS[1]: []}
    assert read_submission(path, STEMS)[STEMS[0]] == [56, 60, 62]
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]  # no temporary file left


def test_invalid_predictions_never_reach_the_disk(tmp_path):
    with pytest.raises(UserError):
        write_submission(tmp_path / "out.json", {STEMS[0]: [1]}, STEMS)
    assert not any(tmp_path.iterdir())


STEM = st.integers(0, 10**12 - 1).map(lambda i: f"{i:012d}")
CLASSES = st.lists(st.integers(0, 79), unique=True, max_size=8)


@settings(deadline=None, max_examples=60)
@given(st.dictionaries(STEM, CLASSES, min_size=1, max_size=20))
def test_written_predictions_read_back_identically(predictions):
    stems = sorted(predictions)
    normalised = {stem: sorted(classes) for stem, classes in predictions.items()}
    with tempfile.TemporaryDirectory() as folder:
        path = write_submission(Path(folder) / "out.json", normalised, stems)
        assert read_submission(path, stems) == normalised
        assert path.read_text() == json.dumps(normalised, sort_keys=True, separators=(",", ":")) + "\n"


@settings(deadline=None, max_examples=60)
@given(
    st.dictionaries(STEM, CLASSES, min_size=1, max_size=10),
    st.sampled_from(["unsorted", "duplicate", "out_of_range", "missing", "extension"]),
)
def test_broken_predictions_are_refused_before_the_disk(predictions, defect):
    stems = sorted(predictions)
    broken = {stem: sorted(classes) for stem, classes in predictions.items()}
    first = stems[0]
    if defect == "unsorted":
        broken[first] = [79, 0]
    elif defect == "duplicate":
        broken[first] = [5, 5]
    elif defect == "out_of_range":
        broken[first] = [80]
    elif defect == "missing":
        del broken[first]
    else:
        broken[f"{first}.jpg"] = broken.pop(first)
    with tempfile.TemporaryDirectory() as folder:
        with pytest.raises(UserError, match=first):
            write_submission(Path(folder) / "out.json", broken, stems)
        assert not any(Path(folder).iterdir())
