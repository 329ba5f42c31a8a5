"""Sweep summary: ``summary.csv`` and ``summary.md`` in a sweep directory, one row per job, best first.

Built only from the jobs' folders (their ``result.json``, or ``.hydra/overrides.yaml`` for a job
that has not written one yet), so it can be rebuilt at any time, also while jobs still run:
``python -m coco_multilabel.sweeps.summary DIR`` (``make sweep-report DIR=...``). A Hydra callback
rebuilds it after every job and at the end of every multirun.
"""

from __future__ import annotations

import csv
import io
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
from coco_multilabel.sweeps.job import read_result
from coco_multilabel.sweeps.study import is_study_dir
from coco_multilabel.sweeps.study_summary import write_study_summary


def collect(sweep_dir: str | Path) -> list[dict]:
    """One row per job folder, sorted by the objective (best first; unfinished jobs last)."""
    rows = []
    for job_dir in sorted(Path(sweep_dir).iterdir(), key=_job_order):
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
        rows.append({"job": job_dir.name, **result})
    sign = -1 if all(r.get("objective_mode", "max") == "max" for r in rows) else 1
    scored = sorted(
        (r for r in rows if r.get("best_score") is not None), key=lambda r: sign * r["best_score"]
    )
    return scored + [r for r in rows if r.get("best_score") is None]  # sorted() keeps job order on ties


COLUMNS = ["rank", "job", "status", "overrides", "best_score"]
TRAILING = ["epochs", "wall_s", "device", "best_checkpoint", "error"]


def tables(rows: list[dict]) -> tuple[str, str]:
    """The CSV (every override, every val metric) and the Markdown (what differs between jobs, and
    the F1 metrics at tuned thresholds)."""
    metrics = sorted({k for r in rows for k in r if k.startswith("val/")})
    shared = set.intersection(*(set(r["overrides"]) for r in rows)) if len(rows) > 1 else set()
    records = [
        {
            "rank": i + 1 if r.get("best_score") is not None else "",
            "job": r["job"],
            "status": r["status"],
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
    lines = [f"# Sweep summary: {len(rows)} jobs, sorted by {objective}", ""]
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
        """Also the sweep's exit status: 1 when a job failed, with where to read why."""
        if not Path(config.hydra.sweep.dir).is_dir():
            return
        path = write_summary(config.hydra.sweep.dir)
        failed = [r["job"] for r in collect(config.hydra.sweep.dir) if r["status"] == "failed"]
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


def _job_order(path: Path):
    return (0, int(path.name), "") if path.name.isdigit() else (1, 0, path.name)


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
