"""Train: ``python -m coco_multilabel.train data.root=DIR [backbone=NAME] [key=value ...]``.

Reads as the recipe: seed, data, model, callbacks, loggers, trainer, fit; then write the best
epoch's thresholds beside its checkpoint and print what to run next. ``-m`` runs a sweep, one job
per device (``sweeps/job.py``).
"""

from __future__ import annotations

from pathlib import Path

import hydra
import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from coco_multilabel.callbacks.best_metrics import run_summary
from coco_multilabel.classes import NUM_CLASSES
from coco_multilabel.cli import CONFIG_DIR, report_user_errors
from coco_multilabel.data.datasets import check_data_root
from coco_multilabel.errors import UserError
from coco_multilabel.io import AtomicCheckpointIO, write_json_atomic
from coco_multilabel.models import MultiLabelClassifier
from coco_multilabel.models.checkpoints import check_resumable, read_checkpoint
from coco_multilabel.reporting.run_summary import print_summary
from coco_multilabel.sweeps.job import run_job


def train(cfg: DictConfig) -> dict:
    """Fit a model as ``cfg`` says; return the run's summary (best checkpoint, score, val metrics)."""
    L.seed_everything(cfg.seed, workers=True)
    check_data_root(cfg.data.root)
    backbone_cfg = OmegaConf.to_container(cfg.backbone, resolve=True)
    if cfg.ckpt_path:
        check_resumable(cfg.ckpt_path, backbone_cfg, cfg.model.get("num_classes", NUM_CLASSES))
    datamodule = instantiate(cfg.data, split_file=str(Path(cfg.run_dir) / "split.json"), _convert_="all")
    model = MultiLabelClassifier(
        backbone=cfg.backbone, optimizer=cfg.optimizer, scheduler=cfg.get("scheduler"), loss=cfg.get("loss"),
        **cfg.model,
    )  # fmt: skip
    # linear probe then fine-tune: cached features until the backbone unfreezes, then images
    switch_at = None if cfg.model.freeze_backbone else cfg.model.get("unfreeze_at_epoch")
    if cfg.data.cache_features:
        if not cfg.model.freeze_backbone and not switch_at:
            raise UserError(
                "data.cache_features=true needs model.freeze_backbone=true or model.unfreeze_at_epoch: "
                "the features of a backbone that trains change every step"
            )
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
    summary = run_summary(trainer)
    if summary["best_checkpoint"]:
        tuning = read_checkpoint(summary["best_checkpoint"]).get("threshold_tuning", {})
        summary["threshold"] = tuning.get("global_threshold")
        if tuning and trainer.is_global_zero:
            write_json_atomic(Path(summary["best_checkpoint"]).with_name("thresholds.json"), tuning, indent=1)
    print_summary(summary, cfg.run_dir, cfg.data.root)
    return summary


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
@report_user_errors
def main(cfg: DictConfig) -> float | None:
    return run_job(cfg, train)  # the best score: the value a Hydra sweeper optimises


if __name__ == "__main__":
    main()
