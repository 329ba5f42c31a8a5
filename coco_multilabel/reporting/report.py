"""The HTML report of a run or a sweep (``make report RUN=...``).

One self-contained ``report.html`` (figures embedded) and the PNGs behind it, in ``<dir>/report/``:
for a run its learning curves, per-class precision/recall/F1, the threshold curve, class frequency
in train and val, the worst classes with example false positives and negatives, and its config;
for a sweep a table and plots across its jobs; for a search (``make search``) its trials and
Optuna's plots of the study; for an ensemble (several checkpoints, a sweep's
``top`` best jobs) its members and the same figures of the mean of their probabilities on the images
none of them trained on, at the thresholds submit uses. A run that is still going is reported as far as it
got; what cannot be drawn yet (no ``best.ckpt``, no data root) is replaced by a note saying why.

The val predictions are made by the code submit uses (``models/inference.py``) and kept in
``report/val.probs.pt`` until ``best.ckpt`` changes.
"""

from __future__ import annotations

import base64
import csv
import html
import logging
import os
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from coco_multilabel.callbacks.best_metrics import best_epoch
from coco_multilabel.classes import COCO_CLASSES, NUM_CLASSES
from coco_multilabel.data.datasets import check_data_root
from coco_multilabel.data.images import load_rgb
from coco_multilabel.data.label_index import DEFAULT_CACHE_DIR, load_label_index
from coco_multilabel.data.labels import to_multi_hot
from coco_multilabel.data.split import read_split, split_image_paths
from coco_multilabel.decisions.oof import oof_scores, out_of_fold
from coco_multilabel.decisions.probabilities import read_probabilities, save_probabilities
from coco_multilabel.decisions.thresholds import count_table, decide, describe, rule_of, rule_words
from coco_multilabel.errors import UserError
from coco_multilabel.folders import fold_jobs, is_cv_dir, read_members, split_kind
from coco_multilabel.io import one_line, write_bytes_atomic, write_text_atomic
from coco_multilabel.metrics import per_class_table
from coco_multilabel.models.checkpoints import load_model, read_checkpoint
from coco_multilabel.models.ensemble import ensemble_thresholds, held_out_probabilities
from coco_multilabel.models.inference import predict_files
from coco_multilabel.progress import plural
from coco_multilabel.reporting import plots
from coco_multilabel.sweeps import study_summary
from coco_multilabel.sweeps.job import read_result
from coco_multilabel.sweeps.study import is_study_dir, open_study, settings
from coco_multilabel.sweeps.summary import collect

log = logging.getLogger(__name__)

WORST = 5  # classes shown with their mistakes
EXAMPLES = 3  # false positives and false negatives shown per class
THUMBNAIL = 128


@dataclass
class Section:
    title: str
    body: str = ""  # HTML
    figure: str | None = None  # PNG file name
    png: bytes | None = None


def report(
    target: str | Path,
    data_root: str | None = None,
    out: str | Path | None = None,
    progress: bool = True,
    top: int | None = None,
) -> Path:
    """Write the report of a run, a sweep or a cv folder, or of an ensemble (checkpoints separated
    by commas, a sweep folder with ``top``); return the path of its ``report.html``."""
    if top or "," in str(target):
        members = read_members(str(target), top)
        out = Path(out) if out else ensemble_folder(members, target, top)
        title, sections = f"Ensemble of {len(members)} models", ensemble_sections(members, data_root)
        return write_report(out, title, sections)
    target = Path(target)
    if not target.is_dir():
        raise UserError(
            f"{target} is not a folder; give a run folder (outputs/train/<run>) or a sweep folder"
        )
    out = Path(out) if out else target / "report"
    if is_cv_dir(target):
        title, sections = f"Cross-validation {target}", cv_sections(target, data_root)
    elif is_run(target):
        title, sections = f"Run {target}", run_sections(target, data_root, out, progress)
    elif is_study_dir(target):
        title, sections = f"Search {target}", study_sections(target)
    elif rows := collect(target):
        title, sections = f"Sweep {target}", sweep_sections(target, rows)
    else:
        raise UserError(f"{target} is neither a run folder (no split.json, .hydra/) nor a sweep folder")
    return write_report(out, title, sections)


