from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from coco_multilabel.config import CONFIG_DIR, run_dir_for


def test_a_resumed_run_continues_in_its_own_folder():
    assert run_dir_for(None, "outputs/train/new") == "outputs/train/new"
    assert run_dir_for("outputs/train/a/checkpoints/last.ckpt", "outputs/train/new") == "outputs/train/a"
    assert run_dir_for("elsewhere/model.ckpt", "outputs/train/new") == "elsewhere"


def test_resume_points_at_the_runs_last_checkpoint(train_cfg):
    cfg = train_cfg("resume=outputs/train/a")
    assert cfg.ckpt_path == "outputs/train/a/checkpoints/last.ckpt"
    assert train_cfg().ckpt_path is None


@pytest.mark.parametrize("name", sorted(p.stem for p in (Path(CONFIG_DIR) / "sweep").glob("*.yaml")))
def test_every_sweep_grid_names_real_options_and_a_stable_dir(name):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[f"sweep={name}"], return_hydra_config=True)
        assert cfg.hydra.sweep.dir == f"outputs/sweeps/{name}"
        for key, values in cfg.hydra.sweeper.params.items():
            for value in str(values).split(","):  # each job's config composes
                compose("train", overrides=[f"{key}={value}"])


@pytest.mark.parametrize("name", ["linear_probe", "finetune", "plain", "lp_ft", "top_csra"])
def test_experiments_compose(name):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={name}"])
    assert cfg.model.freeze_backbone is (name in ("linear_probe", "top_csra"))  # top_csra: the trunk
