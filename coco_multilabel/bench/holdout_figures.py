"""What a cross-validation's figures become on held-out images: the nested measurement.

``python -m coco_multilabel.bench.holdout_figures --cv DIR --data ROOT`` takes a ``make cv`` folder
trained on a data root made by ``bench/holdout.py`` (one fold of the labelled images held out as
``images/test``, its labels in ``test-labels/``) and writes ``DIR/holdout.md``:

- **the rule**: the out-of-fold figure of the decision rule with and without ``min_labels``
  (cross-fitted, the mean over several draws of the halves);
- **the epoch**: the out-of-fold figure (the folds' best epochs were chosen on those rows) against
  each fold model alone on the held-out images at the out-of-fold thresholds: the same kind of
  figure, one model on images it never saw at thresholds tuned elsewhere, but with no epoch chosen
  on the images it is measured on. The difference is that choice's optimism, plus the luck of two
  samples of images (an interval over resamples of both);
- **the ensemble's threshold**: the fold ensemble on the held-out images at the thresholds
  ``make submit`` gives it (tuned on out-of-fold rows, each from one fold model), against the best
  threshold on those images (which only their labels can find), what the difference costs, and how
  many labels an image each predicts. A threshold picked on the images it is scored on gains on any
  model, so the same is measured for each fold model alone, whose out-of-fold threshold is its
  own; and cross-fitted (tuned on half the held-out labels, scored on the other half), which has no
  such gain. What the ensemble gains beyond one fold model is what tuning on single models' rows
  costs the ensemble.

Each fold model's held-out probabilities are kept in ``DIR/holdout.members.pt`` (predicted again
when a checkpoint changes), so a rerun takes seconds.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import torch

from coco_multilabel.cli import report_user_errors
from coco_multilabel.cv import oof_table
from coco_multilabel.data.datasets import check_data_root, list_images
from coco_multilabel.data.label_index import load_label_index
from coco_multilabel.decisions.oof import out_of_fold
from coco_multilabel.decisions.thresholds import (
    GRID,
    count_table,
    cross_fit,
    decide,
    evaluate_thresholds,
    rule_of,
    score_at,
    tune_global,
)
from coco_multilabel.errors import UserError
from coco_multilabel.folders import fold_jobs, split_kind
from coco_multilabel.io import load_data_only, write_bytes_atomic, write_text_atomic
from coco_multilabel.metrics import paired_bootstrap, score_tensors
from coco_multilabel.models.checkpoints import load_model
from coco_multilabel.models.ensemble import SharedTrunk, ensemble_thresholds, shared_trunk_groups
from coco_multilabel.models.inference import predict_files

CACHE = "holdout.members.pt"
DRAWS = 2000  # bootstrap resamples of the images
SEEDS = 10  # draws of the cross-fitting halves averaged in the rule comparison
HALVINGS = 50  # draws of the halves for the threshold gains, whose mean moves by ~0.001 at 10


class EachMember(SharedTrunk):
    """:class:`SharedTrunk`, every member's probabilities kept apart: B x members x C."""

    def predict_step(self, batch, batch_idx):
        features = self.trunk_batch(batch)
        return torch.stack([m.probabilities(features) for m in self.members], 1)


def member_probabilities(members: list, paths: list[Path], cache: Path, **inference) -> torch.Tensor:
    """K x N x C: each member's probabilities of ``paths``, from ``cache`` while it is still theirs."""
    key = [[str(m.path), m.path.stat().st_mtime_ns] for m in members] + [[p.name for p in paths]]
    if cache.is_file() and (saved := load_data_only(cache, "held-out probabilities"))["key"] == key:
        return saved["probs"]
    models = [load_model(m.checkpoint, source=m.path) for m in members]
    probs: list[torch.Tensor | None] = [None] * len(members)
    for group in shared_trunk_groups(members, models):
        model = EachMember([models[i] for i in group])
        each, kept = predict_files(model, members[group[0]].checkpoint, paths, **inference)
        if not kept.all():
            raise UserError(f"{int((~kept).sum())} held-out images could not be read: run make check-data")
        for j, i in enumerate(group):
            probs[i] = each[:, j]
    stacked = torch.stack(probs)
    buffer = io.BytesIO()
    torch.save({"key": key, "probs": stacked}, buffer)
    write_bytes_atomic(cache, buffer.getbuffer())
    return stacked


def interval(values: torch.Tensor) -> tuple[float, float]:
    low, high = torch.quantile(values.double(), torch.tensor([0.025, 0.975], dtype=torch.double)).tolist()
    return low, high