def write_report(out: Path, title: str, sections: list[Section]) -> Path:
    for section in sections:
        if section.png is not None:
            write_bytes_atomic(out / section.figure, section.png)
    return write_text_atomic(out / "report.html", render(title, sections))


def is_run(folder: Path) -> bool:
    return any((folder / name).exists() for name in ("split.json", ".hydra/config.yaml", "checkpoints"))


# --- a run ----------------------------------------------------------------------------------------


def run_sections(run_dir: Path, data_root: str | None, out: Path, progress: bool) -> list[Section]:
    result = read_result(run_dir) or {}
    sections = [overview(run_dir, result)]
    series = read_scalars(run_dir)
    if series:
        sections.append(
            figure_section("Learning curves", "learning_curves.png", plots.learning_curves_figure(series))
        )
    else:
        sections.append(Section("Learning curves", note("no TensorBoard or CSV logs in this run yet")))
    root = find_data_root(run_dir, data_root)
    split = read_split(run_dir / "split.json") if (run_dir / "split.json").is_file() else None
    if root is None or split is None:
        why = "no split.json in the run" if split is None else "the data root is unknown or missing"
        sections.append(Section("Validation", note(f"{why}: pass --data DIR (make report ... DATA=DIR)")))
    else:
        index = load_label_index(root / "labels" / "train", run_cache_dir(run_dir))
        classes = index.classes()
        labels = {s: classes[s] for s in split["train"] + split["val"] if s in classes}
        sections += validation_sections(run_dir, root, labels, out, progress)
        sections.append(class_frequency(labels, split))
    sections.append(config_section(run_dir, result))
    return sections


def overview(run_dir: Path, result: dict) -> Section:
    status = result.get("status", "unknown (no result.json)")
    rows = {
        "status": status,
        "objective": result.get("objective"),
        "best score": result.get("best_score"),
        "best epoch": epoch_of_run(result),
        "wall time": duration(result.get("wall_s")),  # every segment of a resumed run
        "resumed": ", ".join(f"after epoch {r['after_epoch']}" for r in result.get("resumes", [])),
        "best checkpoint": result.get("best_checkpoint"),
        "overrides": " ".join(result.get("overrides", [])),
    }
    body = table([{"": k, "value": v} for k, v in rows.items() if v not in (None, "")])
    if status == "running":
        body += note("the run is still going: this report shows it as far as it got")
    return Section("Overview", body)


def duration(seconds: float | None) -> str | None:
    """``1 h 02 min``, ``3 min 40 s``, ``12 s``: what a person reads at a glance."""
    if seconds is None:
        return None
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


def epoch_of_run(result: dict) -> str | None:
    """``3 of 15``: the best epoch of a run's ``epochs``, counted from 1."""
    best, epochs = best_epoch(result), result.get("epochs")
    if best is None:
        return None if epochs is None else f"- of {epochs}"
    return f"{best} of {epochs}"


def read_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Per-epoch scalars ``{tag: [(epoch, value)]}``, epochs counted from 1 over the whole run, from
    the TensorBoard events, else the CSV logger; a resumed run's repeated epoch keeps its last value."""
    if any((run_dir / "tensorboard").glob("events.out.tfevents.*")):
        return _tensorboard_scalars(run_dir / "tensorboard")
    if (run_dir / "csv" / "metrics.csv").is_file():
        return _csv_scalars(run_dir / "csv" / "metrics.csv")
    return {}


def _tensorboard_scalars(folder: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 1})
    events.Reload()
    tags = events.Tags()["scalars"]
    epoch_of = {e.step: int(e.value) for e in events.Scalars("epoch")} if "epoch" in tags else {}
    series = {}
    for tag in tags:
        if tag == "epoch" or tag.endswith("_step"):
            continue
        scalars = events.Scalars(tag)
        if all(e.step in epoch_of for e in scalars):
            series[tag] = sorted({epoch_of[e.step] + 1: e.value for e in scalars}.items())
        else:
            series[tag] = _once_per_epoch({e.step: e.value for e in scalars})
    return series


def _once_per_epoch(by_step: dict[int, float]) -> list[tuple[int, float]]:
    """A tag logged without the epoch (LearningRateMonitor, at each epoch's start): one value per
    step, the last one (a resumed epoch starts again at the same step), numbered 1, 2, ..."""
    return [(i + 1, value) for i, (_, value) in enumerate(sorted(by_step.items()))]


