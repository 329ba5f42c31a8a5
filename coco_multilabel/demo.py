"""``make demo``: the whole workflow on synthetic data, offline, in a few minutes.

Generates drawn-shape images in the challenge layout, trains the embedded backbone, writes the
submission JSON and scores it against the held-back test labels; exits 1 unless the test macro F1
is well above chance (``demo.min_ratio_to_chance``), so a broken recipe cannot pass for a demo.
"""

from __future__ import annotations

import logging
import shutil
import sys
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from coco_multilabel.cli import CONFIG_DIR, report_user_errors
from coco_multilabel.data.labels import read_label_dir, to_multi_hot
from coco_multilabel.data.synthetic import TEST_LABELS, make_dataset
from coco_multilabel.evaluate import evaluate
from coco_multilabel.metrics import label_scores
from coco_multilabel.reporting.tables import format_scores
from coco_multilabel.submit import submit
from coco_multilabel.train import train

log = logging.getLogger(__name__)


def chance_f1(label_dir: Path) -> float:
    """Macro F1 of naming every class for every image: the score to beat."""
    targets = torch.stack([to_multi_hot(c) for c in read_label_dir(label_dir).values()])
    return label_scores(torch.ones_like(targets), targets)["macro_f1"]


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="demo")
@report_user_errors
def main(cfg: DictConfig) -> None:
    start = time.perf_counter()
    root, run_dir = Path(cfg.data.root), Path(cfg.run_dir)
    if not (root / TEST_LABELS).is_dir():
        make_dataset(root, cfg.demo.n_train, cfg.demo.n_test, cfg.demo.size, seed=cfg.seed)
        log.info("synthetic data written to %s", root)
    for stale in ("checkpoints", "tensorboard"):  # each demo starts from scratch
        shutil.rmtree(run_dir / stale, ignore_errors=True)
    (run_dir / "split.json").unlink(missing_ok=True)

    summary = train(cfg)
    output = submit(summary["best_checkpoint"], str(root), str(run_dir / "submission.json"))
    scores = evaluate(output, root / TEST_LABELS)
    chance = chance_f1(root / TEST_LABELS)
    minutes = (time.perf_counter() - start) / 60
    print(  # the summary holds the best epoch's val metrics
        f"\nval macro F1 of the best epoch: {summary['val/macro_f1']:.3f} at 0.5, "
        f"{summary['val/macro_f1_tuned']:.3f} at the tuned threshold {summary['threshold']}, "
        f"{summary['val/macro_f1_xfit']:.3f} cross-fitted"
    )
    print(format_scores(scores, f"test, {cfg.demo.n_test} images"))
    ratio = scores["macro_f1"] / chance
    passed = ratio >= cfg.demo.min_ratio_to_chance
    print(
        f"test macro F1 {scores['macro_f1']:.3f} is {ratio:.1f}x chance ({chance:.3f}, every class "
        f"everywhere): {'PASS' if passed else 'FAIL'}, at least {cfg.demo.min_ratio_to_chance:g}x is needed"
    )
    print(f"submission: {output}   wall time: {minutes:.1f} min")
    if not passed:  # a silently broken recipe must not look like a working demo
        sys.exit(1)


if __name__ == "__main__":
    main()
