"""``make ablation``: the plain recipe against each quality technique, and the default recipe.

Every row trains the embedded EfficientNet-Lite0 on the same split of a real data root (default
``../shared/coco-dev``) within the same wall-clock budget, and reports its best epoch: val macro F1
at 0.5 and cross-fitted (thresholds tuned on one half of val, scored on the other), mAP, wall time.
The plain recipe (``experiment=plain``) is full fine-tuning at 224 px with BCE, Adam and threshold
0.5; each technique row adds one thing to it. Prints the table and writes ``outputs/bench/ablation.md``.
``--folds K`` scores every row out of fold instead (K runs a row, on shared folds): recipe choices
then rest on every labelled image rather than one val split.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from coco_multilabel.bench.speed import PLAIN as PLAIN_RECIPE
from coco_multilabel.bench.speed import recipe
from coco_multilabel.data.labels import read_label_dir, to_multi_hot
from coco_multilabel.decisions.oof import oof_scores, out_of_fold
from coco_multilabel.decisions.probabilities import read_probabilities
from coco_multilabel.decisions.thresholds import evaluate_thresholds, rule_of
from coco_multilabel.folders import read_member
from coco_multilabel.io import write_text_atomic
from coco_multilabel.submit import submit

PLAIN = [PLAIN_RECIPE]
TUNED = [*PLAIN, "monitor=val/macro_f1_xfit"]  # technique rows are scored, so chosen, cross-fitted
# name -> overrides of the default recipe; None: the plain run's best checkpoint, re-validated with flips
ROWS: dict[str, list[str] | None] = {
    "plain (BCE, 224 px, threshold 0.5)": PLAIN,
    "+ tuned threshold": PLAIN,  # the same run, scored at its cross-fitted threshold
    "+ tuned threshold + flip TTA": None,
    "+ ASL": [*TUNED, "loss=asl"],
    "+ BCE with positive weights": [*TUNED, "loss=pos_weight"],
    "+ EMA": [*TUNED, "callbacks.ema={_target_:coco_multilabel.callbacks.ema.EMAWeights,decay:0.99}"],
    "+ RandAugment + cutout": [*TUNED, "data.randaugment_ops=2", "data.cutout_prob=0.5"],
    "+ 384 px, whole image": [*TUNED, "data.image_size=384", "data.eval_resize=squash", "data.batch_size=16"],
    "+ CSRA head": [*TUNED, "model.head=csra"],
    # the default recipe's training (last stage and head on cached maps) with everything else plain
    "+ last stage only, on cached maps": [
        "experiment=top_csra",
        "optimizer=adam",
        "~optimizer.weight_decay",  # the recipe's 0.05 is AdamW's decoupled decay; for Adam an L2 penalty
        "loss=bce",
        "model.head=linear",
        "model.tta=false",
        "data.image_size=224",
        "data.eval_resize=crop",
    ],
    # the previous default recipe's schedule with everything else plain
    "+ linear probe, then fine-tune": [
        "experiment=lp_ft",
        "optimizer=adam",
        "optimizer.lr=3e-3",
        "loss=bce",
        "callbacks.ema=null",
        "model.tta=false",
        "data.image_size=224",
        "data.eval_resize=crop",
        "data.batch_size=32",
    ],
    "linear probe + fine-tune recipe (experiment=lp_ft)": ["experiment=lp_ft"],
    "default recipe": [],
}


def tta_scores(checkpoint: str, root: str, out: Path) -> dict:
    """Val scores of a checkpoint predicted with and without its mirror images averaged in."""
    path = submit(checkpoint, root, str(out / "val-tta.json"), images="val", save_probs=True, tta=True,
                  progress_bar=False)  # fmt: skip
    saved = read_probabilities(path.with_suffix(".probs.pt"))
    labels = read_label_dir(Path(root) / "labels" / "train", stems=saved["stems"])
    targets = torch.stack([to_multi_hot(labels[s]) for s in saved["stems"]])
    rule = rule_of(saved["threshold_tuning"])
    scores = evaluate_thresholds(saved["probs"], targets, "global", "macro_f1", min_labels=rule)
    scores.pop("tuning")
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/coco-dev")
    parser.add_argument("--out", default="outputs/bench")
    parser.add_argument("--budget-minutes", type=float, default=15.0, help="wall-clock budget of every row")
    parser.add_argument("--val-fraction", type=float, default=0.2, help="coco-dev is small: 465 val images")
    parser.add_argument("--folds", type=int, help="score every row out of fold over K folds (K runs a row)")
    parser.add_argument("--rows", nargs="*", help="row names (or unique prefixes) to run; default all")
    args = parser.parse_args()
    out = Path(args.out) / "ablation"
    wanted = [n for n in ROWS if not args.rows or any(n.startswith(r) for r in args.rows)]
    rows, runs = [], {}
    for name in wanted:
        overrides = ROWS[name]
        if overrides is None and args.folds:
            print(f"{name}: not scored out of fold (it re-validates one split's checkpoint)", flush=True)
            continue
        if overrides is None:  # flip TTA: the plain run again, validated with mirror images
            plain = runs.get(tuple(PLAIN)) or run(args, out, "plain", PLAIN, runs)
            start = time.perf_counter()
            best = tta_scores(plain["summary"]["best_checkpoint"], args.data, out / "plain")
            result = {**plain, "best": best, "wall_s": plain["wall_s"] + time.perf_counter() - start}
        else:
            result = runs.get(tuple(overrides)) or run(args, out, slug(name), overrides, runs)
        best = result["best"]
        at_half = name.startswith("plain")  # the plain recipe decides at 0.5
        rows.append((name, best["macro_f1"], best["macro_f1_xfit"], best["map"], result["wall_s"], at_half))
        print(f"{name:<36} F1@0.5 {best['macro_f1']:.3f}  xfit {best['macro_f1_xfit']:.3f}  "
              f"mAP {best['map']:.3f}  {result['wall_s']:.0f} s", flush=True)  # fmt: skip
    write_table(args, rows, out.parent / "ablation.md")


def run(args, out: Path, slug_: str, overrides: list[str], runs: dict) -> dict:
    if args.folds:
        result = run_folds(args, out, slug_, overrides)
    else:
        split = ["data.val_fraction=" + str(args.val_fraction)]
        result = recipe(args.data, args.budget_minutes, out / slug_, *split, *overrides)
    runs[tuple(overrides)] = result
    return result


def run_folds(args, out: Path, slug_: str, overrides: list[str]) -> dict:
    """A row scored out of fold: K runs on the folds of ``out/folds.json``, each within the budget;
    its figures are those of every labelled image, each predicted by the run that held it out."""
    shared = [f"data.folds={args.folds}", f"data.folds_file={out / 'folds.json'}"]
    results = [
        recipe(args.data, args.budget_minutes, out / slug_ / str(k), *shared, f"data.fold={k}", *overrides)
        for k in range(args.folds)
    ]
    wall = sum(r["wall_s"] for r in results)
    return {"wall_s": wall, "best": oof_best(results), "summary": results[0]["summary"]}


def oof_best(results: list[dict]) -> dict:
    """The out-of-fold scores (global threshold) of the runs' best checkpoints."""
    members = [read_member(r["summary"]["best_checkpoint"]) for r in results]
    _, probs, targets = out_of_fold([m.held_out() for m in members])
    tuning = members[0].checkpoint.get("threshold_tuning") or {}
    return oof_scores(probs, targets, {**tuning, "mode": "global"})["by_mode"]["global"]["metrics"]


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-") or "default"