def _csv_scalars(path: Path) -> dict:
    by_epoch: dict[str, dict] = {}
    by_step: dict[str, dict] = {}  # rows without an epoch, as above
    with path.open(newline="") as file:
        for row in csv.DictReader(file):
            for tag, value in row.items():
                if tag in ("epoch", "step") or tag.endswith("_step") or value in ("", None):
                    continue
                if row.get("epoch"):
                    by_epoch.setdefault(tag, {})[int(float(row["epoch"])) + 1] = float(value)
                else:
                    by_step.setdefault(tag, {})[int(float(row.get("step") or 0))] = float(value)
    series = {tag: sorted(values.items()) for tag, values in by_epoch.items()}
    return {**series, **{tag: _once_per_epoch(values) for tag, values in by_step.items()}}


def find_data_root(run_dir: Path, data_root: str | None) -> Path | None:
    """``data_root``, or the run's ``data.root`` (relative to where the run was started)."""
    if data_root:
        return check_data_root(data_root)
    config = run_dir / ".hydra" / "config.yaml"
    if not config.is_file():
        return None
    try:  # Hydra writes these files in place: a run killed at its start may leave them cut short
        root = OmegaConf.load(config).get("data", {}).get("root")
        if not root:
            return None
        root = Path(root)
        hydra_file = run_dir / ".hydra" / "hydra.yaml"
        if not root.is_absolute() and hydra_file.is_file():
            cwd = OmegaConf.select(OmegaConf.load(hydra_file), "hydra.runtime.cwd")
            root = Path(cwd) / root if cwd else root
    except Exception as err:
        log.warning("cannot read %s (%s); pass --data DIR", config, one_line(err))
        return None
    return root if (root / "labels" / "train").is_dir() else None


def run_cache_dir(run_dir: Path) -> Path:
    """The run's ``data.cache_dir`` (where its labels index is), relative to where it was started."""
    config, hydra_file = run_dir / ".hydra" / "config.yaml", run_dir / ".hydra" / "hydra.yaml"
    cache_dir = OmegaConf.select(OmegaConf.load(config), "data.cache_dir") if config.is_file() else None
    cache_dir = Path(cache_dir or DEFAULT_CACHE_DIR)
    if not cache_dir.is_absolute() and hydra_file.is_file():
        cwd = OmegaConf.select(OmegaConf.load(hydra_file), "hydra.runtime.cwd")
        cache_dir = Path(cwd) / cache_dir if cwd else cache_dir
    return cache_dir


def val_predictions(run_dir: Path, root: Path, out: Path, progress: bool) -> dict | None:
    """The best checkpoint's val probabilities, predicted as submit predicts (``models/inference.py``)
    and kept in ``report/val.probs.pt`` until ``best.ckpt`` changes."""
    ckpt = run_dir / "checkpoints" / "best.ckpt"
    if not ckpt.is_file():
        return None
    probs_file = out / "val.probs.pt"
    if not probs_file.is_file() or probs_file.stat().st_mtime < ckpt.stat().st_mtime:
        log.info("predicting the val split with %s", ckpt)
        checkpoint = read_checkpoint(ckpt)
        model = load_model(checkpoint, source=ckpt)
        paths = split_image_paths(run_dir / "split.json", root, "val")
        probs, kept = predict_files(model, checkpoint, paths, progress_bar=progress, on_bad_image="skip")
        stems = [p.stem for p, k in zip(paths, kept.tolist(), strict=True) if k]
        save_probabilities(probs_file, stems, probs, model.thresholds, checkpoint.get("threshold_tuning"))
    return read_probabilities(probs_file)


def validation_sections(run_dir: Path, root: Path, labels: dict, out: Path, progress: bool) -> list[Section]:
    saved = val_predictions(run_dir, root, out, progress)
    if saved is None:
        return [
            Section("Validation", note("no checkpoints/best.ckpt yet: it appears after the first validation"))
        ]
    targets = torch.stack([to_multi_hot(labels[s]) for s in saved["stems"]])
    return prediction_sections(saved, targets, root, "val, best checkpoint", "on val")


