"""The device pool, driven by fake device ids from several processes at once."""

import json
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor, wait
from pathlib import Path

import pytest
from filelock import FileLock

from coco_multilabel.sweeps.devices import acquire_device, visible_devices
from coco_multilabel.sweeps.job import job_device, pool_devices


def _job(number: int, ids: list[str], lock_dir: str, log_dir: str) -> None:
    """Hold a device for a moment and log when; job 2 fails while holding its device."""
    with acquire_device(ids, lock_dir, poll_s=0.02) as index:
        start = time.time()
        time.sleep(0.3)
        record = {"job": number, "device": ids[index], "start": start, "end": time.time()}
        (Path(log_dir) / f"{number}.json").write_text(json.dumps(record))
        if number == 2:
            raise RuntimeError("this job fails")


def test_pool_never_gives_one_device_to_two_jobs_and_survives_a_failure(tmp_path):
    ids, jobs = ["gpu-a", "gpu-b"], 7
    ctx = multiprocessing.get_context("fork")  # the jobs touch no torch: forking is safe and quick
    with ProcessPoolExecutor(max_workers=4, mp_context=ctx) as pool:  # more workers than devices
        futures = [pool.submit(_job, n, ids, str(tmp_path / "locks"), str(tmp_path)) for n in range(jobs)]
        wait(futures, timeout=120)
        for device in ids:  # the workers are still alive: a device kept by the failed job would show here
            FileLock(tmp_path / "locks" / f"device-{device}.lock").acquire(timeout=0).lock.release()
    errors = [f.exception() for f in futures]
    assert [type(e).__name__ if e else None for e in errors].count("RuntimeError") == 1
    assert isinstance(errors[2], RuntimeError)
    records = [json.loads((tmp_path / f"{n}.json").read_text()) for n in range(jobs)]  # every job ran
    for device in ids:
        spans = sorted((r["start"], r["end"]) for r in records if r["device"] == device)
        assert all(end <= next_start for (_, end), (next_start, _) in zip(spans, spans[1:], strict=False))
    assert {r["device"] for r in records} == set(ids)


def test_pool_keys_are_physical_ids_and_indices_what_cuda_sees(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7")
    assert visible_devices() == ["5", "7"]
    assert pool_devices(None) == (["5", "7"], [0, 1])
    assert pool_devices([1]) == (["7"], [1])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert pool_devices(None) == ([], [])


def test_acquire_needs_a_device(tmp_path):
    with pytest.raises(ValueError), acquire_device([], tmp_path):
        pass


@pytest.fixture
def multirun_cfg(tmp_path):
    """A composed train config, registered as the config of a running multirun job."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    from coco_multilabel.cli import CONFIG_DIR

    def make(*overrides):
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose("train", overrides=["hydra.mode=MULTIRUN", f"device_pool.lock_dir={tmp_path}",
                                              *overrides], return_hydra_config=True)  # fmt: skip
        HydraConfig.instance().set_config(cfg)
        return cfg

    saved = HydraConfig.instance().cfg
    yield make
    HydraConfig.instance().cfg = saved


def test_gpu_jobs_train_on_the_device_they_hold(multirun_cfg, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    first, second = (multirun_cfg("trainer=gpu") for _ in range(2))
    with job_device(first) as held_first, job_device(second) as held_second:
        assert (held_first, list(first.trainer.devices)) == ("3", [0])
        assert (held_second, list(second.trainer.devices)) == ("5", [1])
    with job_device(second) as held:  # both freed
        assert held == "3"


def test_cpu_and_slurm_jobs_bypass_the_pool(multirun_cfg, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with job_device(multirun_cfg("trainer=cpu")) as held:
        assert held is None
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    cfg = multirun_cfg("trainer=gpu", "hydra/launcher=slurm")
    assert cfg.hydra.launcher.gpus_per_node == 1
    with job_device(cfg) as held:  # SLURM placed the job on its GPU
        assert held is None and cfg.trainer.devices == 1


def test_the_parallel_launcher_runs_one_job_per_device(multirun_cfg):
    assert multirun_cfg("device_pool.ids=[0,1,2]").hydra.launcher.n_jobs == 3


def test_the_lock_folder_is_private_and_planted_links_are_not_followed(tmp_path, monkeypatch):
    import os
    import stat

    from coco_multilabel.errors import UserError
    from coco_multilabel.sweeps.devices import default_lock_dir

    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert default_lock_dir() == str(tmp_path / "coco-multilabel-devices")
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert default_lock_dir().startswith(str(Path.home() / ".cache" / "coco-multilabel"))
    locks = tmp_path / "locks"
    with acquire_device(["0"], locks):
        pass
    assert stat.S_IMODE(os.stat(locks).st_mode) == 0o700
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (locks / "device-1.lock").symlink_to(victim)  # O_TRUNC through it would empty the victim
    with pytest.raises(UserError, match="device-1.lock is a symlink; not followed"):
        with acquire_device(["1"], locks):
            pass
    assert victim.read_text() == "keep me"
    elsewhere = tmp_path / "someone-elses"
    elsewhere.mkdir()
    (tmp_path / "link").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(UserError, match="is a symlink or not a folder"):
        with acquire_device(["0"], tmp_path / "link"):
            pass
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(UserError, match="writable by others .mode 777.: chmod 700"):
        with acquire_device(["0"], shared):
            pass
    assert not list(shared.iterdir()) and not list(elsewhere.iterdir())