def write_table(args, rows: list[tuple], path: Path) -> Path:
    plain = next((r for r in rows if r[0].startswith("plain")), None)
    lines = [
        "| recipe | val macro F1, its decision | at 0.5 | cross-fitted | mAP | vs plain | wall time (s) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, at_half, xfit, map_, wall, decides_at_half in rows:
        score = at_half if decides_at_half else xfit
        ratio = f"{score / plain[1]:.2f}x" if plain and plain[1] > 0 else "–"
        lines.append(
            f"| {name} | **{score:.3f}** | {at_half:.3f} | {xfit:.3f} | {map_:.3f} | {ratio} | {wall:.0f} |"
        )
    command = " ".join(["python -m coco_multilabel.bench.ablation", *sys.argv[1:]])
    folds = getattr(args, "folds", None)
    scoring = (
        f"scored out of fold over {folds} folds (every labelled image)"
        if folds
        else f"data.val_fraction={args.val_fraction}"
    )
    text = (
        f"# make ablation\n\n`{command}` on {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{args.budget_minutes:g} min per {'fold' if folds else 'row'}, {scoring}\n\n"
        "Plain rows decide at 0.5; every other row at its cross-fitted tuned threshold.\n\n"
        + "\n".join(lines) + "\n"
    )  # fmt: skip
    print(text)
    return write_text_atomic(path, text)


if __name__ == "__main__":
    main()
