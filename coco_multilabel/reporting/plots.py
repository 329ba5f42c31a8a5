"""The figures of a run, drawn once here for TensorBoard (callbacks/figures.py) and the report.

Every function returns a matplotlib ``Figure`` built without pyplot (no global state, no display
needed); :func:`png` renders one to PNG bytes. Inputs are plain tensors and lists, so a figure can
be drawn from a validation in progress or from predictions saved on disk alike.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # TensorBoard's add_figure imports pyplot: never open a window on a cluster node

import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from torchmetrics.functional.classification import binary_precision_recall_curve  # noqa: E402

from coco_multilabel.decisions.thresholds import GRID, count_table  # noqa: E402
from coco_multilabel.metrics import average_precision, safe_divide, score_tensors  # noqa: E402

CURVE_POINTS = 101  # thresholds of a class's PR curve: exact curves of 40k images are slow to draw


def png(figure: Figure, dpi: int = 100) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    return buffer.getvalue()


def beside(ax, **kwargs) -> None:
    """The legend right of the axes, where it covers no data."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0, **kwargs)


def per_class_figure(rows: list[dict], title: str = "per-class F1 on val") -> Figure:
    """Horizontal F1 bars, worst class at the bottom, with precision and recall as markers.

    ``rows``: :func:`coco_multilabel.metrics.per_class_table`.
    """
    rows = sorted(rows, key=lambda r: r["f1"])
    figure = Figure(figsize=(7, 0.16 * len(rows) + 1.2), layout="constrained")
    ax = figure.subplots()
    y = np.arange(len(rows))
    ax.barh(y, [r["f1"] for r in rows], color="tab:blue", alpha=0.6, label="F1")
    ax.plot([r["precision"] for r in rows], y, "|", color="tab:green", markersize=7, label="precision")
    ax.plot([r["recall"] for r in rows], y, "|", color="tab:red", markersize=7, label="recall")
    ax.set_yticks(y, [f"{r['name']} ({r['support']})" for r in rows], fontsize=6)
    ax.set_ylim(-0.6, len(rows) - 0.4)
    ax.set_xlim(0, 1)
    ax.set_xlabel("score (val positives in brackets)")
    ax.set_title(f"{title}: macro F1 {np.mean([r['f1'] for r in rows]):.3f}", loc="left")
    ax.legend(loc="lower right", bbox_to_anchor=(1, 1), ncol=3, fontsize=7)  # above the bars
    ax.grid(axis="x", alpha=0.3)
    return figure


def pr_curves_figure(
    probs: torch.Tensor,
    targets: torch.Tensor,
    names: Sequence[str],
    classes: int = 8,
    counts: torch.Tensor | None = None,
) -> Figure:
    """The pooled precision-recall curve (from ``counts``, the :func:`count_table` of the threshold
    figure, when given) and those of the ``classes`` most frequent classes."""
    figure = Figure(figsize=(6, 5), layout="constrained")
    ax = figure.subplots()
    targets = targets.long()
    ap = average_precision(probs, targets)
    frequent = torch.argsort(targets.sum(0), descending=True)[:classes]
    for c in frequent.tolist():
        if targets[:, c].sum() == 0:
            continue
        precision, recall, _ = binary_precision_recall_curve(probs[:, c], targets[:, c], CURVE_POINTS)
        ax.plot(recall, precision, linewidth=1, label=f"{names[c]} (AP {ap[c]:.2f})")
    tp, fp, fn = (count_table(probs, targets) if counts is None else counts).sum(1).unbind(-1)
    precision, recall = safe_divide(tp, tp + fp), safe_divide(tp, tp + fn)
    ax.plot(recall, precision, color="black", linewidth=2.5, label="all classes pooled")
    present = ap[~ap.isnan()]
    ax.set_title(f"precision-recall on val: mAP {present.mean() if len(present) else 0:.3f}")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    beside(ax, fontsize=7)
    ax.grid(alpha=0.3)
    return figure


def threshold_figure(
    probs: torch.Tensor,
    targets: torch.Tensor,
    chosen: float | None = None,
    objective: str = "macro_f1",
    counts: torch.Tensor | None = None,
) -> Figure:
    """The F1s against one global threshold, with the threshold the run chose."""
    scores = score_tensors(count_table(probs, targets, GRID) if counts is None else counts)
    figure = Figure(figsize=(6, 4), layout="constrained")
    ax = figure.subplots()
    for name in ("macro_f1", "micro_f1", "cf1"):
        ax.plot(GRID, scores[name], linewidth=2.5 if name == objective else 1, label=name)
    if chosen is not None:
        ax.axvline(chosen, color="grey", linestyle="--", label=f"chosen {chosen:.2f}")
    best = float(scores[objective].max()) if objective in scores else float("nan")
    ax.set_title(f"F1 against the threshold on val: best {objective} {best:.3f}")
    ax.set_xlabel("threshold")
    ax.set_ylabel("score")
    ax.set_xlim(0, 1)
    beside(ax, fontsize=8)
    ax.grid(alpha=0.3)
    return figure


def examples_figure(
    images: Sequence[np.ndarray], truth: Sequence[Sequence[str]], predicted: Sequence[Sequence[str]]
) -> Figure:
    """Images with their true and predicted class names: correct ones green, wrong ones red."""
    columns = min(4, len(images))
    rows = math.ceil(len(images) / columns)
    figure = Figure(figsize=(3 * columns, 3.4 * rows), layout="constrained")
    axes = np.atleast_1d(figure.subplots(rows, columns)).flatten()
    for ax, image, true, pred in zip(axes, images, truth, predicted, strict=False):
        ax.imshow(image)
        missed = [n for n in true if n not in pred]
        wrong = [n for n in pred if n not in true]
        ax.set_title(
            f"true: {_names(true)}\npred: {_names(pred)}",
            fontsize=7,
            color="tab:green" if not (missed or wrong) else "tab:red",
        )
    for ax in axes:
        ax.axis("off")
    return figure


