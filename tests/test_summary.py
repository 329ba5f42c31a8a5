"""The sweep summary, built from job folders in every state a sweep can be in."""

import csv
import json

from omegaconf import OmegaConf

from coco_multilabel.sweeps.summary import GRID, collect, tables, write_summary


def job(sweep, name, **result):
    folder = sweep / name
    (folder / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(result.get("overrides", [])), folder / ".hydra" / "overrides.yaml")
    if result.get("status"):
        (folder / "result.json").write_text(json.dumps(result))


def test_rows_are_sorted_by_the_objective_with_unfinished_jobs_last(tmp_path):
    common = ["data.root=/d"]
    metrics = {"val/map": 0.5, "val/loss": 0.3}
    job(tmp_path, "0", status="done", overrides=[*common, "lr=1"], best_score=0.4, **metrics,
        objective="val/macro_f1_xfit", epochs=2, wall_s=10.0, best_checkpoint="0/best.ckpt")  # fmt: skip
    job(tmp_path, "1", status="failed", overrides=[*common, "lr=2"], error="RuntimeError: boom")
    job(tmp_path, "2", overrides=[*common, "lr=3"])  # started, nothing written yet
    job(tmp_path, "10", status="done", overrides=[*common, "lr=4"], best_score=0.7, **{"val/map": 0.6})
    (tmp_path / "not-a-job").mkdir()
    assert [(r["job"], r["status"]) for r in collect(tmp_path)] == [
        ("10", "done"), ("0", "done"), ("1", "failed"), ("2", "pending")]  # fmt: skip

    markdown = write_summary(tmp_path).read_text()
    rows = list(csv.DictReader((tmp_path / "summary.csv").open()))
    assert [r["rank"] for r in rows] == ["1", "2", "", ""]
    assert rows[0]["overrides"] == "data.root=/d lr=4" and rows[0]["val/map"] == "0.6"
    assert rows[1]["epochs"] == "2" and rows[1]["best_checkpoint"] == "0/best.ckpt"
    assert rows[1]["val/loss"] == "0.3" and "val/loss" not in markdown  # the Markdown keeps F1s and mAP
    assert "sorted by val/macro_f1_xfit" in markdown and "Shared overrides: `data.root=/d`" in markdown
    table = [line for line in markdown.splitlines() if line.startswith("| ")][2:]
    expected = [
        ["10", "done", "lr=4"],
        ["0", "done", "lr=1"],
        ["1", "failed", "lr=2"],
        ["2", "pending", "lr=3"],
    ]
    assert [line.split(" | ")[1:4] for line in table] == expected


def test_a_minimised_objective_sorts_ascending(tmp_path):
    for name, score in (("0", 0.3), ("1", 0.1), ("2", 0.2)):
        job(tmp_path, name, status="done", overrides=[f"x={name}"], best_score=score, objective_mode="min")
    assert [r["job"] for r in collect(tmp_path)] == ["1", "2", "0"]


def test_the_summary_lists_every_job_of_the_grid_with_its_status(tmp_path):
    grid = [["model.dropout=0.0"], ["model.dropout=0.1"], ["model.dropout=0.2"], ["model.dropout=0.3"]]
    (tmp_path / GRID).write_text(json.dumps({"launched": "2026-01-02T00:00:00.000+00:00", "jobs": grid}))
    records = {
        "0": {"status": "done", "ended": "2026-01-01T10:00:00.000+00:00", "best_score": 0.4},  # before launch
        "1": {"status": "done", "ended": "2026-01-02T10:00:00.000+00:00", "best_score": 0.5},
        "2": {"status": "running", "host": "elsewhere", "pid": 1},  # another machine: taken as alive
    }
    for job, record in records.items():
        (tmp_path / job).mkdir()
        (tmp_path / job / "result.json").write_text(json.dumps({**record, "overrides": grid[int(job)]}))
    rows = collect(tmp_path)
    assert [(r["job"], r["status"], r.get("skipped", False)) for r in rows] == [
        ("1", "done", False),
        ("0", "done", True),
        ("2", "running", False),
        ("3", "pending", False),
    ]
    csv_text, markdown = tables(rows)
    assert markdown.startswith("# Sweep summary: 4 jobs (1 done, 1 skipped, 1 running, 1 pending), sorted")
    assert "| 2 | 0 | skipped | model.dropout=0.0 |" in markdown
    assert "|  | 3 | pending | model.dropout=0.3 |" in markdown
    assert csv_text.count(",pending,") == 1
