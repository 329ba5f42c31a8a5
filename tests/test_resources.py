"""What the job may use: cores and memory as Slurm, cpusets and cgroups (v1 and v2) limit them, and
the loader workers that follow from them."""

from types import SimpleNamespace

import pytest
from torch.utils.data import DataLoader

from coco_multilabel import resources
from coco_multilabel.data.datamodule import CocoDataModule, default_num_workers, processes_sharing_cores

GB = 2**30


def cgroup_v2(tmp_path, limit="max", current=0, inactive=0, cpu="max 100000", parent_limit="max"):
    """A cgroup v2 mount with the job's cgroup /slurm/job_1/step_0 under a limited job_1."""
    root = tmp_path / "cgroup"
    (root / "slurm" / "job_1" / "step_0").mkdir(parents=True)
    (root / "cgroup.controllers").write_text("cpu memory\n")
    job, step = root / "slurm" / "job_1", root / "slurm" / "job_1" / "step_0"
    (job / "memory.max").write_text(f"{parent_limit}\n")
    (job / "memory.current").write_text(f"{current}\n")
    (job / "memory.stat").write_text(f"anon 1\ninactive_file {inactive}\n")
    (step / "memory.max").write_text(f"{limit}\n")
    (step / "memory.current").write_text(f"{current}\n")
    (step / "memory.stat").write_text(f"inactive_file {inactive}\n")
    (step / "cpu.max").write_text(f"{cpu}\n")
    proc = tmp_path / "proc_cgroup"
    proc.write_text("0::/slurm/job_1/step_0\n")
    return root, proc


def cgroup_v1(tmp_path, limit=resources.UNLIMITED + 4096, usage=0, inactive=0, quota=-1, period=100000):
    root = tmp_path / "cgroup"
    memory = root / "memory" / "docker" / "abc"
    cpu = root / "cpu,cpuacct" / "docker" / "abc"
    memory.mkdir(parents=True)
    cpu.mkdir(parents=True)
    (memory / "memory.limit_in_bytes").write_text(f"{limit}\n")
    (memory / "memory.usage_in_bytes").write_text(f"{usage}\n")
    (memory / "memory.stat").write_text(f"cache 5\ntotal_inactive_file {inactive}\n")
    (cpu / "cpu.cfs_quota_us").write_text(f"{quota}\n")
    (cpu / "cpu.cfs_period_us").write_text(f"{period}\n")
    proc = tmp_path / "proc_cgroup"
    proc.write_text("5:cpu,cpuacct:/docker/abc\n4:memory:/docker/abc\n0::/\n")
    return root, proc


def meminfo(tmp_path, available_gb: float):
    path = tmp_path / "meminfo"
    path.write_text(f"MemTotal: 999999999 kB\nMemAvailable: {int(available_gb * 2**20)} kB\n")
    return path


def test_a_cgroup_v2_limit_above_the_job_counts_less_its_usage_without_reclaimable_pages(tmp_path):
    root, proc = cgroup_v2(tmp_path, parent_limit=32 * GB, current=10 * GB, inactive=4 * GB)
    node = meminfo(tmp_path, 500)  # a big node: the job's 32 GB is what decides
    assert resources.job_memory_available(root, proc, node) == 32 * GB - 6 * GB


def test_a_cgroup_v1_memory_limit_counts(tmp_path):
    root, proc = cgroup_v1(tmp_path, limit=16 * GB, usage=3 * GB, inactive=1 * GB)
    assert resources.cgroup_memory_headroom(root, proc) == 14 * GB
    assert resources.job_memory_available(root, proc, meminfo(tmp_path, 100)) == 14 * GB


def test_without_a_limit_the_nodes_available_memory_counts(tmp_path):
    for root, proc in (cgroup_v2(tmp_path / "v2"), cgroup_v1(tmp_path / "v1")):
        assert resources.cgroup_memory_headroom(root, proc) is None
        assert resources.job_memory_available(root, proc, meminfo(tmp_path, 20)) == 20 * GB
    assert resources.job_memory_available(tmp_path / "none", tmp_path / "none", tmp_path / "none") is None


def test_a_container_whose_cgroup_path_is_not_under_its_mount_reads_the_mount_root(tmp_path):
    root = tmp_path / "cgroup"
    root.mkdir()
    (root / "cgroup.controllers").write_text("memory\n")
    (root / "memory.max").write_text(f"{8 * GB}\n")
    (root / "memory.current").write_text(f"{GB}\n")
    proc = tmp_path / "proc"
    proc.write_text("0::/kubepods/burstable/pod1/abc\n")
    assert resources.cgroup_memory_headroom(root, proc) == 7 * GB


@pytest.mark.parametrize(
    ("affinity", "slurm", "cpu", "expected"),
    [
        (16, None, "max 100000", 16),
        (16, "6", "max 100000", 6),  # Slurm's --cpus-per-task, where the affinity is the whole node
        (64, None, "800000 100000", 8),  # a container given 8 CPUs of a 64-core host
        (64, None, "250000 100000", 3),  # 2.5 CPUs: rounded up
        (4, "8", "max 100000", 4),
    ],
)
def test_the_job_has_the_cores_of_its_affinity_slurm_and_cgroup_quota(
    monkeypatch, tmp_path, affinity, slurm, cpu, expected
):
    monkeypatch.setattr(resources.os, "sched_getaffinity", lambda pid: set(range(affinity)))
    if slurm:
        monkeypatch.setenv("SLURM_CPUS_PER_TASK", slurm)
    else:
        monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    root, proc = cgroup_v2(tmp_path, cpu=cpu)
    assert resources.job_cores(root, proc) == expected


def test_a_cgroup_v1_cpu_quota_counts(tmp_path, monkeypatch):
    monkeypatch.setattr(resources.os, "sched_getaffinity", lambda pid: set(range(32)))
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    root, proc = cgroup_v1(tmp_path, quota=400000)
    assert resources.job_cores(root, proc) == 4
    root, proc = cgroup_v1(tmp_path / "free", quota=-1)
    assert resources.job_cores(root, proc) == 32


def trainer(devices: int, external: bool):
    environment = SimpleNamespace(creates_processes_externally=external)
    return SimpleNamespace(num_devices=devices, strategy=SimpleNamespace(cluster_environment=environment))


def test_workers_follow_the_cores_with_no_cap_of_8_and_split_among_local_ranks(monkeypatch):
    monkeypatch.setattr("coco_multilabel.data.datamodule.job_cores", lambda: 16)
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    assert default_num_workers() == 16  # a 16-core GPU box feeds its GPU with 16, not 8
    assert default_num_workers(processes_sharing_cores(trainer(4, external=False))) == 4
    assert default_num_workers(processes_sharing_cores(None)) == 16
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "16")  # srun started each rank with 16 cores of its own
    assert processes_sharing_cores(trainer(4, external=True)) == 1
    monkeypatch.setattr("coco_multilabel.data.datamodule.job_cores", lambda: 1)
    assert default_num_workers(8) == 1


def test_only_the_train_loader_keeps_its_workers_between_epochs(tiny_root, monkeypatch):
    """Persistent val workers would sit idle, a second set, through every training epoch."""
    monkeypatch.setattr("coco_multilabel.data.datamodule.job_cores", lambda: 2)
    data = CocoDataModule(root=str(tiny_root), image_size=32, batch_size=4)
    data.setup("fit")
    train, val = data.train_dataloader(), data.val_dataloader()
    assert isinstance(train, DataLoader) and (train.num_workers, train.persistent_workers) == (2, True)
    assert (val.num_workers, val.persistent_workers) == (2, False)
