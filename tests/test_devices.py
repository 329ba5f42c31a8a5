"""The device pool, driven by fake device ids from several processes at once."""

import json
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor, wait
from pathlib import Path

import pytest

from coco_multilabel.devices import acquire_device, visible_devices
from coco_multilabel.sweep import pool_devices


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
    errors = [f.exception() for f in futures]
    assert [type(e).__name__ if e else None for e in errors].count("RuntimeError") == 1
    assert isinstance(errors[2], RuntimeError)
    records = [json.loads((tmp_path / f"{n}.json").read_text()) for n in range(jobs)]  # every job ran
    for device in ids:
        spans = sorted((r["start"], r["end"]) for r in records if r["device"] == device)
        assert all(end <= next_start for (_, end), (next_start, _) in zip(spans, spans[1:], strict=False))
    failed = records[2]
    # the failing job's device went to a later job
    assert any(r["device"] == failed["device"] and r["start"] >= failed["end"] for r in records)
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
