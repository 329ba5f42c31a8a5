"""Search: ``python -m coco_multilabel.search data.root=DIR [search=SPACE] [search.trials=n]
[search.workers=n] [search.dir=DIR] [search.folds=K] [train overrides]`` (``make search``).

An Optuna study over the train config: ``conf/search/<SPACE>.yaml`` names the keys to search and
their ranges; every trial trains the recipe the other overrides give with the trial's values on
top, in ``DIR/<number>`` as a sweep job does, on a device of its own, reporting its val objective
after every epoch so that hopeless trials stop early. The study lives in ``DIR`` (``sweeps/study.py``):
workers here and on other machines share it, and the same command again continues it.
``DIR/summary.md`` lists the trials with Optuna's plots; ``make submit CKPT=DIR`` submits the best.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import signal
import sys
from pathlib import Path

import matplotlib
import optuna
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import OmegaConf

from coco_multilabel.cli import CONFIG_DIR, report_user_errors
from coco_multilabel.errors import UserError
from coco_multilabel.sweeps.job import pool_devices, uses_gpu
from coco_multilabel.sweeps.preflight import check_hub
from coco_multilabel.sweeps.study import Devices, Search, Workers, extremes, open_study, optuna_object
from coco_multilabel.sweeps.study_summary import write_study_summary
from coco_multilabel.train import check_train

log = logging.getLogger(__name__)

DEFAULT_SPACE = "lr_wd_dropout"
NOT_PER_TRIAL = ("-m", "--multirun", "hydra.run", "hydra.sweep", "hydra/launcher", "resume=", "ckpt_path=")


def split_overrides(argv: list[str]) -> tuple[str, list[str], list[str]]:
    """The space's name, the ``search.*`` overrides and the train overrides every trial gets."""
    space, settings, train = DEFAULT_SPACE, [], []
    for arg in argv:
        if arg.startswith("search="):
            space = arg.partition("=")[2]
        elif arg.lstrip("+~").startswith("search."):
            settings.append(arg)
        elif arg.startswith(NOT_PER_TRIAL):
            raise UserError(
                f"{arg}: a search runs each trial in DIR/<number> itself and continues the study when run "
                "again; pass DIR=<study folder> (search.dir=...), and on SLURM see scripts/search.sbatch"
            )
        else:
            train.append(arg)
    return space, settings, train