def prediction_sections(
    saved: dict, targets: torch.Tensor, root: Path, what: str, tuned_on: str
) -> list[Section]:
    """Per-class scores, the threshold curve, PR curves and the worst classes of saved probabilities."""
    stems, probs, thresholds = saved["stems"], saved["probs"], saved["thresholds"]
    tuning = saved.get("threshold_tuning") or {}
    decisions = decide(probs, thresholds, rule_of(tuning))  # the labels submit writes
    rows = per_class_table(decisions, targets, COCO_CLASSES, probs=probs, thresholds=thresholds)
    counts = count_table(probs, targets, min_labels=rule_of(tuning))
    chosen = tuning.get("global_threshold")
    ranked = sorted(rows, key=lambda r: r["f1"], reverse=True)
    return [
        figure_section(
            f"Per-class precision, recall and F1 ({what})",
            "per_class.png",
            plots.per_class_figure(rows),
            f"<details><summary>table</summary>{table(ranked)}</details>",
        ),
        figure_section(
            "F1 against the threshold",
            "thresholds.png",
            plots.threshold_figure(probs, targets, chosen, tuning.get("objective", "macro_f1"), counts),
            note(
                f"thresholds: {tuning.get('mode', 'untuned (0.5)')}, chosen "
                f"{chosen} maximising {tuning.get('objective', '-')} {tuned_on}; "
                f"{rule_words(rule_of(tuning))}"
            ),
        ),
        figure_section(
            "Precision-recall curves",
            "pr_curves.png",
            plots.pr_curves_figure(probs, targets, COCO_CLASSES, counts=counts),
        ),
        worst_classes(root, stems, probs, targets, decisions, rows)
        if root is not None
        else Section(
            "Worst classes",
            note("the data root is unknown or missing: pass --data DIR (make report ... DATA=DIR)"),
        ),
    ]


def worst_classes(root, stems, probs, targets, decisions, rows) -> Section:
    """The lowest-F1 classes among those with val positives, each with its most confident false
    positives and its least confident false negatives."""
    worst = sorted((r for r in rows if r["support"] > 0), key=lambda r: r["f1"])[:WORST]
    figure_rows = []
    for r in worst:
        c = r["class"]
        predicted, positive = decisions[:, c], targets[:, c].bool()
        fp = [
            i
            for i in torch.argsort(probs[:, c], descending=True).tolist()
            if predicted[i] and not positive[i]
        ]
        fn = [i for i in torch.argsort(probs[:, c]).tolist() if positive[i] and not predicted[i]]
        items = [(i, "FP") for i in fp[:EXAMPLES]] + [(i, "FN") for i in fn[:EXAMPLES]]
        thumbs = [
            (
                thumbnail(root / "images" / "train" / f"{stems[i]}.jpg"),
                f"{kind} {stems[i]}  p={probs[i, c]:.2f}\ntrue: {_names(targets[i])}",
            )
            for i, kind in items
        ]
        title = (
            f"{r['name']}: F1 {r['f1']:.2f}, {plural(r['support'], 'val positive')}, "
            f"{plural(len(fp), 'false positive')}, {plural(len(fn), 'false negative')}"
        )
        figure_rows.append((title, [(image, caption) for image, caption in thumbs if image is not None]))
    if not figure_rows:
        return Section("Worst classes", note("no class has val positives"))
    return figure_section(
        f"The {len(worst)} worst classes: false positives, then false negatives",
        "worst_classes.png",
        plots.mistakes_figure(figure_rows),
    )


def thumbnail(path: Path) -> np.ndarray | None:
    try:
        image = load_rgb(path, min_side=THUMBNAIL)
    except UserError:
        return None
    image.thumbnail((THUMBNAIL, THUMBNAIL))
    return np.asarray(image)


def _names(target: torch.Tensor, limit: int = 3) -> str:
    names = [COCO_CLASSES[c] for c in torch.nonzero(target).flatten()]
    return ", ".join(names[:limit]) + (f" +{len(names) - limit}" if len(names) > limit else "") or "-"


def class_frequency(labels: dict, split: dict) -> Section:
    counts = {}
    for part in ("train", "val"):
        classes = [c for s in split[part] for c in labels[s]]
        counts[part] = np.bincount(classes, minlength=NUM_CLASSES)
    return figure_section(
        "Class frequency",
        "class_frequency.png",
        plots.class_frequency_figure(
            COCO_CLASSES, counts["train"], counts["val"], len(split["train"]), len(split["val"])
        ),
    )


