"""Train: ``python -m coco_multilabel.train data.root=DIR [backbone=NAME] [key=value ...]``.

Reads as the recipe: seed, the schedule and its options checked, data, model, callbacks, loggers,
trainer, then one fit per phase; then write the best epoch's thresholds beside its checkpoint and
print what to run next. ``-m`` runs a sweep, one job per device (``sweeps/job.py``).
"""

from __future__ import annotations

from pathlib import Path

import hydra
import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from coco_multilabel.callbacks.best_metrics import run_summary
from coco_multilabel.callbacks.budget import RunBudget, parse_duration
from coco_multilabel.callbacks.progress import RunProgress
from coco_multilabel.classes import NUM_CLASSES
from coco_multilabel.cli import CONFIG_DIR, report_user_errors
from coco_multilabel.data.datasets import check_data_root
from coco_multilabel.io import AtomicCheckpointIO, check_free_space, write_json_atomic
from coco_multilabel.models import MultiLabelClassifier
from coco_multilabel.models.backbones import without_downloads
from coco_multilabel.models.checkpoints import (
    check_resumable,
    checkpoint_bytes,
    drop_last_checkpoint,
    read_checkpoint,
)
from coco_multilabel.reporting.run_summary import print_summary
from coco_multilabel.sweeps.job import run_job
from coco_multilabel.sweeps.slurm import lightning_plugins
from coco_multilabel.training.options import check_options
from coco_multilabel.training.phases import fit_phases
from coco_multilabel.training.precision import use_tensor_cores
from coco_multilabel.training.schedule import phases_from_config, top_stages_of


def check_train(cfg: DictConfig) -> tuple[list, dict, int]:
    """Everything that can refuse the run, before it writes anything (a refused resume of a finished
    run must leave its result.json as it was); returns the phases, the backbone config and where
    the backbone is cut (``model.top_stages``, or the schedule's)."""
    check_data_root(cfg.data.root)
    phases = phases_from_config(cfg.schedule, cfg.trainer.get("max_epochs"))
    top_stages = top_stages_of(cfg.model.get("top_stages"), phases)
    check_options(cfg, phases)
    backbone_cfg = OmegaConf.to_container(cfg.backbone, resolve=True)
    backbone_cfg = without_downloads(backbone_cfg) if cfg.offline else backbone_cfg
    if cfg.ckpt_path:
        check_resumable(cfg.ckpt_path, backbone_cfg, cfg.model.get("num_classes", NUM_CLASSES))
    return phases, backbone_cfg, top_stages


def train(cfg: DictConfig) -> dict:
    """Fit a model as ``cfg`` says; return the run's summary (best checkpoint, score, val metrics)."""
    budget = RunBudget(parse_duration(cfg.trainer.get("max_time")))  # the whole run, from now
    L.seed_everything(cfg.seed, workers=True)
    phases, backbone_cfg, top_stages = check_train(cfg)
    datamodule = instantiate(cfg.data, split_file=str(Path(cfg.run_dir) / "split.json"), _convert_="all")
    model = MultiLabelClassifier(
        backbone=backbone_cfg, optimizer=cfg.optimizer, scheduler=cfg.get("scheduler"), loss=cfg.get("loss"),
        **{**cfg.model, "top_stages": top_stages},
    )  # fmt: skip
    checkpoints = "checkpoints (last, best and one being written)"  # the disk is known before any epoch
    check_free_space(
        Path(cfg.run_dir), 3 * checkpoint_bytes(model), checkpoints, "hydra.run.dir=<other disk>"
    )
    callbacks = [
        *(instantiate(c) for c in cfg.callbacks.values() if c),
        budget,
        RunProgress(phases, budget.elapsed),
    ]
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c]
    # the budget and the epoch cap are the run's, over all phases; a half-written checkpoint is never wanted
    trainer = instantiate(
        cfg.trainer, max_epochs=1, max_time=None, callbacks=callbacks, logger=loggers or False,
        plugins=[AtomicCheckpointIO(), *lightning_plugins()],
    )  # fmt: skip
    use_tensor_cores(trainer)
    fit_phases(trainer, model, datamodule, phases, cfg.ckpt_path, budget)
    drop_last_checkpoint(trainer, cfg.run_dir, keep=cfg.keep_last_checkpoint)  # finished: best.ckpt suffices
    summary = {
        **run_summary(trainer),
        "phases": [p.record() for p in phases],
        "cut_epoch": budget.cut,
        "precision": str(trainer.precision),
        "eval_precision": model.hparams.eval_precision,
    }
    summary["wall_s"] = round(budget.elapsed(), 1)  # a resumed run's earlier segments included
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
    return run_job(cfg, train, check=check_train)  # the best score: the value a Hydra sweeper optimises


if __name__ == "__main__":
    main()
