"""Bad input gets a clear answer and nothing is lost: damaged images under both policies, wrong
checkpoints and data roots, and runs killed with SIGKILL in the middle of training or submit."""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from hydra import compose, initialize_config_dir

from coco_multilabel.cli import CONFIG_DIR
from coco_multilabel.data.datamodule import CocoDataModule
from coco_multilabel.data.datasets import labelled_stems
from coco_multilabel.data.split import make_split
from coco_multilabel.errors import UserError
from coco_multilabel.submit import submit
from coco_multilabel.train import train
from tests.conftest import TINY

SUBMIT = dict(num_workers=0, accelerator="cpu", progress_bar=False)


@pytest.fixture(scope="module")
def checkpoint(tiny_root, tmp_path_factory):
    """best.ckpt of one tiny epoch, shared by the tests that only read it."""
    run_dir = tmp_path_factory.mktemp("run")
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[*TINY, f"data.root={tiny_root}", f"run_dir={run_dir}"])
    return train(cfg)["best_checkpoint"]


@pytest.fixture
def damaged_root(tiny_root, tmp_path):
    """The tiny data with one validation image and one test image cut in half."""
    root = shutil.copytree(tiny_root, tmp_path / "damaged")
    val_stem = make_split(labelled_stems(root), 0.25, seed=0)["val"][0]  # val: read every epoch
    test_stem = sorted(p.stem for p in (root / "images" / "test").glob("*.jpg"))[5]  # 2nd batch of 4
    for path in (
        root / "images" / "train" / f"{val_stem}.jpg",
        root / "images" / "test" / f"{test_stem}.jpg",
    ):
        path.write_bytes(path.read_bytes()[:200])
    return root, val_stem, test_stem


def test_a_damaged_image_stops_training_naming_it(damaged_root, train_cfg):
    root, val_stem, _ = damaged_root
    with pytest.raises(UserError, match=rf"cannot read image .*{val_stem}\.jpg.*check-data"):
        train(train_cfg(f"data.root={root}"))


def test_a_damaged_image_in_a_worker_process_still_reads_as_one_line(damaged_root, train_cfg):
    root, val_stem, _ = damaged_root
    with pytest.raises(UserError) as caught:
        train(train_cfg(f"data.root={root}", "data.num_workers=1"))
    assert str(caught.value).startswith("cannot read image") and val_stem in str(caught.value)
    assert "Traceback" not in str(caught.value)


@pytest.mark.slow
def test_skipped_images_are_counted_at_each_epoch_end(damaged_root, train_cfg, caplog):
    root, _, _ = damaged_root
    with caplog.at_level(logging.WARNING, logger="coco_multilabel"):
        summary = train(train_cfg(f"data.root={root}", "data.on_bad_image=skip", "trainer.max_epochs=2"))
    assert summary["epochs"] == 2
    skipped = [r.getMessage() for r in caplog.records if "unreadable images" in r.getMessage()]
    assert [message.split(";")[0] for message in skipped] == [
        "epoch 0: skipped 1 unreadable images",
        "epoch 1: skipped 1 unreadable images",
    ]
    assert "make check-data" in skipped[0]


@pytest.mark.slow
def test_submit_with_skip_still_writes_every_test_stem(damaged_root, checkpoint, tmp_path):
    root, _, test_stem = damaged_root
    with pytest.raises(UserError, match=rf"{test_stem}\.jpg"):
        submit(checkpoint, str(root), str(tmp_path / "strict.json"), **SUBMIT)
    assert not (tmp_path / "strict.json").exists()
    path = submit(checkpoint, str(root), str(tmp_path / "out.json"), on_bad_image="skip",
                  fallback_labels=(0, 2), batch_size=4, save_probs=True, **SUBMIT)  # fmt: skip
    predictions = json.loads(path.read_text())
    stems = sorted(p.stem for p in (root / "images" / "test").glob("*.jpg"))
    assert sorted(predictions) == stems
    assert predictions[test_stem] == [0, 2]
    saved = torch.load(path.with_suffix(".probs.pt"), weights_only=False)
    assert saved["stems"] == stems
    assert torch.nonzero(saved["probs"][stems.index(test_stem)]).flatten().tolist() == [0, 2]
    assert all(len(v) >= 1 for v in predictions.values())


