"""Cross-validation: ``python -m coco_multilabel.cv --data DIR [--folds K] [--dir CV_DIR] [overrides]``
(``make cv``).

Trains one model per fold (a multirun over ``data.fold=0..K-1`` sharing ``CV_DIR/folds.json``: one
job per device, SLURM with ``hydra/launcher=slurm``, finished folds skipped and interrupted ones
resumed when the same command runs again), then writes the out-of-fold table ``cv.md`` / ``cv.json``
and ``oof.probs.pt``: every labelled image predicted by the fold model that did not train on it,
the metric suite on all of them, thresholds tuned on them (global and per class) and cross-fitted,
and the rarest classes' F1. ``make submit CKPT=CV_DIR`` then averages the fold models. ``--refit``
also trains one model on every labelled image for the epochs the folds chose, with the out-of-fold
thresholds (``CV_DIR/refit/checkpoints/refit.ckpt``). Without an ``experiment=`` override the folds
train the documented best recipe, ``experiment=leaderboard``: the default recipe on EfficientNet-Lite2.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir

from coco_multilabel.callbacks.best_metrics import best_epoch
from coco_multilabel.cli import CONFIG_DIR, report_user_errors
from coco_multilabel.data.datasets import check_data_root, labelled_stems
from coco_multilabel.data.folds import load_or_make_folds
from coco_multilabel.data.label_index import load_label_index
from coco_multilabel.decisions.oof import oof_scores, out_of_fold
from coco_multilabel.decisions.probabilities import save_probabilities
from coco_multilabel.decisions.thresholds import rule_words
from coco_multilabel.errors import UserError
from coco_multilabel.folders import fold_jobs
from coco_multilabel.io import write_bytes_atomic, write_json_atomic, write_text_atomic
from coco_multilabel.models.checkpoints import read_checkpoint
from coco_multilabel.sweeps.job import read_result

log = logging.getLogger(__name__)

LEADERBOARD = "experiment=leaderboard"  # the documented best recipe (conf/experiment/leaderboard.yaml)
# a measurement, not computed here: `python -m coco_multilabel.bench.holdout_figures` measures it again
EPOCH_CAVEAT = (
    "The cross-fitted figure is honest about the threshold, not about the epoch: each fold's best epoch "
    "was chosen on these rows. On a held-out fold of coco-dev that flattered the leaderboard recipe "
    "by +0.018 (95% interval -0.013 to +0.052; docs/results.md, "
    "`python -m coco_multilabel.bench.holdout_figures`)."
)


def with_recipe(overrides: list[str]) -> list[str]:
    """``experiment=leaderboard`` first, unless the overrides name (or remove) an experiment."""
    if any(o.lstrip("~+").startswith("experiment") for o in overrides):
        return list(overrides)
    return [LEADERBOARD, *overrides]


def run_folds(data: str, k: int, cv_dir: Path, overrides: list[str]) -> int:
    """The multirun over the folds (its exit status); ``folds.json`` is drawn first, once."""
    plain = [o for o in overrides if not o.startswith(("hydra", "~hydra", "+hydra"))]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[f"data.root={data}", *plain])  # bad overrides fail here
    root = check_data_root(data)
    stems = labelled_stems(root)
    folds_file = cv_dir / "folds.json"

    def labels_by_stem() -> dict[str, list[int]]:  # from the labels index every fold's run reads too
        targets = load_label_index(root / "labels" / "train", cfg.data.cache_dir).targets_of(stems)
        return {str(s): np.flatnonzero(t).tolist() for s, t in zip(stems, targets, strict=True)}

    load_or_make_folds(folds_file, labels_by_stem, k, cfg.seed)
    command = [
        sys.executable, "-m", "coco_multilabel.train", f"data.root={data}", f"data.folds={k}",
        f"data.folds_file={folds_file}", f"hydra.sweep.dir={cv_dir}", *overrides,
        "data.fold=" + ",".join(map(str, range(k))), "-m",
    ]  # fmt: skip
    log.info("training %d folds in %s", k, cv_dir)
    return subprocess.run(command, env=os.environ.copy()).returncode


def refit(data: str, k: int, cv_dir: Path, overrides: list[str], record: dict) -> int:
    """One model on every labelled image for the mean of the folds' best epoch counts, given the
    out-of-fold thresholds: ``DIR/refit/checkpoints/refit.ckpt``. Skipped when done, resumed when not."""
    run_dir = cv_dir / "refit"
    chosen = [f["best_epoch"] or f["epochs"] for f in record["folds"]]  # best_epoch counts from 1
    epochs = max(1, round(sum(chosen) / len(chosen)))
    previous = read_result(run_dir)
    if not (previous and previous.get("status") == "done"):
        last = run_dir / "checkpoints" / "last.ckpt"
        command = [
            sys.executable, "-m", "coco_multilabel.train", f"data.root={data}", f"data.folds={k}",
            "data.fold=-1", f"data.folds_file={cv_dir / 'folds.json'}", f"hydra.run.dir={run_dir}",
            *overrides,
            f"trainer.max_epochs={epochs}", "trainer.limit_val_batches=0",  # no val: every image trains
            *([f"resume={run_dir}"] if last.is_file() else []),
        ]  # fmt: skip
        log.info("refit: %d epochs on all %d images in %s", epochs, record["images"], run_dir)
        if status := subprocess.run(command, env=os.environ.copy()).returncode:
            return status
    checkpoint = read_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    checkpoint["state_dict"]["thresholds"] = torch.tensor(record["thresholds"])
    checkpoint["threshold_tuning"] = {**record["tuning"], "tuned_on": "out-of-fold, for a refit"}
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    path = write_bytes_atomic(run_dir / "checkpoints" / "refit.ckpt", buffer.getbuffer())
    result = read_result(run_dir) or {}
    record["refit"] = {"checkpoint": str(path), "epochs": epochs, "wall_s": result.get("wall_s")}
    write_json_atomic(cv_dir / "cv.json", record, indent=1)
    write_text_atomic(cv_dir / "cv.md", markdown(record))
    return 0


def oof_table(cv_dir: Path, seed: int = 0) -> dict:
    """Write ``cv.json``, ``cv.md`` and ``oof.probs.pt`` for the finished folds of ``cv_dir``."""
    if not (cv_dir / "folds.json").is_file():
        raise UserError(
            f"{cv_dir} is not a cross-validation folder (no folds.json); make cv DIR=... writes one"
        )
    members, unfinished = fold_jobs(cv_dir)
    if not members:
        raise UserError(f"{cv_dir} has no finished fold ({'; '.join(unfinished) or 'no job folders'})")
    stems, probs, targets = out_of_fold([m.held_out() for m in members])
    tuning = members[0].checkpoint.get("threshold_tuning") or {}
    scores = oof_scores(probs, targets, tuning, seed)
    folds = [
        {"fold": m.fold, "checkpoint": str(m.path), "val_images": len(m.split["val"]),
         "best_epoch": best_epoch(m.result), "epochs": m.result.get("epochs"),
         "objective": m.result.get("objective"), "best_score": m.result.get("best_score"),
         "wall_s": m.result.get("wall_s")}
        for m in members
    ]  # fmt: skip
    record = {"cv_dir": str(cv_dir), "folds": folds, "unfinished": unfinished, **scores}
    write_json_atomic(cv_dir / "cv.json", record, indent=1)
    save_probabilities(
        cv_dir / "oof.probs.pt", stems, probs, torch.tensor(scores["thresholds"]), scores["tuning"]
    )
    write_text_atomic(cv_dir / "cv.md", markdown(record))
    return record


def markdown(record: dict) -> str:
    objective = record["objective"]
    lines = [
        f"# Cross-validation: {len(record['folds'])} folds done, {record['images']} out-of-fold images",
        "",
    ]
    if record["unfinished"]:
        lines += [f"**Not finished**: {'; '.join(record['unfinished'])}. The table covers the others.", ""]
    lines += [f"| fold | val images | best epoch | {objective} cross-fitted on its val | wall time (s) |",
              "| ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for f in record["folds"]:
        epoch = "" if f["best_epoch"] is None else f"{f['best_epoch']} of {f['epochs']}"
        lines.append(
            f"| {f['fold']} | {f['val_images']} | {epoch} | {_num(f['best_score'])} | {_num(f['wall_s'])} |"
        )
    scores = [f["best_score"] for f in record["folds"] if f["best_score"] is not None]
    if scores:
        lines += ["", f"Mean of the folds' own val figures: {sum(scores) / len(scores):.4f}."]
    lines += ["", f"## Out of fold: all {record['images']} images, each from the model that held it out", "",
              f"Decisions as `make submit` writes them: above the threshold, "
              f"{rule_words(record.get('min_labels', 0))} (`thresholds.min_labels`).", "",
              f"| thresholds | {objective} tuned | cross-fitted | at 0.5 | micro F1 | mAP | threshold |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for mode, result in record["by_mode"].items():
        m = result["metrics"]
        chosen = " (used)" if mode == record["mode"] else ""
        lines.append(
            f"| {mode}{chosen} | {m[f'{objective}_tuned']:.4f} | **{m[f'{objective}_xfit']:.4f}** | "
            f"{m[objective]:.4f} | {m['micro_f1_tuned']:.4f} | {m['map']:.4f} | "
            f"{result['global_threshold']:.2f} |"
        )
    lines += ["", EPOCH_CAVEAT]
    lines += ["", f"## The {len(record['rarest_classes'])} rarest classes, at the thresholds used", "",
              "| class | images | F1 | precision | recall | AP |",
              "| --- | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for r in record["rarest_classes"]:
        lines.append(
            f"| {r['name']} | {r['support']} | {r['f1']:.3f} | {r['precision']:.3f} | {r['recall']:.3f} | "
            f"{r['ap']:.3f} |"
        )
    lines += [
        "",
        f"Submit the fold ensemble with these thresholds: `make submit CKPT={record['cv_dir']} DATA=...`",
    ]
    if refitted := record.get("refit"):
        lines += ["", f"Refit on all {record['images']} images for {refitted['epochs']} epochs "
                  f"({_num(refitted['wall_s'])} s), with these thresholds: "
                  f"`make submit CKPT={refitted['checkpoint']} DATA=...`"]  # fmt: skip
    return "\n".join(lines) + "\n"


def _num(value) -> str:
    return "" if value is None else f"{value:.4g}"


@report_user_errors
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="the data root (images/train, labels/train)")
    parser.add_argument("--folds", type=int, default=5, help="K, the number of folds (default 5)")
    parser.add_argument("--dir", help="the cross-validation folder; the same again resumes it "
                        "(default: a new outputs/cv/<date>_<time>)")  # fmt: skip
    parser.add_argument("--refit", action="store_true", help="then one model on all images, OOF thresholds")
    parser.add_argument(
        "--table-only", action="store_true", help="only (re)write the table of finished folds"
    )
    parser.add_argument("overrides", nargs="*", help="train overrides, as in make train ARGS=...")
    args = parser.parse_args(argv)
    args.overrides = with_recipe(args.overrides)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    cv_dir = Path(args.dir or time.strftime("outputs/cv/%Y-%m-%d_%H-%M-%S")).resolve()
    status = 0
    if not args.table_only:
        print(f"cross-validation folder: {cv_dir} (run again with DIR={cv_dir} to resume)", file=sys.stderr)
        status = run_folds(args.data, args.folds, cv_dir, args.overrides)
        if status == 2:  # refused before any fold started (changed config, another sweep): said above
            sys.exit(2)
    record = oof_table(cv_dir)
    if args.refit and not args.table_only:
        if status or record["unfinished"]:
            raise UserError(f"refit needs every fold done first; run make cv DIR={cv_dir} again")
        status = refit(args.data, args.folds, cv_dir, args.overrides, record)
    print((cv_dir / "cv.md").read_text(), end="")
    print(f"written: {cv_dir / 'cv.md'}, cv.json, oof.probs.pt")
    if status or record["unfinished"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
