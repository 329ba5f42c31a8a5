"""Train: ``python -m coco_multilabel.train data.root=DIR [backbone=NAME] [key=value ...]``.

Reads as the recipe: seed, data, model, callbacks, loggers, trainer, fit; then print the best
checkpoint, its files and the commands to run next (``run_summary``). ``-m`` runs a sweep (see
``coco_multilabel.sweep``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from coco_multilabel.callbacks.best_metrics import BestMetrics
from coco_multilabel.classes import NUM_CLASSES
from coco_multilabel.config import CONFIG_DIR, report_user_errors
from coco_multilabel.data.datamodule import check_data_root
from coco_multilabel.errors import UserError
from coco_multilabel.io import AtomicCheckpointIO, write_json_atomic
from coco_multilabel.models import MultiLabelClassifier
from coco_multilabel.models.classifier import read_checkpoint
from coco_multilabel.run_summary import print_summary
from coco_multilabel.sweep import run_job

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> dict:
    """Fit a model as ``cfg`` says; return the best checkpoint's path, score and threshold.

    The best checkpoint's thresholds are also written to ``thresholds.json`` beside it."""
    L.seed_everything(cfg.seed, workers=True)
    run_dir = Path(cfg.run_dir)
    check_data_root(cfg.data.root)
    if cfg.ckpt_path:
        check_resumable(cfg)
    datamodule = instantiate(cfg.data, split_file=str(run_dir / "split.json"), _convert_="all")
    model = MultiLabelClassifier(
        backbone=cfg.backbone,
        optimizer=cfg.optimizer,
        scheduler=cfg.get("scheduler"),
        loss=cfg.get("loss"),
        **cfg.model,
    )
    # linear probe then fine-tune: cached features until the backbone unfreezes, then images
    switch_at = None if cfg.model.freeze_backbone else cfg.model.get("unfreeze_at_epoch")
    if cfg.data.cache_features:
        if not cfg.model.freeze_backbone and not switch_at:
            raise UserError(
                "data.cache_features=true needs model.freeze_backbone=true or model.unfreeze_at_epoch: "
                "the features of a backbone that trains change every step"
            )
        backbone_cfg = OmegaConf.to_container(cfg.backbone, resolve=True)
        datamodule.use_feature_cache(
            model.trunk_features, backbone_cfg, until_epoch=switch_at, cut=model.trunk_cut()
        )
    callbacks = [instantiate(c) for c in cfg.callbacks.values() if c]
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c]
    switching = {"reload_dataloaders_every_n_epochs": 1} if cfg.data.cache_features and switch_at else {}
    # not a config option: a checkpoint half-written by a killed run is never wanted
    trainer = instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=[AtomicCheckpointIO()], **switching
    )
    trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    return summarize(trainer, cfg)


def check_resumable(cfg: DictConfig) -> None:
    """Resuming with another backbone or class count would fail deep in Lightning; say why here."""
    saved = read_checkpoint(cfg.ckpt_path)["hyper_parameters"]
    wanted = OmegaConf.to_container(cfg.backbone, resolve=True)
    if saved["backbone"] != wanted:
        raise UserError(
            f"{cfg.ckpt_path} was trained with backbone {saved['backbone']}, "
            f"but this run asks for {wanted}; resume with the same backbone settings"
        )
    classes = cfg.model.get("num_classes", NUM_CLASSES)
    if saved.get("num_classes", NUM_CLASSES) != classes:
        raise UserError(
            f"{cfg.ckpt_path} predicts {saved.get('num_classes')} classes, but this run has {classes}; "
            "resume with the same model.num_classes or start a new run"
        )


def summarize(trainer: L.Trainer, cfg: DictConfig) -> dict:
    """The best checkpoint, its val metrics and thresholds (also written to thresholds.json)."""
    checkpoint = trainer.checkpoint_callback
    best = checkpoint.best_model_path if checkpoint else ""
    score = checkpoint.best_model_score if checkpoint else None
    best_epoch = next((c.best for c in trainer.callbacks if isinstance(c, BestMetrics)), None)
    last_epoch = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    summary = {
        "best_checkpoint": best,
        "best_score": None if score is None else float(score),
        "epochs": trainer.current_epoch,
        "objective": checkpoint.monitor if checkpoint else None,
        "objective_mode": checkpoint.mode if checkpoint else None,
        **(best_epoch or last_epoch),  # the val metrics of the best epoch when BestMetrics kept them
    }
    if best:
        tuning = read_checkpoint(best).get("threshold_tuning", {})
        summary["threshold"] = tuning.get("global_threshold")
        if tuning:
            write_json_atomic(Path(best).with_name("thresholds.json"), tuning, indent=1)
        log.info("best checkpoint %s: %s %.4f", best, checkpoint.monitor, summary["best_score"])
    print_summary(summary, cfg.run_dir, cfg.data.root)
    return summary


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
@report_user_errors
def main(cfg: DictConfig) -> float | None:
    return run_job(cfg, train)  # the best score: the value a Hydra sweeper optimises


if __name__ == "__main__":
    main()