def _names(names: Sequence[str], limit: int = 4) -> str:
    """At most ``limit`` names: an untrained model predicts dozens of classes per image."""
    more = f" +{len(names) - limit}" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more if names else "-"


SCORES = ("val/macro_f1", "val/macro_f1_tuned", "val/map", "train/macro_f1", "train/map")


def learning_curves_figure(series: dict[str, list[tuple[float, float]]]) -> Figure:
    """Loss, scores and learning rate per epoch, from ``{tag: [(epoch, value), ...]}`` (epochs from 1)."""
    panels = {
        "loss": [t for t in series if t.endswith("loss") or t.endswith("loss_epoch")],
        "scores": [t for t in series if t in SCORES or t.endswith("_xfit")],
        "learning rate": [t for t in series if t.startswith("lr")],
    }
    panels = {name: tags for name, tags in panels.items() if tags}
    figure = Figure(figsize=(5 * max(1, len(panels)), 4), layout="constrained")
    axes = np.atleast_1d(figure.subplots(1, max(1, len(panels))))
    for ax, (name, tags) in zip(axes, panels.items(), strict=False):
        _curves(ax, {tag: series[tag] for tag in sorted(tags)}, name)
    return figure


def curves_figure(series: dict[str, list[tuple[float, float]]], title: str) -> Figure:
    """One line per ``{label: [(epoch, value)]}`` on one panel: a metric across a sweep's jobs."""
    figure = Figure(figsize=(7, 4.5), layout="constrained")
    _curves(figure.subplots(), series, title, legend_columns=2)
    return figure


def _curves(ax, series: dict[str, list[tuple[float, float]]], title: str, legend_columns: int = 1) -> None:
    for label, points in series.items():
        epochs, values = zip(*points, strict=True)
        ax.plot(epochs, values, marker="o" if len(epochs) < 30 else None, markersize=3, label=label)
    ax.set_title(title)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # epoch 1, 2, 3: never 0.25
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0, -0.17), ncol=legend_columns)
    ax.grid(alpha=0.3)


def class_frequency_figure(
    names: Sequence[str], train: Sequence[int], val: Sequence[int], n_train: int, n_val: int
) -> Figure:
    """Share of train and val images holding each class, most frequent first."""
    order = np.argsort(-np.asarray(train), kind="stable")
    figure = Figure(figsize=(14, 4.5), layout="constrained")
    ax = figure.subplots()
    x = np.arange(len(names))
    ax.bar(x - 0.2, np.asarray(train)[order] / max(n_train, 1), 0.4, label=f"train ({n_train} images)")
    ax.bar(x + 0.2, np.asarray(val)[order] / max(n_val, 1), 0.4, label=f"val ({n_val} images)")
    ax.set_xticks(x, [names[i] for i in order], rotation=90, fontsize=6)
    ax.set_xlim(-0.7, len(names) - 0.3)
    ax.set_ylabel("share of images holding the class")
    ax.set_title("class frequency", loc="left")
    ax.legend(loc="lower right", bbox_to_anchor=(1, 1), ncol=2, fontsize=8)  # above the bars
    ax.grid(axis="y", alpha=0.3)
    return figure


def mistakes_figure(rows: list[tuple[str, list[tuple[np.ndarray, str]]]]) -> Figure:
    """One row per class: its title on a line of its own, then thumbnails with a caption each
    (``[(class title, [(image, caption)])]``). Each row is a subfigure, so the layout keeps a title
    clear of the thumbnails and captions of the rows above and below it."""
    columns = max([len(items) for _, items in rows] + [1])
    figure = Figure(figsize=(2 * columns, 2.6 * len(rows)), layout="constrained")
    for (title, items), row in zip(rows, np.atleast_1d(figure.subfigures(len(rows), 1)), strict=True):
        row.suptitle(title, x=0.01, ha="left", fontsize=9, fontweight="bold")
        for ax, item in zip(
            np.atleast_1d(row.subplots(1, columns)), [*items, *[None] * columns], strict=False
        ):
            ax.set_xticks([])
            ax.set_yticks([])
            if item is None:
                ax.axis("off")
                continue
            image, caption = item
            ax.imshow(image)
            ax.set_xlabel(caption, fontsize=6)
    return figure


def sweep_figure(labels: Sequence[str], metrics: dict[str, Sequence[float | None]]) -> Figure:
    """Grouped bars of a few metrics per job of a sweep."""
    figure = Figure(figsize=(max(6, 0.9 * len(labels) + 2), 4.5), layout="constrained")
    ax = figure.subplots()
    x = np.arange(len(labels))
    width = 0.8 / max(1, len(metrics))
    for i, (name, values) in enumerate(metrics.items()):
        heights = [np.nan if v is None else v for v in values]
        ax.bar(x + (i - (len(metrics) - 1) / 2) * width, heights, width, label=name)
    ax.set_xticks(x, labels, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("val score of the best epoch")
    ax.set_title("jobs of the sweep, best first", loc="left")
    ax.legend(loc="lower right", bbox_to_anchor=(1, 1), ncol=len(metrics), fontsize=8)  # above the bars
    ax.grid(axis="y", alpha=0.3)
    return figure
