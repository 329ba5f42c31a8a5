"""Crash-safe resume: a run resumed from ``last.ckpt`` should be the run that was never stopped."""

from __future__ import annotations

import random

import lightning as L
import numpy as np
import torch


def random_states(device: torch.device | None = None) -> dict:
    """The global generators' states as tensors, lists and numbers: Lightning loads checkpoints with
    ``weights_only=True``, which refuses numpy arrays. CUDA's only for ``device`` (this process's
    GPU): ``get_rng_state_all`` would open a CUDA context on every GPU from every DDP rank, and a
    CPU run touches no GPU at all."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    states = {
        "python": random.getstate(),
        "numpy": [name, keys.tolist(), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
    }
    if device is not None and device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def set_random_states(states: dict, device: torch.device | None = None) -> None:
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(states["torch"])
    cuda = states.get("cuda")
    if cuda is None or device is None or device.type != "cuda":
        return
    if isinstance(cuda, list | tuple):  # older checkpoints kept every GPU's state
        index = device.index or 0
        if index >= len(cuda):
            return
        cuda = cuda[index]
    torch.cuda.set_rng_state(cuda, device)


class RandomStateCheckpoint(L.Callback):
    """Store the global random states in every checkpoint and restore them on resume.

    Lightning restores weights, optimizer, scheduler and epoch but not the random generators, so a
    resumed run would shuffle, crop and drop out differently from an uninterrupted one. Restored
    after the sanity check, which draws from them too. Worker processes (``data.num_workers > 0``)
    are seeded from these states, so they agree in distribution but not sample by sample.
    """

    def __init__(self):
        self._restored: dict | None = None

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        checkpoint["random_states"] = random_states(trainer.strategy.root_device)

    def on_load_checkpoint(self, trainer, pl_module, checkpoint):
        # called before the model moves to its device: the strategy already knows which it is
        self._restored = checkpoint.get("random_states")
        if self._restored is not None:
            set_random_states(self._restored, trainer.strategy.root_device)

    def on_sanity_check_end(self, trainer, pl_module):
        if self._restored is not None:
            set_random_states(self._restored, trainer.strategy.root_device)

    def on_train_start(self, trainer, pl_module):
        self._restored = None
