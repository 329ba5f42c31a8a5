"""Sweep summary: ``summary.csv`` and ``summary.md`` in a sweep directory, one row per job, best first.

Built only from the sweep folder: the grid its launch wrote (``grid.json``) and the jobs' folders
(their ``result.json``, or ``.hydra/overrides.yaml`` for a job that has not written one yet), so it
lists every job of the grid and can be rebuilt at any time, also while jobs still run:
``python -m coco_multilabel.sweeps.summary DIR`` (``make sweep-report DIR=...``). A Hydra callback
rebuilds it after every job and at the end of every multirun.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import socket
import sys
from pathlib import Path

from filelock import FileLock
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import OmegaConf

from coco_multilabel.cli import report_user_errors
from coco_multilabel.errors import UserError
from coco_multilabel.io import write_text_atomic
from coco_multilabel.reporting.run_summary import next_commands
from coco_multilabel.sweeps.job import read_result
from coco_multilabel.sweeps.study import is_study_dir
from coco_multilabel.sweeps.study_summary import write_study_summary

GRID = "grid.json"  # every job of the grid and when it was launched; written before the first job
STATUSES = ("done", "skipped", "running", "interrupted", "failed", "pending")


def collect(sweep_dir: str | Path) -> list[dict]:
    """One row per job of the grid (per job folder, for a sweep without ``grid.json``), sorted by
    the objective (best first; unfinished jobs last, in job order). A row's status: done, running,
    interrupted (killed: a relaunch resumes it), failed or pending (not started); a job the latest
    launch found finished before and did not rerun is done with ``skipped`` set."""
    sweep_dir = Path(sweep_dir)
    grid = read_grid(sweep_dir)
    rows = {}
    for job_dir in sweep_dir.iterdir():
        if not job_dir.is_dir():
            continue
        result = read_result(job_dir)
        overrides_file = job_dir / ".hydra" / "overrides.yaml"
        if result is None and not overrides_file.is_file():
            continue  # not a job folder
        if result is None:
            result = {
                "status": "pending",
                "overrides": OmegaConf.to_container(OmegaConf.load(overrides_file)),
            }
        if result["status"] == "running" and not _alive(result):
            result["status"] = "interrupted"  # killed: a relaunch of the sweep resumes it
        if result["status"] == "done" and result.get("ended", "~") < grid.get("launched", ""):
            result["skipped"] = True
        rows[job_dir.name] = {"job": job_dir.name, **result}
    for num, overrides in enumerate(grid.get("jobs", [])):
        rows.setdefault(str(num), {"job": str(num), "status": "pending", "overrides": overrides})
    ordered = [rows[name] for name in sorted(rows, key=_job_order)]
    sign = -1 if all(r.get("objective_mode", "max") == "max" for r in ordered) else 1
    scored = sorted(
        (r for r in ordered if r.get("best_score") is not None), key=lambda r: sign * r["best_score"]
    )
    return scored + [r for r in ordered if r.get("best_score") is None]  # sorted() keeps job order on ties


def read_grid(sweep_dir: Path) -> dict:
    try:
        return json.loads((Path(sweep_dir) / GRID).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}  # an older sweep, or one with its own folder names: its job folders are the grid


def status_of(row: dict) -> str:
    return "skipped" if row.get("skipped") else row["status"]


def counts(rows: list[dict]) -> str:
    """``3 done, 1 running, 5 pending``."""
    found = [status_of(r) for r in rows]
    return ", ".join(f"{found.count(s)} {s}" for s in STATUSES if s in found)


COLUMNS = ["rank", "job", "status", "overrides", "best_score"]
TRAILING = ["best_epoch", "epochs", "wall_s", "device", "best_checkpoint", "error"]  # best_epoch: from 1


def tables(rows: list[dict]) -> tuple[str, str]:
    """The CSV (every override, every val metric) and the Markdown (what differs between jobs, and
    the F1 metrics at tuned thresholds)."""
    metrics = sorted({k for r in rows for k in r if k.startswith("val/")})
    shared = set.intersection(*(set(r["overrides"]) for r in rows)) if len(rows) > 1 else set()
    records = [
        {
            "rank": i + 1 if r.get("best_score") is not None else "",
            "job": r["job"],
            "status": status_of(r),
            "overrides": " ".join(r["overrides"]),
            **{k: r.get(k) for k in ["best_score", *metrics, *TRAILING]},
        }
        for i, r in enumerate(rows)
    ]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=[*COLUMNS, *metrics, *TRAILING], lineterminator="\n")
    writer.writeheader()
    writer.writerows(records)

    objective = next((r["objective"] for r in rows if r.get("objective")), "best_score")
    lines = [f"# Sweep summary: {len(rows)} jobs ({counts(rows)}), sorted by {objective}", ""]
    if any(r.get("skipped") for r in rows):
        lines += ["skipped: finished before the latest launch, and not rerun by it.", ""]
    if shared:
        lines += ["Shared overrides: `" + " ".join(sorted(shared)) + "`", ""]
    head = [*COLUMNS, *markdown_metrics(metrics, objective), *TRAILING]
    lines += ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r, record in zip(rows, records, strict=True):
        record = {**record, "overrides": " ".join(o for o in r["overrides"] if o not in shared)}
        lines.append("| " + " | ".join(_cell(record[k]) for k in head) + " |")
    return out.getvalue(), "\n".join(lines) + "\n"


def markdown_metrics(metrics: list[str], objective: str) -> list[str]:
    """A readable table: the objective, mAP and the F1s at tuned or cross-fitted thresholds."""
    wanted = [
        m for m in metrics if m in (objective, "val/map") or ("f1" in m and m.endswith(("_tuned", "_xfit")))
    ]
    return wanted or metrics


def write_summary(sweep_dir: str | Path) -> Path:
    """(Re)write ``summary.csv`` and ``summary.md`` atomically; jobs ending together take turns."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise UserError(f"sweep directory {sweep_dir} does not exist; pass the hydra.sweep.dir of a multirun")
    with FileLock(sweep_dir / ".summary.lock"):
        csv_text, markdown = tables(collect(sweep_dir))
        write_text_atomic(sweep_dir / "summary.csv", csv_text)
        return write_text_atomic(sweep_dir / "summary.md", markdown)


