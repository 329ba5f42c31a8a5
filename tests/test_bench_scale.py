"""make bench-scale, smoke-run at a tiny size: it makes its data once and writes its table."""

import json

import pytest

from coco_multilabel.bench.scale import generate, main

TINY = ["backbone=mobilenet_v3_small", "backbone.weights=null", "data.image_size=32", "data.batch_size=8",
        "data.num_workers=0", "data.val_fraction=0.25", "trainer.accelerator=cpu", "logger=csv"]  # fmt: skip


@pytest.mark.slow
def test_bench_scale_smoke_run_makes_its_data_once_and_writes_the_table(tmp_path):
    data, out = tmp_path / "scale-data", tmp_path / "bench" / "scale.md"
    args = ["--images", "40", "--test-images", "6", "--size", "64x48", "--workers", "2", "--data", str(data),
            "--out", str(out), *TINY]  # fmt: skip
    main(args)
    assert len(list((data / "images" / "train").iterdir())) == 40
    assert len(list((data / "labels" / "train").iterdir())) == 40
    assert len(list((data / "images" / "test").iterdir())) == 6
    assert json.loads((data / "scale.json").read_text())["width"] == 64
    table = out.read_text()
    rows = ("check-data", "datamodule setup, first", "datamodule setup, again", "peak memory",
            "cache build / model only", "cached epoch / model only", "submit of 6 test images")  # fmt: skip
    for row in rows:
        assert row in table, row
    stamp = (data / "scale.json").stat().st_mtime_ns
    assert generate(data, 40, 6, 64, 48, workers=1) == 0.0  # made once: found the next time
    assert (data / "scale.json").stat().st_mtime_ns == stamp
    with pytest.raises(SystemExit, match="holds another data set"):
        generate(data, 41, 6, 64, 48, workers=1)
