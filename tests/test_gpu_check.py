"""make gpu-check --smoke: the GPU machine's script, on CPU at tiny sizes, writes its table."""

import pytest

from coco_multilabel.bench.gpu_check import main


@pytest.mark.slow
def test_gpu_check_smoke_runs_every_check_and_writes_the_table(tmp_path, capsys):
    with pytest.raises(SystemExit) as done:
        main(["--smoke", "--out", str(tmp_path / "bench"), "--work", str(tmp_path / "work")])
    table = (tmp_path / "bench" / "gpu.md").read_text()
    assert done.value.code == 0, table
    for check in (
        "default recipe, train on one device", "default recipe, submit",
        "eval fp32: submit vs model alone", "eval bf16: submit vs model alone",
        "train throughput, MobileNetV3-S @ 32 (smoke)", "train throughput, GPU recipe @ 32, eager (smoke)",
        "2-job multirun on the device pool",
        "2-GPU DDP run | skipped", "total | 0 failed",
    ):  # fmt: skip
        assert f"| {check}" in table
    assert "| 2-job multirun on the device pool | 2 done |" in table
    assert (tmp_path / "work" / "submit" / "submission_bf16.json").is_file()  # submit ran at bf16 too
