"""Checkpoints of this project: read one, rebuild its model, check that a run may resume from it."""

from __future__ import annotations

from pathlib import Path

import torch

from coco_multilabel.classes import NUM_CLASSES
from coco_multilabel.errors import UserError
from coco_multilabel.io import load_data_only, one_line
from coco_multilabel.models.classifier import MultiLabelClassifier
from coco_multilabel.models.registry import check_model_configs


def read_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """A Lightning checkpoint of this project, or a UserError saying what is wrong with the file.

    Read as data only (``weights_only``: tensors and plain containers; a pickled object would run
    code on load), and its model configs checked against the project's builders before anything
    reads them: a checkpoint from a classmate or a forum cannot run code here.
    """
    path = Path(path)
    if path.is_dir():
        raise UserError(f"checkpoint {path} is a folder; pass the .ckpt file in it (<run dir>/checkpoints/)")
    if not path.is_file() and path.name == "last.ckpt" and path.with_name("best.ckpt").is_file():
        raise UserError(
            f"checkpoint {path} does not exist: the run finished, and a finished run keeps only "
            f"best.ckpt; train on from its best epoch with ckpt_path={path.with_name('best.ckpt')}, "
            "or train with keep_last_checkpoint=true to keep last.ckpt"
        )
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; runs keep theirs in <run dir>/checkpoints/")
    try:
        checkpoint = load_data_only(path, "checkpoint", map_location)
    except UserError:
        raise
    except Exception as err:
        raise UserError(
            f"checkpoint {path} is not readable ({one_line(err)}); is the file complete?"
        ) from err
    if (
        not isinstance(checkpoint, dict)
        or not isinstance(checkpoint.get("hyper_parameters"), dict)
        or "backbone" not in checkpoint["hyper_parameters"]
    ):
        raise UserError(f"{path} is not a coco-multilabel checkpoint (no model hyper-parameters in it)")
    check_model_configs(checkpoint["hyper_parameters"], f"checkpoint {path}")
    return checkpoint


def load_model(checkpoint: dict | str | Path, source: str | Path = "checkpoint") -> MultiLabelClassifier:
    """Rebuild the model of a checkpoint (a path, or the dict ``read_checkpoint`` returned) in eval
    mode, without downloading the backbone's pretrained weights again: the checkpoint holds them."""
    if not isinstance(checkpoint, dict):
        checkpoint, source = read_checkpoint(checkpoint), checkpoint
    hparams = dict(checkpoint["hyper_parameters"])
    backbone = dict(hparams["backbone"])
    for key, empty in (("weights", None), ("pretrained", False), ("weights_file", None)):
        if key in backbone:
            backbone[key] = empty
    try:
        model = MultiLabelClassifier(**{**hparams, "backbone": backbone})
    except Exception as err:  # a backbone this installation cannot build: name it
        raise UserError(
            f"{source} holds a {backbone.get('name') or backbone.get('_target_')} model that cannot be "
            f"rebuilt here ({type(err).__name__}: {err}); is it from another project or version?"
        ) from err
    try:
        model.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as err:
        raise UserError(f"{source} does not fit the model it describes: {err}") from err
    return model.eval()


def check_resumable(ckpt_path: str | Path, backbone: dict, num_classes: int = NUM_CLASSES) -> None:
    """Resuming with another backbone or class count would fail deep in Lightning; say why here."""
    saved = read_checkpoint(ckpt_path)["hyper_parameters"]
    if saved["backbone"] != backbone:
        raise UserError(
            f"{ckpt_path} was trained with backbone {saved['backbone']}, "
            f"but this run asks for {backbone}; resume with the same backbone settings"
        )
    if saved.get("num_classes", NUM_CLASSES) != num_classes:
        raise UserError(
            f"{ckpt_path} predicts {saved.get('num_classes')} classes, but this run has {num_classes}; "
            f"resume with +model.num_classes={saved.get('num_classes')} or start a new run"
        )


def drop_last_checkpoint(trainer, run_dir: str | Path, keep: bool = False) -> Path | None:
    """A finished run keeps ``best.ckpt`` (what submit, report and a further run need) and drops
    ``last.ckpt``, its resume point, which a finished run no longer needs: one checkpoint per job of
    a sweep, not two. Kept with ``keep`` (``keep_last_checkpoint=true``), when there is no
    ``best.ckpt``, and by a run that did not finish (killed, interrupted): it resumes from it."""
    last = Path(run_dir) / "checkpoints" / "last.ckpt"
    if keep or trainer.interrupted or not trainer.is_global_zero or not last.with_name("best.ckpt").is_file():
        return None
    last.unlink(missing_ok=True)
    return last


def checkpoint_bytes(model) -> int:
    """About what one checkpoint of ``model`` takes: its weights, the optimizer's two moments
    (Adam's; SGD keeps fewer), and the EMA copy the callback may keep."""
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    return 4 * weights


def epochs_done(path: str | Path) -> int:
    """How many epochs the run had finished when it saved ``path``; reads that one number of the
    file (memory-mapped, data only), not its weights."""
    return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["epoch"]) + 1