def config_section(run_dir: Path, result: dict) -> Section:
    """The config the run last ran with (its record's; a resume may have raised the epoch cap),
    else the one it was made with."""
    config = run_dir / ".hydra" / "config.yaml"
    if result.get("config"):
        return Section("Config", f"<pre>{html.escape(OmegaConf.to_yaml(result['config']))}</pre>")
    if not config.is_file():
        return Section("Config", note("no .hydra/config.yaml in this run"))
    return Section("Config", f"<pre>{html.escape(config.read_text())}</pre>")


# --- a sweep --------------------------------------------------------------------------------------


def sweep_sections(sweep_dir: Path, rows: list[dict]) -> list[Section]:
    shared = set.intersection(*(set(r.get("overrides", [])) for r in rows)) if len(rows) > 1 else set()
    labels = [f"{r['job']}: " + " ".join(o for o in r.get("overrides", []) if o not in shared) for r in rows]
    objective = next((r["objective"] for r in rows if r.get("objective")), "best_score")
    records = []
    for r, label in zip(rows, labels, strict=True):
        job_report = sweep_dir / r["job"] / "report" / "report.html"
        records.append(
            {
                "job": label,
                "status": r["status"],
                objective: r.get("best_score"),
                "val/map": r.get("val/map"),
                "val/macro_f1_tuned": r.get("val/macro_f1_tuned"),
                "best epoch": epoch_of_run(r),
                "wall_s": r.get("wall_s"),
                "report": job_link(r["job"])
                if job_report.is_file()
                else html.escape(f"make report RUN={sweep_dir / r['job']}"),
            }
        )
    body = table(records, raw=("report",))
    if shared:
        body = note("shared overrides: " + " ".join(sorted(shared))) + body
    sections = [Section(f"{len(rows)} jobs, best first by {objective}", body)]
    scored = [(label, r) for label, r in zip(labels, rows, strict=True) if r.get("best_score") is not None]
    if scored:
        metrics = {
            objective: [r.get("best_score") for _, r in scored],
            "val/map": [r.get("val/map") for _, r in scored],
        }
        sections.append(
            figure_section(
                "Comparison", "comparison.png", plots.sweep_figure([label for label, _ in scored], metrics)
            )
        )
    curves = {}
    for label, r in zip(labels, rows, strict=True):
        series = read_scalars(sweep_dir / r["job"])
        if objective in series:
            curves[label] = series[objective]
    if curves:
        sections.append(
            figure_section(f"{objective} per epoch", "curves.png", plots.curves_figure(curves, objective))
        )
    return sections


def study_sections(study_dir: Path) -> list[Section]:
    """A search (``make search``): its trials best first, then Optuna's plots of the study."""
    study = open_study(study_dir)
    search = settings(study, study_dir)
    rows = study_summary.trial_rows(study, search)
    sections = [Section(f"{len(rows)} trials, best first by {search.objective}", table(rows))]
    for name, figure in study_summary.figures(study, search.objective).items():
        sections.append(Section(study_summary.PLOTS[name], "", name, study_summary.png(figure)))
    return sections


def cv_sections(cv_dir: Path, data_root: str | None) -> list[Section]:
    """A ``make cv`` folder: its folds compared, then what the out-of-fold probabilities show (each
    labelled image as predicted by the fold model that did not train on it, at the OOF thresholds)."""
    rows = collect(cv_dir)
    sections = sweep_sections(cv_dir, rows) if rows else []
    members, unfinished = fold_jobs(cv_dir)
    if not members:
        return [*sections, Section("Out of fold", note("no fold is finished yet"))]
    stems, probs, targets = out_of_fold([m.held_out() for m in members])
    scores = oof_scores(probs, targets, members[0].checkpoint.get("threshold_tuning") or {})
    saved = {"stems": stems, "probs": probs, "thresholds": torch.tensor(scores["thresholds"]),
             "threshold_tuning": scores["tuning"]}  # fmt: skip
    missing = f"; not finished: {'; '.join(unfinished)}" if unfinished else ""
    sections.append(Section("Out of fold", note(
        f"{len(stems)} images from {len(members)} fold models{missing}. {scores['objective']} cross-fitted: "
        f"{scores['score_xfit']:.4f} ({scores['mode']} thresholds)"
    )))  # fmt: skip
    root = find_data_root(members[0].path.parent.parent, data_root)  # <fold>/checkpoints/best.ckpt
    return [*sections, *prediction_sections(saved, targets, root, "out of fold", "on the out-of-fold images")]


