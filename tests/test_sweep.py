"""End-to-end sweeps, DDP and resume through the real CLI, in subprocesses as a user runs them."""

import csv
import json
import os
import shutil
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
import torch

from coco_multilabel.cli import CONFIG_DIR
from coco_multilabel.errors import UserError
from coco_multilabel.sweeps.job import check_one_device, run_job
from coco_multilabel.sweeps.summary import write_summary
from coco_multilabel.train import train
from coco_multilabel.training.resume import changed_keys
from tests.helpers import ROOT, cli


def kill_at(epoch: int, marker: Path, job_num: int | None = None) -> list[str]:
    """Overrides that make the run (or one job of the sweep) kill its process group once."""
    args = ["+callbacks.kill._target_=tests.helpers.KillAtEpoch", f"+callbacks.kill.epoch={epoch}",
            f"+callbacks.kill.marker={marker}"]  # fmt: skip
    return args + ([f"+callbacks.kill.job_num={job_num}"] if job_num is not None else [])


def read_csv(path: Path) -> list[dict]:
    with path.open() as file:
        return list(csv.DictReader(file))


@pytest.mark.slow
def test_multirun_runs_jobs_side_by_side_on_distinct_devices_and_writes_a_sorted_summary(tiny_root, tmp_path):
    sweep = tmp_path / "sweep"
    result = cli(f"data.root={tiny_root}", f"hydra.sweep.dir={sweep}", "device_pool.ids=[0,1]",
                 f"device_pool.lock_dir={tmp_path / 'locks'}", "device_pool.poll_s=0.05",
                 "optimizer.lr=0.0001,0.03,0.003", "-m", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_csv(sweep / "summary.csv")
    assert sorted(r["job"] for r in rows) == ["0", "1", "2"]
    assert all(r["status"] == "done" and r["epochs"] == "1" for r in rows)
    scores = [float(r["best_score"]) for r in rows]
    assert scores == sorted(scores, reverse=True) and [r["rank"] for r in rows] == ["1", "2", "3"]
    results = {r["job"]: json.loads((sweep / r["job"] / "result.json").read_text()) for r in rows}
    for row in rows:
        job = results[row["job"]]
        assert row["overrides"] == " ".join(job["overrides"])
        assert float(row["best_score"]) == pytest.approx(job["best_score"])
        objective = job["objective"]  # the checkpoint monitor; its best-epoch value is the best score
        assert float(row[objective]) == pytest.approx(job[objective]) == pytest.approx(job["best_score"])
        assert Path(row["best_checkpoint"]).is_file()
    assert sorted(j["overrides"][-1] for j in results.values()) == [
        "optimizer.lr=0.0001", "optimizer.lr=0.003", "optimizer.lr=0.03"]  # fmt: skip
    assert {j["device"] for j in results.values()} <= {"0", "1"}
    for device in ("0", "1"):  # never two jobs on one device at the same time
        spans = sorted((j["started"], j["ended"]) for j in results.values() if j["device"] == device)
        assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:], strict=False))
    markdown = (sweep / "summary.md").read_text()
    assert markdown.count("| done |") == 3 and "optimizer.lr=0.03 |" in markdown
    # make sweep-report rebuilds the same files from the job folders
    (sweep / "summary.csv").unlink()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    report = subprocess.run(
        [sys.executable, "-m", "coco_multilabel.sweeps.summary", str(sweep)],
        env=env,
        capture_output=True,
        text=True,
    )
    assert report.returncode == 0 and read_csv(sweep / "summary.csv") == rows


