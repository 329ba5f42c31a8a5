"""Messages of the libraries we use that say nothing to a user of this project, each silenced with
the reason it does not apply. Everything else they print stays: a warning a user can act on must be
seen. (Lightning's "module(s) in eval mode" is silenced only in the phases that freeze part of the
backbone on purpose: ``training/phases.py``.)
"""

from __future__ import annotations

import logging
import warnings

LIGHTNING_INFO = (
    # advertising for Lightning's cloud services, printed by every Trainer
    "💡 Tip: For seamless cloud",
    # the model asks for its step count to size its learning-rate schedule: that is all this says
    "Loading `train_dataloader` to estimate number of stepping batches",
    # each phase of a schedule is its own fit ending at its share of the epochs (training/phases.py):
    # "max_epochs=15 reached" after the first phase of two reads as the end of the run; our own
    # progress lines say where the run is
    "`Trainer.fit` stopped: `max_epochs=",
)
WARNINGS = (  # (message regex, category, module regex)
    # Lightning 2.6's own code calls torch's deprecated LeafSpec(); nothing a user can change
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning, r"lightning\.pytorch\.utilities"),
    # a machine with Slurm's srun, outside a Slurm job: this run trains here, as asked. Runs on the
    # cluster go through hydra/launcher=slurm, whose jobs submitit starts under srun (where Lightning
    # does not print this); the hint to prepend srun is not how this project uses Slurm
    (r"The `srun` command is available on your system but is not used", Warning, ""),
    # a training set of fewer batches than log_every_n_steps (tiny data) gets no per-step points;
    # the per-epoch values, which the progress lines and the report show, are all logged
    (r"The number of training batches \(\d+\) is smaller than the logging interval", Warning, ""),
)


class _DropLightningInfo(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(message.startswith(text) for text in LIGHTNING_INFO)


def quiet_library_messages() -> None:
    """Install the filters (idempotent: filters are compared, not stacked)."""
    for message, category, module in WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    # TensorBoard's event reader narrates the files it reads ("No path found after ..."): make report
    # reads a run's events, and these lines say nothing about the run
    logging.getLogger("tensorboard").setLevel(logging.WARNING)
    drop = _DropLightningInfo()
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)  # where rank_zero_info writes, whichever import set it last
        if not any(isinstance(f, _DropLightningInfo) for f in logger.filters):
            logger.addFilter(drop)