def rule_comparison(probs, targets, tuning: dict, seeds: int = SEEDS) -> list[dict]:
    """The out-of-fold figures of the rule with ``min_labels`` 0 and 1, cross-fitted figures
    averaged over ``seeds`` draws of the halves."""
    objective = tuning.get("objective", "macro_f1")
    rows = []
    for min_labels in (0, 1):
        draws = [evaluate_thresholds(probs, targets, "global", objective, seed, min_labels=min_labels)
                 for seed in range(seeds)]  # fmt: skip
        rows.append({
            "min_labels": min_labels, "threshold": draws[0]["threshold"],
            "tuned": draws[0][f"{objective}_tuned"],
            "cross-fitted": sum(d[f"{objective}_xfit"] for d in draws) / seeds,
            "labels an image": float(decide(probs, draws[0]["threshold"], min_labels).sum(1).float().mean()),
        })  # fmt: skip
    return rows


def threshold_gains(probs, targets, threshold: float, objective: str, min_labels: int,
                    seeds: int = HALVINGS) -> dict:  # fmt: skip
    """What a global threshold tuned on these labels gains over ``threshold``: ``in-sample`` on the
    images that chose it, and ``cross-fitted`` (tuned on one half, scored against ``threshold`` on
    the other; the mean over ``seeds`` halvings), with the median threshold the halves chose."""
    curve = score_tensors(count_table(probs, targets, GRID, min_labels))[objective]
    fixed = score_at(probs, targets, threshold, objective, min_labels)
    chosen: list[float] = []

    def tune_fn(p, t):
        chosen.append(tune_global(p, t, objective, min_labels=min_labels).global_threshold)
        return chosen[-1]

    def gain_fn(p, t, tuned):
        return score_at(p, t, tuned, objective, min_labels) - score_at(p, t, threshold, objective, min_labels)

    crossed = [cross_fit(probs, targets, tune_fn, gain_fn, seed) for seed in range(seeds)]
    return {
        "in-sample": float(curve.max()) - fixed, "best threshold": round(float(GRID[int(curve.argmax())]), 4),
        "cross-fitted": sum(crossed) / seeds, "median threshold": float(torch.tensor(chosen).median()),
    }  # fmt: skip


def holdout_figures(cv_dir: Path, root: Path, **inference) -> dict:
    record = oof_table(cv_dir)
    members, _ = fold_jobs(cv_dir)
    thresholds, tuning = ensemble_thresholds(members, split_kind(members))
    objective, min_labels = tuning.get("objective", "macro_f1"), rule_of(tuning)
    _, oof_probs, oof_targets = out_of_fold([m.held_out() for m in members])
    root = check_data_root(root, need=("images/test", "test-labels"))
    paths = list_images(root / "images" / "test")
    targets = torch.from_numpy(
        load_label_index(root / "test-labels").targets_of([p.stem for p in paths])
    ).float()
    each = member_probabilities(members, paths, cv_dir / CACHE, **inference)
    mean = each.mean(0)

    singles = paired_bootstrap(
        [decide(p, thresholds, min_labels) for p in each], targets, DRAWS, metric=objective
    )
    oof_fixed = paired_bootstrap([decide(oof_probs, thresholds, min_labels)], oof_targets, DRAWS, seed=1,
                                 metric=objective)[:, 0]  # fmt: skip
    single_scores = [float(score_tensors(count_table(p, targets, thresholds[:1], min_labels))[objective][0])
                     for p in each]  # fmt: skip
    single_mean = sum(single_scores) / len(single_scores)
    # the bootstrap spreads of both samples around their own figures: the difference's luck
    spread = (oof_fixed - oof_fixed.mean()) - (singles.mean(1) - singles.mean(1).mean())

    curve = score_tensors(count_table(mean, targets, GRID, min_labels))[objective]
    best = int(torch.argmax(curve))
    at_tuned = float(score_tensors(count_table(mean, targets, thresholds[:1], min_labels))[objective][0])
    chosen = [decide(mean, thresholds, min_labels), decide(mean, float(GRID[best]), min_labels)]
    boot = paired_bootstrap(chosen, targets, DRAWS, metric=objective)
    gains = {"ensemble": threshold_gains(mean, targets, float(thresholds[0]), objective, min_labels)}
    alone = [threshold_gains(p, targets, float(thresholds[0]), objective, min_labels) for p in each]
    gains["one fold model"] = {key: sum(g[key] for g in alone) / len(alone) for key in gains["ensemble"]}
    return {
        "cv_dir": str(cv_dir), "objective": objective, "min_labels": min_labels,
        "oof_images": record["images"], "heldout_images": len(paths), "members": len(members),
        "rules": rule_comparison(oof_probs, oof_targets, tuning),
        "oof_xfit": record["score_xfit"], "oof_threshold": float(thresholds[0]),
        "single_scores": single_scores, "single_mean": single_mean,
        "optimism": record["score_xfit"] - single_mean,
        "optimism_interval": [record["score_xfit"] - single_mean + x for x in interval(spread)],
        "ensemble_at_tuned": at_tuned, "ensemble_best_threshold": round(float(GRID[best]), 4),
        "ensemble_best": float(curve[best]), "cost": float(curve[best]) - at_tuned,
        "cost_interval": list(interval(boot[:, 1] - boot[:, 0])), "gains": gains,
        "labels_an_image": {
            "true": float(targets.sum(1).mean()),
            "ensemble": float(decide(mean, thresholds, min_labels).sum(1).float().mean()),
            "one model": float(torch.stack([decide(p, thresholds, min_labels).sum(1).float().mean()
                                            for p in each]).mean()),
        },  # fmt: skip
    }  # fmt: skip