# --- an ensemble -----------------------------------------------------------------------------------


def ensemble_folder(members: list, target, top: int | None) -> Path:
    """``<sweep>/report-top<n>``, or ``report-ensemble`` in the folder holding the members' runs."""
    if top:
        return Path(target) / f"report-top{top}"
    runs = [m.path.resolve().parent.parent for m in members]  # <run>/checkpoints/best.ckpt
    return Path(os.path.commonpath(runs)) / "report-ensemble"


def ensemble_sections(members: list, data_root: str | None) -> list[Section]:
    """The members, then the figures of the ensemble's probabilities on the images none of them
    trained on (out of fold, or a shared val split) at the thresholds ``make submit`` uses: the
    same numbers submit tunes its thresholds on, with no inference. A shared val split chose the
    members (their best epochs; a sweep's TOP=n by their scores): its figures are labelled so."""
    kind = split_kind(members)
    stems, probs, targets = held_out_probabilities(members, kind)
    thresholds, tuning = ensemble_thresholds(members, kind)
    rows = []
    for m in members:
        run_tuning = m.checkpoint.get("threshold_tuning") or {}
        rows.append({"member": str(m.path), "fold": m.fold, "its own val images": len(m.held_out().stems),
                     "its objective": run_tuning.get("score_xfit")})  # fmt: skip
    if kind == "folds":
        what = "out of fold"
        where = f"{len(stems)} images, each predicted by the fold model that held it out (out of fold)"
    else:
        what = f"the val images that selected the members, mean of {len(members)} models"
        where = (
            f"{len(stems)} val images that no member trained on but that selected them (each one's best "
            "epoch; a sweep's TOP=n also picks its members by them): a figure on them carries that "
            "selection, it is not a held-out figure. For an honest one, cross-validate (make cv)"
        )
    body = table(rows) + note(where) + note(f"decision: {describe(tuning)}")
    saved = {"stems": stems, "probs": probs, "thresholds": thresholds, "threshold_tuning": tuning}
    root = find_data_root(members[0].path.parent.parent, data_root)
    return [Section("Members", body), *prediction_sections(saved, targets, root, what, "on these images")]


# --- HTML -----------------------------------------------------------------------------------------


def figure_section(title: str, name: str, figure, body: str = "") -> Section:
    return Section(title, body, name, plots.png(figure))


def job_link(job: str) -> str:
    """A link to a job's report: a folder name may hold any character, quoted for the URL and escaped."""
    return f'<a href="{html.escape(urllib.parse.quote(f"../{job}/report/report.html"))}">open</a>'


def note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def number(value: float) -> str:
    """3 decimals, as scores read; a small value (a learning rate, a weight decay) to 3 significant
    digits, which 3 decimals would round to 0.000; a large one (seconds) whole."""
    if value != 0 and abs(value) < 0.01:
        return f"{value:.3g}"
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3f}"


def table(rows: list[dict], raw: tuple[str, ...] = ()) -> str:
    """An HTML table, floats as :func:`number` writes them; the ``raw`` columns are HTML already."""
    if not rows:
        return ""

    def cell(key, value):
        if key in raw:
            return str(value)
        return html.escape(number(value) if isinstance(value, float) else "" if value is None else str(value))

    head = "".join(f"<th>{html.escape(str(k))}</th>" for k in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{cell(k, v)}</td>" for k, v in r.items()) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


STYLE = """body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:0.85em}td,th{border:1px solid #ccc;padding:2px 6px;text-align:left}
img{max-width:100%}.note{color:#666;font-style:italic}pre{background:#f6f6f6;padding:1em;overflow:auto}"""


def render(title: str, sections: list[Section]) -> str:
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>",
        f"<p class='note'>written {time.strftime('%Y-%m-%d %H:%M')} by make report</p>",
    ]
    for s in sections:
        parts.append(f"<h2>{html.escape(s.title)}</h2>")
        if s.png is not None:
            encoded = base64.b64encode(s.png).decode("ascii")
            parts.append(f'<img src="data:image/png;base64,{encoded}" alt="{html.escape(s.figure)}">')
        parts.append(s.body)
    return "\n".join([*parts, "</body></html>\n"])
