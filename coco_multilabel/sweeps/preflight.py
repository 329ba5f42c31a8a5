"""Checks a sweep makes before its first job starts: every job's folder is its own, a job that ran
before still composes to the config it ran with, and the hub weights its jobs need can be had, so
a sweep never fails in job 7 for a reason known at job 0. Then it writes the grid (``grid.json``):
the summary lists the jobs that have not started yet."""

from __future__ import annotations

import logging
import socket
import sys
from pathlib import Path

from hydra import compose
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper  # the sweeper's own expansion
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from coco_multilabel.errors import UserError
from coco_multilabel.io import write_json_atomic
from coco_multilabel.sweeps.job import RERUN, check_job_folder, config_change, utc_now
from coco_multilabel.sweeps.summary import GRID

log = logging.getLogger(__name__)

HUBS = {"torchvision": "download.pytorch.org", "timm": "huggingface.co"}


def expand_jobs(config: DictConfig) -> list[list[str]]:
    """Each job's overrides, in Hydra's order: its basic sweeper's own expansion of the grid of
    ``hydra.sweeper.params`` then of the command line's comma lists, one job per combination."""
    params = [f"{k}={v}" for k, v in (OmegaConf.select(config, "hydra.sweeper.params") or {}).items()]
    parsed = OverridesParser.create().parse_overrides([*params, *config.hydra.overrides.task])
    return BasicSweeper.split_arguments(parsed, max_batch_size=None)[0]


def hub_download(backbone: dict) -> str | None:
    """The hub (a key of HUBS) whose weights this backbone config downloads, unless cached here."""
    if backbone.get("weights_file"):
        return None
    target = str(backbone.get("_target_", ""))
    if target.endswith("torchvision_backbone") and backbone.get("weights"):
        import torch
        from torchvision.models import get_model_weights

        url = get_model_weights(backbone["name"])[backbone["weights"]].url
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
        return None if cached.is_file() else "torchvision"
    if target.endswith("timm_backbone") and backbone.get("pretrained"):
        from huggingface_hub import try_to_load_from_cache
        from timm.models import get_pretrained_cfg

        repo = getattr(get_pretrained_cfg(backbone["name"]), "hf_hub_id", None)
        names = ("model.safetensors", "pytorch_model.bin")
        cached = repo and any(isinstance(try_to_load_from_cache(repo, n), str) for n in names)
        return None if cached else "timm"
    return None


def reachable(host: str, timeout: float = 3.0) -> bool:
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def check_hub(jobs: dict[str, dict], reach=reachable) -> None:
    """``jobs``: job number -> its backbone config (``offline`` applied). A UserError naming the jobs
    whose weights need a hub that cannot be reached, and the offline ways to run them."""
    needs: dict[str, list[str]] = {}
    for num, backbone in jobs.items():
        if hub := hub_download(backbone):
            needs.setdefault(hub, []).append(f"job {num} ({backbone.get('name')})")
    for hub, which in needs.items():
        if not reach(HUBS[hub]):
            verb = "needs" if len(which) == 1 else "need"
            raise UserError(
                f"{', '.join(which)} {verb} {hub} weights from {HUBS[hub]}, which cannot be reached: "
                "run offline with offline=true (random weights for those backbones; make sweep "
                "SWEEP=backbones_offline), backbone.weights_file=<file>, or on a machine with a network"
            )


class SweepPreflight(Callback):
    """Hydra callback (``hydra.callbacks`` in conf/train.yaml), before the first job of a multirun."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        try:
            self.check(config)
        except UserError as err:  # one line, as for a single run; no job has started
            log.error("error: %s", err)
            sys.exit(2)

    def check(self, config: DictConfig) -> None:
        jobs = expand_jobs(config)
        sweep_dir = Path(config.hydra.sweep.dir)
        numbered = OmegaConf.to_container(config.hydra.sweep, resolve=False)["subdir"] == "${hydra.job.num}"
        composed = [
            compose("train", overrides=[o for o in overrides if not o.startswith("hydra.")])
            for overrides in jobs
        ]
        if numbered:
            changed = {}
            for num, (overrides, job) in enumerate(zip(jobs, composed, strict=True)):
                previous = check_job_folder(sweep_dir / str(num), overrides)
                if change := config_change(sweep_dir / str(num), previous, OmegaConf.to_container(job)):
                    changed.setdefault(change, []).append(str(num))
            if changed:
                change, nums = next(iter(changed.items()))
                which = f"job {nums[0]}" if len(nums) == 1 else f"jobs {', '.join(nums)}"
                others = f" (and {sum(map(len, changed.values())) - len(nums)} more jobs with other changes)"
                raise UserError(
                    f"{which} of {sweep_dir} ran with {change}{others if len(changed) > 1 else ''}{RERUN}"
                )
        check_hub({str(num): backbone_of(job) for num, job in enumerate(composed) if not job.offline})
        if numbered:  # the whole grid, for the summary: jobs not started yet show as pending
            write_json_atomic(sweep_dir / GRID, {"launched": utc_now(), "jobs": jobs}, indent=1)
        log.info("preflight: %d jobs, their folders, configs and weights checked", len(jobs))


def backbone_of(job: DictConfig) -> dict:
    return OmegaConf.to_container(job.backbone, resolve=True)