class SweepSummary(Callback):
    """Hydra callback (``hydra.callbacks`` in conf/train.yaml): the summary is current after every
    job, also when a job failed or the multirun stops early."""

    def on_job_end(self, config, job_return, **kwargs) -> None:
        if config.hydra.mode == RunMode.MULTIRUN:
            write_summary(config.hydra.sweep.dir)

    def on_multirun_end(self, config, **kwargs) -> None:
        """Where the summary is and which job won, with its report and submit commands; also the
        sweep's exit status: 1 when a job failed, with where to read why."""
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        path = write_summary(sweep_dir)
        rows = collect(sweep_dir)
        print(f"sweep summary: {path} ({counts(rows)})")
        best = next((r for r in rows if r.get("best_score") is not None), None)
        if best and not config.data.get("folds"):  # a cross-validation submits the fold ensemble, not a fold
            shared = set.intersection(*(set(r["overrides"]) for r in rows))
            differs = " ".join(o for o in best["overrides"] if o not in shared) or "the only job"
            print(f"best: job {best['job']} ({differs}), {best.get('objective')} {best['best_score']:.4f}")
            for what, command in next_commands(best, sweep_dir / best["job"], config.data.root).items():
                print(f"{what}: {command}")
        failed = [r["job"] for r in rows if r["status"] == "failed"]
        if failed:
            logging.getLogger(__name__).error(
                "%d jobs failed (%s): their reasons are in %s", len(failed), ", ".join(failed), path
            )
            sys.exit(1)


def _alive(result: dict) -> bool:
    """Whether a running job's process still exists (only checkable on the machine it runs on)."""
    if result.get("host") != socket.gethostname() or not result.get("pid"):
        return True
    try:
        os.kill(result["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _job_order(name: str):
    return (0, int(name), "") if name.isdigit() else (1, 0, name)


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


@report_user_errors
def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise UserError("usage: python -m coco_multilabel.sweeps.summary SWEEP_DIR (make sweep-report DIR=)")
    path = write_study_summary(args[0]) if is_study_dir(args[0]) else write_summary(args[0])
    print(path.read_text(), end="")
    print(f"written: {path} and {path.with_suffix('.csv')}")


if __name__ == "__main__":
    main()
