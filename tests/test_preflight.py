"""The sweep preflight sees the jobs Hydra will run, in Hydra's order."""

from omegaconf import OmegaConf

from coco_multilabel.sweeps.preflight import expand_jobs


def test_jobs_are_the_grid_of_sweeper_params_then_command_line_lists_in_hydras_order():
    config = OmegaConf.create(
        {
            "hydra": {
                "sweeper": {"params": {"model.dropout": "0.1,0.3"}},
                "overrides": {"task": ["optimizer.lr=1e-3,1e-2", "seed=1", "model.dropout=0.5,0.6"]},
            }
        }
    )
    assert expand_jobs(config) == [
        ["model.dropout=0.5", "optimizer.lr=0.001", "seed=1"],
        ["model.dropout=0.5", "optimizer.lr=0.01", "seed=1"],
        ["model.dropout=0.6", "optimizer.lr=0.001", "seed=1"],
        ["model.dropout=0.6", "optimizer.lr=0.01", "seed=1"],
    ]  # as the jobs see them (floats as Hydra writes them); the command line wins over the config
