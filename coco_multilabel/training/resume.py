"""Resume a run as it was made: the config it was composed with is the base, and a resume's
overrides apply only to what may change mid-run (``MUTABLE``). The same comparison tells a
relaunched sweep whether a job's record still holds for the config that job composes to today.

A run's config is the one Hydra composed when it started (``<run>/.hydra/config.yaml``, which no
later launch rewrites) or, once it ran, the one in its record (``result.json`` ``config``: what it
last ran with, a raised epoch cap included). Composing today's defaults instead would continue a
160 px, 4-epoch run at 384 px for 15 epochs, in the same folder.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from pathlib import Path

from hydra import compose
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from coco_multilabel.errors import UserError
from coco_multilabel.io import one_line

log = logging.getLogger(__name__)

MUTABLE = (  # keys (and the keys below them) a run may change between two of its segments
    "trainer.max_epochs", "trainer.max_time",  # extend the run or its budget (up to its schedule's epochs)
    "trainer.accelerator", "trainer.devices", "trainer.num_nodes", "trainer.strategy", "trainer.precision",
    "data.num_workers", "data.cache_dir", "data.cache_on_device", "device_pool",  # where and how it runs
    "data.on_bad_image",  # a damaged image found mid-run: skip it and go on
    "trainer.enable_progress_bar", "trainer.enable_model_summary", "trainer.log_every_n_steps",
    "trainer.default_root_dir", "logger", "callbacks.progress_bar", "callbacks.figures",
    "callbacks.lr_monitor", "callbacks.skipped_images", "keep_last_checkpoint",  # what it shows and keeps
)  # fmt: skip
RUN_KEYS = ("resume", "ckpt_path", "run_dir")  # which run, and from where: always this launch's
MAY_CHANGE = (
    "the epoch cap and time budget, devices and precision, workers and cache, data.on_bad_image, logging "
    "and keep_last_checkpoint"
)
ABSENT = "(absent)"


def is_mutable(key: str) -> bool:
    return any(key == m or key.startswith(f"{m}.") for m in MUTABLE)


def flatten(config: dict, prefix: str = "") -> dict[str, object]:
    """``{"data.image_size": 160, ...}``: the leaves of a nested config; lists and {} are leaves."""
    leaves = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            leaves.update(flatten(value, f"{prefix}{key}."))
        else:
            leaves[f"{prefix}{key}"] = value
    return leaves


def changed_keys(before: dict, after: dict) -> list[str]:
    """The flattened keys whose values differ between two configs, or that one of them lacks;
    the run keys (which run, where) aside."""
    a, b = flatten(before), flatten(after)
    return sorted(
        k
        for k in a.keys() | b.keys()
        if a.get(k, ABSENT) != b.get(k, ABSENT) and k.split(".")[0] not in RUN_KEYS
    )


def settings(keys: list[str], config: dict, limit: int = 4) -> str:
    """``data.image_size=160, model.dropout=0.2 and 2 more``: ``keys`` as ``config`` sets them."""
    values = flatten(config)
    shown = ", ".join(f"{k}={values.get(k, ABSENT)}" for k in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def fixed_changes(saved: dict, current: dict) -> list[str]:
    """What changed between two configs of one run that a run cannot change mid-way."""
    return [k for k in changed_keys(saved, current) if not is_mutable(k)]


def named_keys(
    overrides: list[str],
    groups: set[str],
    choices: dict,
    saved_choices: dict,
    compose_with: Callable[[list[str]], dict],
) -> set[str]:
    """The config keys a resume's overrides set. ``key=value`` names its key (also when it repeats
    today's default); ``group=option`` (or ``~group``) whose option is not the run's names every key
    that option changes: today's files composed with the run's option instead, and compared (for
    a run whose options are unknown, the whole group)."""
    named, as_made, swapped = set(), [], []
    for override in OverridesParser.create().parse_overrides(overrides):
        key, line = override.key_or_group, override.input_line
        if key.startswith("hydra"):  # where Hydra writes and how it launches: nothing the run trains
            continue
        if "/" not in key and key not in groups:
            named.add(key)
            as_made.append(line)
        elif not saved_choices:  # a run whose options are unknown: the whole group
            named.add(key.replace("/", "."))
            as_made.append(line)
        elif choices.get(key) == saved_choices.get(key):  # the run's own option, repeated
            as_made.append(line)
        else:
            swapped.append(line)
            made = saved_choices.get(key)
            as_made.append(f"{key}={made}" if made is not None else f"~{key}")
    if not swapped:
        return named
    try:
        before = compose_with(as_made)
    except Exception as err:
        raise UserError(
            f"{' '.join(swapped)}: the run was made with another option ({one_line(err)}); start a new run "
            "for that"
        ) from err
    return named | set(changed_keys(before, compose_with(overrides)))


def is_named(key: str, named: set[str]) -> bool:
    return any(key == n or key.startswith(f"{n}.") or n.startswith(f"{key}.") for n in named)


def restore(saved: dict, asked: dict, named: set[str], run: str) -> tuple[dict, list[str]]:
    """The run's ``saved`` config with what this launch may change taken from ``asked`` (today's
    config with the resume's overrides): the run keys, and the ``MUTABLE`` keys the resume names;
    also the keys so changed. A named key that changes what was trained is a UserError. Any other
    difference (today's defaults, edited config files) stays as the run had it."""
    changed = changed_keys(saved, asked)
    refused = [k for k in changed if is_named(k, named) and not is_mutable(k)]
    if refused:
        raise UserError(
            f"{run} was made with {settings(refused, saved)}, which a resume cannot change (this one asks "
            f"for {settings(refused, asked)}): it continues the run as it was made, and may change only "
            f"{MAY_CHANGE}; start a new run instead"
        )
    taken = [k for k in changed if is_named(k, named) and is_mutable(k)]
    run_keys = [k for k in flatten(asked) if k.split(".")[0] in RUN_KEYS]
    return _with(saved, asked, run_keys + taken), taken


def _with(saved: dict, asked: dict, keys: list[str]) -> dict:
    """A copy of ``saved`` with the flattened ``keys`` as ``asked`` has them (absent: removed)."""
    config, values = copy.deepcopy(saved), flatten(asked)
    for key in keys:  # removals first: a leaf may replace a subtree, and a subtree a leaf
        if key not in values:
            _remove(config, key.split("."))
    for key in (k for k in keys if k in values):
        node, (*parents, leaf) = config, key.split(".")
        for parent in parents:
            if not isinstance(node.get(parent), dict):
                node[parent] = {}
            node = node[parent]
        node[leaf] = copy.deepcopy(values[key])
    return config


def _remove(node: dict, path: list[str]) -> None:
    """Remove ``path`` from a nested dict, and the parents that it leaves empty."""
    head, *rest = path
    if rest and isinstance(node.get(head), dict):
        _remove(node[head], rest)
        if not node[head]:
            del node[head]
    elif not rest:
        node.pop(head, None)


def saved_config(run_dir: Path, record: dict | None) -> tuple[dict, dict] | None:
    """The config a run last ran with and its group options at the start, from its record or
    its ``.hydra/``; None for a folder no run of this project was made in."""
    hydra_dir = Path(run_dir) / ".hydra"
    choices = (record or {}).get("choices")
    if choices is None and (hydra_dir / "hydra.yaml").is_file():
        choices = OmegaConf.to_container(OmegaConf.load(hydra_dir / "hydra.yaml").hydra.runtime.choices)
    if record and record.get("config"):
        return record["config"], choices or {}
    if (hydra_dir / "config.yaml").is_file():
        return OmegaConf.to_container(OmegaConf.load(hydra_dir / "config.yaml")), choices or {}
    return None


def resumed_config(cfg: DictConfig, run_dir: Path, record: dict | None, overrides: list[str]) -> DictConfig:
    """``cfg`` (today's config and this launch's overrides) for a resume of the run in ``run_dir``:
    that run's config, with what the overrides may change. Unchanged when the folder holds no
    config of a run of this project (a checkpoint file kept elsewhere)."""
    found = saved_config(run_dir, record)
    if found is None:
        return cfg
    saved, saved_choices = found
    asked = OmegaConf.to_container(cfg)
    groups, choices, compose = _hydra_app()
    named = named_keys(overrides, groups, choices, saved_choices, compose)
    config, taken = restore(saved, asked, named, str(run_dir))
    changes = f"; this resume sets {settings(taken, asked)} (was {settings(taken, saved)})" if taken else ""
    log.info("resuming %s with the config it was made with%s", run_dir, changes)
    restored = OmegaConf.create(config)
    OmegaConf.set_struct(restored, OmegaConf.is_struct(cfg))
    return restored


def group_choices() -> dict:
    """The option of each config group this launch composed (``backbone: efficientnet_lite0``...)."""
    if not HydraConfig.initialized():
        return {}
    return OmegaConf.to_container(HydraConfig.get().runtime.choices)


def _hydra_app() -> tuple[set[str], dict, Callable[[list[str]], dict]]:
    """The config groups, this launch's options and a compose of the running Hydra app."""
    if not HydraConfig.initialized():
        return set(), {}, lambda overrides: {}
    name = HydraConfig.get().job.config_name
    groups = set(GlobalHydra.instance().config_loader().list_groups(""))
    return groups, group_choices(), lambda overrides: OmegaConf.to_container(compose(name, overrides))
