"""A study's summary (``make search``): ``summary.csv`` and ``summary.md`` in its folder, one row per
trial, best first, and Optuna's plots of the study beside them as PNGs: the objective trial after
trial, which params mattered (PED-ANOVA importance), each param against the objective (a slice
plot: parallel coordinates crowd past a few trials) and each trial's objective epoch by epoch
(where pruned trials stopped). Rebuilt after every trial from the study's journal alone, so it is
the same whichever machine wrote it.
"""

from __future__ import annotations

import csv
import io
import warnings
from pathlib import Path

import matplotlib.figure
import matplotlib.pyplot as plt
import numpy as np
import optuna
from filelock import FileLock
from matplotlib.ticker import MaxNLocator
from optuna.trial import FrozenTrial, TrialState
from optuna.visualization import matplotlib as optuna_plots

from coco_multilabel.io import write_bytes_atomic, write_text_atomic
from coco_multilabel.sweeps.study import Search, counted, open_study, retried, settings

STATES = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed",
          TrialState.RUNNING: "running", TrialState.WAITING: "waiting"}  # fmt: skip
PLOTS = {
    "history.png": "the objective, trial after trial, and the best so far",
    "importance.png": "how much each param decided the objective (PED-ANOVA)",
    "slice.png": "each param against the objective, one panel a param; colour: trial number",
    "intermediate.png": "each trial's objective epoch by epoch: pruned trials stop early",
}


def trial_rows(study: optuna.Study, search: Search) -> list[dict]:
    """One row per trial: complete ones best first, then pruned ones, then the others by number."""
    trials = study.get_trials(deepcopy=False)
    again = retried(trials)
    sign = -1 if search.direction == "maximize" else 1
    ranked = sorted(
        (t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED) and t.value is not None),
        key=lambda t: (t.state != TrialState.COMPLETE, sign * t.value),
    )
    rest = [t for t in trials if t not in ranked]
    rows = []
    for rank, t in enumerate([*ranked, *rest], start=1):
        rows.append({
            "rank": rank if t.state == TrialState.COMPLETE else "",
            "trial": t.number,
            "state": STATES.get(t.state, t.state.name.lower()),
            **{key: t.params.get(key) for key in search.space},
            search.objective: t.value,
            "epochs": t.user_attrs.get("epochs", len(t.intermediate_values) or None),
            "wall_s": t.user_attrs.get("wall_s"),
            "device": t.user_attrs.get("device"),
            "checkpoint": t.user_attrs.get("checkpoint"),
            "note": note(t, again),
        })  # fmt: skip
    return rows


def note(trial: FrozenTrial, again: dict[int, int]) -> str:
    if trial.state == TrialState.PRUNED:
        return f"pruned after epoch {trial.user_attrs.get('pruned_at_epoch', len(trial.intermediate_values))}"
    if trial.state == TrialState.FAIL:
        if trial.number in again:
            return f"its worker stopped; retried as trial {again[trial.number]}"
        return trial.user_attrs.get("error") or "its worker stopped again; not retried"
    if "failed_trial" in trial.system_attrs:
        return f"retry of trial {trial.system_attrs['retry_history'][-1]}"
    if trial.state == TrialState.RUNNING:
        worker = trial.user_attrs.get("worker") or {}
        return f"on {worker.get('host', '?')}"
    return ""


def tables(rows: list[dict], search: Search, study_dir: Path, finished: int) -> tuple[str, str]:
    """The CSV and the Markdown (with the plots written beside it); ``finished``: trials that count."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]) if rows else ["trial"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)

    n_retried = sum("retried as trial" in r["note"] for r in rows)  # its retry counts in its place
    states = [r["state"] for r in rows if "retried as trial" not in r["note"]]
    counts = ", ".join(f"{states.count(s)} {s}" for s in STATES.values() if s in states)
    counts += f"; {n_retried} failed and retried" if n_retried else ""
    scored = (
        f"out of fold over {search.folds} folds" if search.folds else "at its best epoch, on its val split"
    )
    lines = [
        f"# Search: {finished} of {search.trials} trials finished ({counts or 'none yet'})",
        "",
        f"Objective: `{search.objective}` ({search.direction}), each trial scored {scored}. "
        f"Space: {', '.join(f'`{k}: {v}`' for k, v in search.space.items())}. "
        f"Every trial: `{' '.join(search.args)}`.",
        "",
    ]
    if rows and rows[0]["rank"] == 1:
        best = rows[0]
        lines += [
            f"Best: trial {best['trial']}, {search.objective} = {best[search.objective]:.4f}. "
            f"`make submit CKPT={study_dir} DATA=...` submits it; `TOP=n` the n best as an ensemble. "
            "They were chosen by their val figures, so those figures flatter them: selected on val, "
            "not held out.",
            "",
        ]
    head = list(rows[0]) if rows else []
    if head:
        lines += ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
        lines += ["| " + " | ".join(_cell(r[k]) for k in head) + " |" for r in rows]
    for name, what in PLOTS.items():
        if (study_dir / name).is_file():
            lines += ["", f"![{what}]({name})"]
    return out.getvalue(), "\n".join(lines) + "\n"


def figures(study: optuna.Study, objective: str) -> dict[str, matplotlib.figure.Figure]:
    """Optuna's plots of what the study has so far (none of a plot with nothing to show yet). They
    draw through pyplot: a search's worker threads need its Agg backend (``search.main``)."""
    trials = study.get_trials(deepcopy=False)
    complete = sum(t.state == TrialState.COMPLETE for t in trials)
    named = {"target_name": objective}
    draw = {
        "history.png": complete >= 1 and (optuna_plots.plot_optimization_history, named),
        "importance.png": complete >= 2 and (optuna_plots.plot_param_importances, named),
        "slice.png": complete >= 1 and (optuna_plots.plot_slice, named),
        "intermediate.png": any(t.intermediate_values for t in trials)
        and (optuna_plots.plot_intermediate_values, {}),
    }
    result = {}
    # Optuna's plots set pyplot's style for the whole process: kept to these figures
    with warnings.catch_warnings(), plt.rc_context():
        warnings.simplefilter("ignore")  # experimental plots, few trials: notes for Optuna's developers
        for name, plot in draw.items():
            if plot:
                function, kwargs = plot
                axes = function(study, **kwargs)
                if name == "intermediate.png":  # Optuna's steps are this project's epochs
                    axes.set(xlabel="epoch", ylabel=objective)
                    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
                panels = np.atleast_1d(axes)  # the slice plot: one Axes a param
                wide = len(panels) > 1
                panels[0].figure.set_size_inches(3.5 * len(panels) + 1.5 if wide else 8, 4 if wide else 5)
                result[name] = panels[0].figure
    return result


def png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def write_study_summary(study_dir: str | Path) -> Path:
    """(Re)write ``summary.csv``, ``summary.md`` and the plots; workers ending together take turns."""
    study_dir = Path(study_dir)
    study = open_study(study_dir)
    search = settings(study, study_dir)
    with FileLock(study_dir / ".summary.lock"):
        for name, figure in figures(study, search.objective).items():
            write_bytes_atomic(study_dir / name, png(figure))
        finished = len(counted(study.get_trials(deepcopy=False)))
        csv_text, markdown = tables(trial_rows(study, search), search, study_dir, finished)
        write_text_atomic(study_dir / "summary.csv", csv_text)
        return write_text_atomic(study_dir / "summary.md", markdown)


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")