@pytest.mark.slow
def test_unreadable_and_truncated_checkpoints_say_so(checkpoint, tiny_root, tmp_path):
    (tmp_path / "notes.ckpt").write_text("not a checkpoint")
    data = open(checkpoint, "rb").read()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
    for name in ("notes.ckpt", "cut.ckpt"):
        with pytest.raises(UserError, match=rf"checkpoint .*{name} is not readable .*complete"):
            submit(str(tmp_path / name), str(tiny_root), str(tmp_path / "out.json"), **SUBMIT)
    torch.save({"state_dict": {}}, tmp_path / "other.ckpt")
    with pytest.raises(UserError, match="other.ckpt is not a coco-multilabel checkpoint"):
        submit(str(tmp_path / "other.ckpt"), str(tiny_root), str(tmp_path / "out.json"), **SUBMIT)


@pytest.mark.slow
def test_a_checkpoint_with_another_class_count_is_refused(checkpoint, tiny_root, train_cfg, tmp_path):
    saved = torch.load(checkpoint, weights_only=False)
    saved["hyper_parameters"]["num_classes"] = 20
    torch.save(saved, tmp_path / "twenty.ckpt")
    with pytest.raises(UserError, match="twenty.ckpt predicts 20 classes, but the challenge scores 80"):
        submit(str(tmp_path / "twenty.ckpt"), str(tiny_root), str(tmp_path / "out.json"), **SUBMIT)
    with pytest.raises(UserError, match="twenty.ckpt predicts 20 classes, but this run has 80"):
        train(train_cfg(f"ckpt_path={tmp_path / 'twenty.ckpt'}"))


@pytest.mark.slow
def test_a_checkpoint_of_an_unknown_backbone_names_it(checkpoint, tiny_root, tmp_path):
    saved = torch.load(checkpoint, weights_only=False)
    saved["hyper_parameters"]["backbone"]["name"] = "mobilenet_v9"
    torch.save(saved, tmp_path / "v9.ckpt")
    with pytest.raises(UserError, match="v9.ckpt holds a mobilenet_v9 model that cannot be rebuilt here"):
        submit(str(tmp_path / "v9.ckpt"), str(tiny_root), str(tmp_path / "out.json"), **SUBMIT)


def test_a_hand_edited_split_file_says_how_to_recover(tiny_root, tmp_path):
    for text in ('{"train": ["000000000001",], ', '{"train": [], "val": 3}', "[]"):
        (tmp_path / "split.json").write_text(text)
        datamodule = CocoDataModule(
            root=str(tiny_root), num_workers=0, split_file=str(tmp_path / "split.json")
        )
        with pytest.raises(
            UserError, match="split.json is not a valid split .*delete it to draw a new split"
        ):
            datamodule.setup("fit")


@pytest.mark.slow
def test_a_wrong_data_root_for_submit_names_the_test_folder(checkpoint, tmp_path):
    with pytest.raises(UserError, match=rf"{tmp_path}/images/test is not a folder"):
        submit(checkpoint, str(tmp_path), str(tmp_path / "out.json"), **SUBMIT)
    (tmp_path / "images" / "test").mkdir(parents=True)
    with pytest.raises(UserError, match=r"images/test holds no \.jpg file"):
        submit(checkpoint, str(tmp_path), str(tmp_path / "out.json"), **SUBMIT)


KILLED_SUBMIT = """
import os, signal, sys
os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)  # killed after writing, before the rename
from coco_multilabel.submit import main
sys.argv = ["submit", "ckpt_path={ckpt}", "data.root={root}", "output={output}", "data.num_workers=0",
            "accelerator=cpu"]
main()
"""


@pytest.mark.slow
def test_submit_killed_while_writing_leaves_no_partial_json(checkpoint, tiny_root, tmp_path):
    output = tmp_path / "submission.json"
    code = textwrap.dedent(KILLED_SUBMIT).format(ckpt=checkpoint, root=tiny_root, output=output)
    killed = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL
    assert not output.exists()
    previous = submit(checkpoint, str(tiny_root), str(output), **SUBMIT).read_text()
    killed = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL
    assert output.read_text() == previous  # the earlier, complete file


@pytest.fixture
def one_thread():
    """Both processes of the next test on one thread: equal sums, and no oversubscribed cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield {**os.environ, "OMP_NUM_THREADS": "1"}
    torch.set_num_threads(threads)