@pytest.mark.slow
def test_a_killed_multirun_relaunched_skips_finished_jobs_resumes_the_rest_and_refuses_a_changed_config(
    tiny_root, tmp_path
):
    conf = shutil.copytree(CONFIG_DIR, tmp_path / "conf")  # a config folder a user edits between launches
    sweep, marker = tmp_path / "sweep", tmp_path / "killed"
    args = [f"data.root={tiny_root}", f"hydra.sweep.dir={sweep}", "trainer.max_epochs=2",
            "device_pool.ids=[0]", f"device_pool.lock_dir={tmp_path / 'locks'}",
            *kill_at(1, marker, job_num=1), "optimizer.lr=0.001,0.003,0.01", "-m"]  # fmt: skip
    launch = dict(cwd=tmp_path, new_session=True, flags=("--config-path", str(conf)))
    first = cli(*args, **launch)
    assert first.returncode != 0 and marker.exists()  # the whole sweep was killed in job 1's 2nd epoch
    done = json.loads((sweep / "0" / "result.json").read_text())
    assert done["status"] == "done" and done["config"]["model"]["dropout"] == 0.2
    interrupted = json.loads((sweep / "1" / "result.json").read_text())
    assert interrupted["status"] == "running"
    assert torch.load(sweep / "1" / "checkpoints" / "last.ckpt", weights_only=False)["epoch"] == 0
    assert not (sweep / "2").exists()
    write_summary(sweep)  # make sweep-report after the crash: the whole grid, job 2 not started
    assert [(r["job"], r["status"]) for r in read_csv(sweep / "summary.csv")] == [
        ("0", "done"), ("1", "interrupted"), ("2", "pending")]  # fmt: skip
    assert "# Sweep summary: 3 jobs (1 done, 1 interrupted, 1 pending)" in (sweep / "summary.md").read_text()
    best_0 = (sweep / "0" / "checkpoints" / "best.ckpt").stat().st_mtime_ns
    configs = {job: (sweep / job / ".hydra" / "config.yaml").read_bytes() for job in ("0", "1")}

    second = cli(*args, **launch)
    assert second.returncode == 0, second.stderr[-3000:]
    assert json.loads((sweep / "0" / "result.json").read_text()) == done  # not rerun
    assert (sweep / "0" / "checkpoints" / "best.ckpt").stat().st_mtime_ns == best_0
    resumed = json.loads((sweep / "1" / "result.json").read_text())
    assert resumed["status"] == "done" and resumed["resumed_from"].endswith("1/checkpoints/last.ckpt")
    assert resumed["epochs"] == 2 and changed_keys(interrupted["config"], resumed["config"]) == []  # its own
    assert resumed["overrides"] == interrupted["overrides"] and resumed["started"] == interrupted["started"]
    assert [r["after_epoch"] for r in resumed["resumes"]] == [1]
    assert torch.load(sweep / "1" / "checkpoints" / "last.ckpt", weights_only=False)["epoch"] == 1
    assert json.loads((sweep / "2" / "result.json").read_text())["epochs"] == 2
    assert {job: (sweep / job / ".hydra" / "config.yaml").read_bytes() for job in configs} == configs
    rows = read_csv(sweep / "summary.csv")
    assert {r["job"]: r["status"] for r in rows} == {"0": "skipped", "1": "done", "2": "done"}
    best = rows[0]["job"]  # the end of the multirun names the summary and the winner
    assert f"sweep summary: {sweep / 'summary.md'} (2 done, 1 skipped)" in second.stdout
    assert f"best: job {best} (optimizer.lr=" in second.stdout
    assert f"submit: make submit CKPT={sweep / best / 'checkpoints' / 'best.ckpt'}" in second.stdout

    before = {p: p.read_bytes() for p in sweep.rglob("*") if p.is_file()}
    train_yaml = conf / "train.yaml"  # model.dropout edited in the config file, the same command again
    train_yaml.write_text(train_yaml.read_text().replace("  dropout: 0.2", "  dropout: 0.5"))
    third = cli(*args, **launch)
    assert third.returncode == 2  # refused before any job started
    output = third.stdout + third.stderr
    assert f"jobs 0, 1, 2 of {sweep} ran with model.dropout=0.2, which the config now sets to " in output
    assert "a job is finished only for the config it ran with" in output and "Traceback" not in output
    assert {p: p.read_bytes() for p in sweep.rglob("*") if p.is_file()} == before  # nothing rewritten


