"""What train prints when it ends: how the best epoch scored, where its files are, what to run next."""

from __future__ import annotations

from pathlib import Path

from lightning.fabric.utilities.rank_zero import rank_zero_only
from rich.console import Console
from rich.table import Table

from coco_multilabel.callbacks.best_metrics import best_epoch
from coco_multilabel.progress import is_terminal, plural

SHOWN = (  # the objective comes first; then these, when logged
    ("val/macro_f1_tuned", "val/macro_f1_tuned (tuned on val)"),
    ("val/macro_f1", "val/macro_f1 (at 0.5)"),
    ("val/map", "val/map"),
    ("val/loss", "val/loss"),
)


def describe_phases(phases: list[dict]) -> str:
    """``top: 15 epochs, top on cache; ...``: what each phase of the schedule ran."""
    return "; ".join(
        f"{p['name']}: {plural(p['epochs'], 'epoch')}, {p['train']} on {p['inputs']}" for p in phases
    )


def describe_precision(summary: dict) -> str:
    evaluation = {"32": "float32", "bf16": "bf16", "16": "fp16"}.get(summary.get("eval_precision"), "?")
    return f"{summary['precision']} training; {evaluation} cache, validation, thresholds and submit"


def next_commands(summary: dict, run_dir: str | Path, data_root: str) -> dict[str, str]:
    best = summary.get("best_checkpoint")
    commands = {"report": f"make report RUN={run_dir}"}
    if best:
        commands["submit"] = f"make submit CKPT={best} DATA={data_root} OUT=submission.json"
    return commands


def summary_table(summary: dict, run_dir: str | Path, data_root: str) -> Table:
    table = Table(title=f"run {run_dir}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(overflow="fold")  # paths in full, folded, never cut
    if summary.get("phases"):
        table.add_row("phases", describe_phases(summary["phases"]))
    if summary.get("precision"):
        table.add_row("precision", describe_precision(summary))
    if (best := best_epoch(summary)) is not None:
        table.add_row("best epoch", f"{best} of {summary['epochs']}")
    if cut := summary.get("cut_epoch"):
        table.add_row(
            "cut short",
            f"epoch {cut['epoch']} by trainer.max_time, after {cut['batches']} of {cut['of']} batches",
        )
    objective = summary.get("objective")
    if summary.get("best_score") is not None:
        table.add_row(f"{objective} (picks best.ckpt)", f"{summary['best_score']:.4f}")
    for key, label in SHOWN:
        if key != objective and summary.get(key) is not None:
            table.add_row(label, f"{summary[key]:.4f}")
    if summary.get("threshold") is not None:
        table.add_row("threshold (global)", str(summary["threshold"]))
    best = summary.get("best_checkpoint")
    if best:
        table.add_row("best checkpoint", str(best))
        thresholds = Path(best).with_name("thresholds.json")
        if thresholds.is_file():
            table.add_row("thresholds", str(thresholds))
    else:
        table.add_row("best checkpoint", "none: no validation finished")
    report = Path(run_dir) / "report" / "report.html"
    table.add_row("report", f"{report}{'' if report.is_file() else ' (make report, below)'}")
    return table


@rank_zero_only
def print_summary(summary: dict, run_dir: str | Path, data_root: str) -> None:
    # written to a file, rich would fold the table at 80 columns, paths included: as wide as it needs
    console = Console() if is_terminal() else Console(width=200)
    console.print(summary_table(summary, run_dir, data_root))
    for what, command in next_commands(summary, run_dir, data_root).items():
        console.print(f"{what}: [bold]{command}[/bold]", soft_wrap=True)  # one line: copy and paste