def markdown(f: dict) -> str:
    o, k = f["objective"], f["members"]
    e, s = f["gains"]["ensemble"], f["gains"]["one fold model"]
    lines = [
        f"# Held out: {f['cv_dir']}", "",
        f"{f['oof_images']} out-of-fold images, {f['heldout_images']} held-out images, {k} fold models; "
        f"{o} of the rule submit applies (min_labels={f['min_labels']}).", "",
        "## The decision rule, out of fold (global threshold)", "",
        "| min_labels | threshold | tuned | cross-fitted (mean of 10 halvings) | labels an image |",
        "| ---: | ---: | ---: | ---: | ---: |",
        *(f"| {r['min_labels']} | {r['threshold']:.2f} | {r['tuned']:.4f} | {r['cross-fitted']:.4f} | "
          f"{r['labels an image']:.2f} |" for r in f["rules"]),
        "", "## The epoch chosen on the out-of-fold rows", "",
        f"| out of fold, cross-fitted | one fold model held out, at the OOF threshold "
        f"{f['oof_threshold']:.2f} (mean; each) | optimism (95% interval) |", "| ---: | ---: | ---: |",
        f"| {f['oof_xfit']:.4f} | {f['single_mean']:.4f} "
        f"({', '.join(f'{s:.4f}' for s in f['single_scores'])}) | "
        f"{f['optimism']:+.4f} ({f['optimism_interval'][0]:+.3f} to {f['optimism_interval'][1]:+.3f}) |",
        "", f"## The {k}-fold ensemble's threshold, held out", "",
        "| threshold | from | ensemble held out | labels an image (true: "
        f"{f['labels_an_image']['true']:.2f}) |", "| ---: | --- | ---: | ---: |",
        f"| {f['oof_threshold']:.2f} | out of fold (what submit applies) | {f['ensemble_at_tuned']:.4f} | "
        f"{f['labels_an_image']['ensemble']:.2f} (one model: {f['labels_an_image']['one model']:.2f}) |",
        f"| {f['ensemble_best_threshold']:.2f} | the best on the held-out labels | "
        f"{f['ensemble_best']:.4f} | |",
        "", f"The held-out best threshold gains {f['cost']:+.4f} on the images that chose it "
        f"(paired 95% interval {f['cost_interval'][0]:+.3f} to {f['cost_interval'][1]:+.3f}).",
        "", "## Is that gap the ensemble's?", "",
        "A threshold picked on the images it is scored on gains on any model. Each fold model alone, "
        "whose out-of-fold threshold is its own, shows how much; tuned on half the held-out labels and "
        f"scored on the other half ({HALVINGS} halvings), the gain carries no such selection.", "",
        "| gain of a threshold tuned on the held-out labels over the out-of-fold one | ensemble | "
        f"one fold model (mean of {k}) | the ensemble's own part |", "| --- | ---: | ---: | ---: |",
        *(f"| {label} | {e[key]:+.4f} | {s[key]:+.4f} | {e[key] - s[key]:+.4f} |"
          for label, key in (("on the images that chose it", "in-sample"), ("cross-fitted", "cross-fitted"))),
        f"| the threshold the held-out halves chose (median) | {e['median threshold']:.2f} | "
        f"{s['median threshold']:.2f} | |",
        "", "The ensemble's own part, cross-fitted, is what tuning its threshold on single models' "
        "out-of-fold rows costs it.",
    ]  # fmt: skip
    return "\n".join(lines) + "\n"


@report_user_errors
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cv", required=True, help="a make cv folder trained on --data")
    parser.add_argument("--data", required=True, help="the data root bench/holdout.py made")
    args = parser.parse_args(argv)
    figures = holdout_figures(Path(args.cv), Path(args.data), accelerator="cpu")
    text = markdown(figures)
    write_text_atomic(Path(args.cv) / "holdout.md", text)
    print(text, end="")


if __name__ == "__main__":
    main()