@pytest.mark.slow
def test_a_killed_run_resumed_by_its_folder_alone_ends_as_it_was_made(tiny_root, tmp_path):
    """Made at 40 px for 3 epochs and killed in its 2nd, resumed with ``resume=<run>`` alone (today's
    defaults: the default recipe at 384 px, 15 epochs): it ends at its own 3 epochs and 40 px, in its
    folder; a later resume that raises the epoch cap trains on. The record keeps the first overrides,
    adds each resume, and its wall time counts every segment."""
    run_dir, marker = tmp_path / "run", tmp_path / "killed"
    made = [
        f"data.root={tiny_root}",
        f"hydra.run.dir={run_dir}",
        "data.image_size=40",
        "trainer.max_epochs=3",
    ]
    first = cli(*made, *kill_at(1, marker), cwd=tmp_path, new_session=True)
    assert first.returncode != 0 and marker.exists()
    killed = json.loads((run_dir / "result.json").read_text())
    last = run_dir / "checkpoints" / "last.ckpt"
    first_segment = last.stat().st_mtime - datetime.fromisoformat(killed["started"]).timestamp()
    kept = {name: (run_dir / name).read_bytes() for name in ("split.json", ".hydra/config.yaml")}

    resumed = cli(f"data.root={tiny_root}", f"resume={run_dir}", cwd=tmp_path, small=False)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    result = json.loads((run_dir / "result.json").read_text())
    assert (result["status"], result["epochs"], result["config"]["data"]["image_size"]) == ("done", 3, 40)
    checkpoint = torch.load(last, weights_only=True)
    assert checkpoint["epoch"] == 2 and checkpoint["datamodule_hyper_parameters"]["image_size"] == 40
    assert checkpoint["hyper_parameters"]["backbone"]["name"] == "mobilenet_v3_small"
    assert result["overrides"] == killed["overrides"] and result["started"] == killed["started"]
    (resume,) = result["resumes"]
    assert (
        resume["overrides"] == [f"data.root={tiny_root}", f"resume={run_dir}"] and resume["after_epoch"] == 1
    )
    second_segment = datetime.fromisoformat(result["ended"]) - datetime.fromisoformat(resume["started"])
    assert result["wall_s"] == pytest.approx(first_segment + second_segment.total_seconds(), abs=2.0)
    assert result["wall_s"] > second_segment.total_seconds()

    longer = cli(
        f"data.root={tiny_root}", f"resume={run_dir}", "trainer.max_epochs=4", cwd=tmp_path, small=False
    )
    assert longer.returncode == 0, longer.stderr[-3000:]
    result = json.loads((run_dir / "result.json").read_text())
    assert result["epochs"] == 4 and result["config"]["trainer"]["max_epochs"] == 4
    assert [r["after_epoch"] for r in result["resumes"]] == [1, 3] and result["overrides"] == killed[
        "overrides"
    ]
    assert torch.load(last, weights_only=True)["epoch"] == 3
    assert {name: (run_dir / name).read_bytes() for name in kept} == kept  # its split, its config
    assert not (tmp_path / "outputs" / "train").exists()  # no new run folder


def test_a_multirun_job_refuses_ddp(train_cfg):
    check_one_device(train_cfg())
    with pytest.raises(UserError, match="one device"):
        check_one_device(train_cfg("trainer=ddp"))


SLURM_TASK = {  # what srun sets for task 3 of 4 (2 nodes x 2 GPUs): the second task of the second node
    "SLURM_NTASKS": "4", "SLURM_NTASKS_PER_NODE": "2", "SLURM_NNODES": "2", "SLURM_PROCID": "3",
    "SLURM_LOCALID": "1", "SLURM_NODEID": "1", "SLURM_JOB_NAME": "train", "SLURM_JOB_ID": "4242",
    "SLURM_NODELIST": "gpu[07-08]", "SLURM_STEP_NODELIST": "gpu[07-08]",
}  # fmt: skip