def prepare(argv: list[str]) -> tuple[Search, int, Devices]:
    """The study's settings, how many workers run here and on which devices; refuses what would
    fail in a trial (a bad key or range, options, weights out of reach) before the first one."""
    space_name, settings, train = split_overrides(argv)
    spaces = sorted(p.stem for p in (Path(CONFIG_DIR) / "search").glob("*.yaml") if p.stem != "base")
    if space_name not in spaces:
        raise UserError(f"no search space {space_name!r}: SPACE= one of {', '.join(spaces)} (conf/search/)")
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        try:
            cfg = compose(
                "train", overrides=[*train, f"+search={space_name}", *settings], return_hydra_config=True
            )
        except HydraException as err:
            raise UserError(f"the overrides do not compose: {hydra_message(err)}") from err
        space = OmegaConf.to_container(cfg.search.get("params") or {})
        if not space:
            raise UserError(f"search={space_name} lists no params to search (conf/search/{space_name}.yaml)")
        data = str(Path(cfg.data.root).resolve()) if cfg.data.root else None
        train = [f"data.root={data}", *(o for o in train if not o.startswith("data.root="))]
        recipe = cfg.hydra.runtime.choices.get("experiment")
        if cfg.search.folds and recipe and not any(o.lstrip("~+").startswith("experiment") for o in train):
            train.append(f"experiment={recipe}")  # make cv would train experiment=leaderboard otherwise
        backbones = {}
        for ends in extremes(space):  # also a wrong key or value of the space fails here
            try:
                job = compose("train", overrides=[*train, *ends])
            except HydraException as err:
                why = hydra_message(err)
                raise UserError(
                    f"search={space_name}: a trial with {' '.join(ends)} does not compose ({why}); "
                    f"fix search.params (conf/search/{space_name}.yaml)"
                ) from err
            check_train(job)
            if not job.offline:
                backbones[" ".join(ends)] = OmegaConf.to_container(job.backbone, resolve=True)
    check_hub(backbones)
    check_one_device(cfg)
    folds = cfg.search.folds
    objective = f"oof/{cfg.thresholds.objective}_xfit" if folds else cfg.monitor
    chosen = OmegaConf.to_container(cfg.search, resolve=True)
    search = Search(
        dir=Path(chosen["dir"]).resolve(), space=space, args=train, objective=objective,
        direction="maximize" if folds or cfg.callbacks.model_checkpoint.mode == "max" else "minimize",
        folds=folds, trials=chosen["trials"], sampler=chosen["sampler"], pruner=chosen["pruner"],
        stale_after_s=chosen["stale_after_s"],
    )  # fmt: skip
    optuna_object(search.sampler, "samplers")
    optuna_object(search.pruner, "pruners")
    keys, _ = pool_devices(cfg.device_pool.ids)
    on_slurm = "SLURM_JOB_ID" in os.environ  # SLURM gave this task its GPUs: worker i keeps GPU i
    devices = Devices(
        keys, None if on_slurm else cfg.device_pool.lock_dir, cfg.device_pool.poll_s, uses_gpu(cfg)
    )
    return search, max(1, int(cfg.search.workers)), devices


def hydra_message(err: Exception) -> str:
    """Hydra's composition errors on one line: what it could not do, then why."""
    return " ".join(str(err).split())[:400]


def check_one_device(cfg) -> None:
    strategy, devices = str(cfg.trainer.get("strategy", "auto")), str(cfg.trainer.devices)
    if "ddp" in strategy or devices not in ("1", "auto"):
        raise UserError(
            f"a search trains each trial on one device, but trainer.strategy={strategy} trainer.devices="
            f"{devices}: drop trainer=ddp; WORKERS=n trains n trials at once, one per GPU"
        )


def run_workers(workers: Workers, count: int) -> bool:
    """``count`` workers until the study has its trials; False when stopped (Ctrl-C, SIGTERM)."""

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    with concurrent.futures.ThreadPoolExecutor(count, thread_name_prefix="worker") as pool:
        futures = [pool.submit(workers.run, index) for index in range(count)]
        try:
            concurrent.futures.wait(futures)
        except KeyboardInterrupt:
            log.warning("stopping: the running trials end now and are retried when the search is run again")
            workers.stop()
            concurrent.futures.wait(futures)
        for future in futures:
            future.result()  # a worker's error, raised here
    return not workers.stopping.is_set()


@report_user_errors
def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    matplotlib.use("Agg")  # workers draw the summary's plots in threads: no window system's backend
    search, count, devices = prepare(sys.argv[1:] if argv is None else argv)
    study = open_study(search.dir, create=search)
    log.info("study %s: %d trials, %d at once here; the same command again continues it", search.dir,
             search.trials, count)  # fmt: skip
    finished = run_workers(
        Workers(search, devices, on_trial_end=lambda: write_study_summary(search.dir)), count
    )
    path = write_study_summary(search.dir)
    print(path.read_text(), end="")
    print(f"written: {path}, summary.csv and the plots beside it")
    if not finished:
        sys.exit(130)
    failed = [
        t.number
        for t in study.get_trials(states=(optuna.trial.TrialState.FAIL,))
        if t.user_attrs.get("error")
    ]
    if failed:
        log.error(
            "%d trials failed (%s): their errors are in %s", len(failed), ", ".join(map(str, failed)), path
        )
        sys.exit(1)


if __name__ == "__main__":
    main()
