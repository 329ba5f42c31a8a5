"""The report's figures read cleanly: no text over the thumbnails, legends off the data, whole
epochs on epoch axes. Checked on the drawn figure, by the extents matplotlib lays its parts out at."""

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg

from coco_multilabel.classes import COCO_CLASSES
from coco_multilabel.reporting import plots


def drawn(figure):
    FigureCanvasAgg(figure).draw()
    return figure.canvas.get_renderer()


def overlap(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def test_the_worst_classes_titles_stay_clear_of_every_thumbnail_and_caption():
    rng = np.random.default_rng(0)
    shapes = [(96, 128, 3), (128, 85, 3), (128, 128, 3), (72, 128, 3)]  # photos are rarely square
    rows = [
        (
            f"hair drier: F1 0.00, 1 val positive, {k} false positives, 1 false negative",
            [
                (
                    rng.integers(0, 255, shapes[(k + i) % 4], dtype=np.uint8),
                    f"FP 0000001{i}  p=0.9\ntrue: cup +3",
                )
                for i in range(6 if k != 2 else 2)
            ],
        )  # fmt: skip
        for k in range(5)
    ]
    figure = plots.mistakes_figure(rows)
    renderer = drawn(figure)
    titles = [row._suptitle.get_window_extent(renderer) for row in figure.subfigs]
    assert len(titles) == 5
    axes = [ax for row in figure.subfigs for ax in row.axes if ax.images]
    assert len(axes) == 4 * 6 + 2
    for ax in axes:
        parts = [ax.get_window_extent(renderer), ax.xaxis.label.get_window_extent(renderer)]
        for title in titles:
            assert not any(overlap(title, part) for part in parts)


def test_legends_cover_no_bar_and_no_curve():
    labels = ["0: optimizer.lr=0.001", "1: optimizer.lr=0.003", "2: optimizer.lr=0.01"]
    bars = plots.sweep_figure(labels, {"val/macro_f1_xfit": [0.9, 0.88, 0.87], "val/map": [0.95, 0.93, 0.92]})
    renderer = drawn(bars)
    (ax,) = bars.axes
    legend = ax.get_legend().get_window_extent(renderer)
    assert not any(overlap(legend, bar.get_window_extent(renderer)) for bar in ax.patches)

    probs, targets = torch.rand(40, 80), (torch.rand(40, 80) < 0.2).float()
    for figure in (
        plots.pr_curves_figure(probs, targets, COCO_CLASSES),
        plots.threshold_figure(probs, targets, 0.3),
        plots.curves_figure({"a": [(1, 0.1), (2, 0.5), (3, 0.9)], "b": [(1, 0.9), (2, 0.5)]}, "val/map"),
    ):
        renderer = drawn(figure)
        (ax,) = figure.axes
        assert not overlap(ax.get_legend().get_window_extent(renderer), ax.get_window_extent(renderer))


def test_epoch_axes_have_whole_epochs_from_1():
    figure = plots.curves_figure({"job 0": [(1, 0.4)]}, "val/macro_f1_xfit")  # one epoch: ticks were 0.25
    drawn(figure)
    (ax,) = figure.axes
    ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    assert ticks == [1.0]
    curves = plots.learning_curves_figure(
        {"val/loss": [(1, 0.5), (2, 0.4), (3, 0.3)], "lr-AdamW": [(1, 0.1)]}
    )
    drawn(curves)
    for ax in curves.axes:
        shown = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert shown and all(float(t).is_integer() and t >= 1 for t in shown)