def test_one_run_across_slurm_nodes_gets_its_ranks_from_slurm(tiny_root, tmp_path, monkeypatch):
    """hydra/launcher=slurm_ddp asks SLURM for one task per GPU on each node, and the multirun job
    may use DDP there; Lightning's SLURMEnvironment then resolves world size and ranks."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from lightning.fabric.plugins.environments import SLURMEnvironment
    from lightning.pytorch.utilities import rank_zero_only

    from coco_multilabel.cli import CONFIG_DIR
    from tests.conftest import tiny

    slurm = ["hydra/launcher=slurm_ddp", "trainer=ddp", "trainer.devices=2", "trainer.num_nodes=2"]
    overrides = tiny(f"data.root={tiny_root}", f"run_dir={tmp_path}", *slurm, "trainer.accelerator=cpu")
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert "submitit" in launcher._target_ and (launcher.nodes, launcher.tasks_per_node) == (2, 2)
    assert launcher.gpus_per_node == 2
    check_one_device(cfg, launcher._target_)  # allowed on SLURM
    with pytest.raises(UserError, match="one device"):
        check_one_device(cfg, "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher")
    cfg.trainer.devices = -1
    with pytest.raises(UserError, match="name how many GPUs each node gives it"):
        check_one_device(cfg, launcher._target_)
    cfg.trainer.devices = 2
    for name, value in SLURM_TASK.items():
        monkeypatch.setenv(name, value)
    # the Trainer sets Lightning's process-wide rank (3 here): the tests after this one run as rank 0
    monkeypatch.setattr(rank_zero_only, "rank", rank_zero_only.rank)
    trainer = instantiate(cfg.trainer, logger=False, callbacks=[], max_time=None)
    assert isinstance(trainer.strategy.cluster_environment, SLURMEnvironment)
    assert (trainer.world_size, trainer.global_rank, trainer.local_rank, trainer.node_rank) == (4, 3, 1, 1)
    assert trainer.strategy.cluster_environment.main_address == "gpu07"
    environment = trainer.strategy.cluster_environment
    assert environment.creates_processes_externally  # SLURM started the processes: Lightning starts none
    environment.validate_settings(num_devices=2, num_nodes=2)  # what launch checks: tasks per node = GPUs


@pytest.mark.slow
def test_precision_accumulation_and_channels_last_train(train_cfg, tmp_path):
    """bf16 autocast reaches the convolutions, their inputs are channels_last, and the optimizer
    steps once every 2 batches (and once for a last, odd batch)."""
    record = tmp_path / "fit.json"
    cfg = train_cfg("trainer.precision=bf16-mixed", "trainer.accumulate_grad_batches=2",
                    "model.channels_last=true", "+callbacks.fit._target_=tests.helpers.FitRecorder",
                    f"+callbacks.fit.out={record}")  # fmt: skip
    summary = train(cfg)
    assert summary["epochs"] == 1 and 0 <= summary["best_score"] <= 1
    (fit,) = json.loads(record.read_text())
    assert fit["forward"] == {"channels_last": True, "autocast": True, "autocast_dtype": "torch.bfloat16"}
    assert fit["batches"] >= 2 and fit["global_step"] == -(-fit["batches"] // 2)
    hparams = torch.load(summary["best_checkpoint"], weights_only=False)["hyper_parameters"]
    assert hparams["channels_last"] is True


def test_a_failing_run_is_recorded_as_failed(tmp_path, train_cfg):
    def fail(cfg):
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError):
        run_job(train_cfg(run_dir=tmp_path), fail)
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["status"] == "failed" and result["error"] == "RuntimeError: out of memory"


@pytest.mark.slow
def test_a_sweep_dir_holding_another_sweep_is_refused(tiny_root, tmp_path):
    sweep = tmp_path / "sweep"
    (sweep / "0").mkdir(parents=True)
    (sweep / "0" / "result.json").write_text(
        json.dumps({"status": "done", "overrides": ["model.dropout=0.9"]})
    )
    result = cli(
        f"data.root={tiny_root}", f"hydra.sweep.dir={sweep}", "model.dropout=0.1", "-m", cwd=tmp_path
    )
    assert result.returncode == 2  # refused before any job ran
    assert "holds another sweep; pass a new hydra.sweep.dir" in result.stdout + result.stderr
    assert json.loads((sweep / "0" / "result.json").read_text())["overrides"] == ["model.dropout=0.9"]


@pytest.mark.slow
def test_a_failing_job_frees_its_device_and_the_sweep_goes_on(tiny_root, tmp_path):
    sweep = tmp_path / "sweep"
    pool = ["device_pool.ids=[0]", f"device_pool.lock_dir={tmp_path / 'locks'}"]
    sweep_args = [f"hydra.sweep.dir={sweep}", *pool, "data.val_fraction=2,0.25", "-m"]
    result = cli(f"data.root={tiny_root}", *sweep_args, cwd=tmp_path)
    assert result.returncode == 1  # the sweep says at the end that a job failed
    output = result.stdout + result.stderr
    assert "Traceback" not in output and output.count("val_fraction must be between 0 and 1") == 1
    assert "1 jobs failed (0): their reasons are in" in output
    rows = {r["job"]: r for r in read_csv(sweep / "summary.csv")}
    assert "val_fraction must be between 0 and 1" in rows["0"]["error"]
    assert (rows["0"]["status"], rows["0"]["device"]) == ("failed", "0")
    assert (rows["1"]["status"], rows["1"]["device"]) == ("done", "0")  # the only device, freed
    assert (
        "val_fraction must be between 0 and 1"
        in json.loads((sweep / "0" / "result.json").read_text())["error"]
    )


def test_a_sweep_needing_unreachable_hub_weights_is_refused_before_it_starts(tmp_path, monkeypatch):
    from coco_multilabel.sweeps.preflight import check_hub, hub_download

    resnet = {"_target_": "coco_multilabel.models.backbones.torchvision_backbone", "name": "resnet18",
              "weights": "IMAGENET1K_V1"}  # fmt: skip
    lite = {"_target_": "coco_multilabel.models.backbones.efficientnet_lite", "weights": "embedded"}
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    assert hub_download(resnet) == "torchvision" and hub_download(lite) is None
    assert hub_download({**resnet, "weights": None}) is None
    with pytest.raises(UserError, match=r"job 1 \(resnet18\) needs torchvision weights.*offline=true"):
        check_hub({"0": lite, "1": resnet}, reach=lambda host: False)
    check_hub({"0": lite, "1": resnet}, reach=lambda host: True)
    cached = tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"  # downloaded before
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"")
    assert hub_download(resnet) is None
    check_hub({"1": resnet}, reach=lambda host: False)
