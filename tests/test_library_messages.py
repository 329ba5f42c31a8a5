"""What the libraries print that says nothing to a user is silenced, each for its reason; the rest,
and Lightning's eval-mode warning outside a phase that freezes on purpose, still comes through."""

import logging
import warnings

from coco_multilabel.library_messages import quiet_library_messages
from coco_multilabel.training.phases import expected_warnings
from coco_multilabel.training.schedule import Phase


class Kept(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_lightnings_tips_and_internal_notices_are_dropped_and_its_other_messages_kept():
    quiet_library_messages()
    quiet_library_messages()  # idempotent
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")  # where rank_zero_info writes
    assert len(rank_zero.filters) == 1
    kept = Kept()
    rank_zero.addHandler(kept)
    try:
        for message in (
            "💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger] ...",
            "💡 Tip: For seamless cloud uploads and versioning, try installing [litmodels] ...",
            "Loading `train_dataloader` to estimate number of stepping batches.",
            "`Trainer.fit` stopped: `max_epochs=15` reached.",
            "GPU available: True (cuda), used: True",
            "`Trainer.fit` stopped: `max_time` reached.",
        ):
            rank_zero.log(logging.WARNING, message)
    finally:
        rank_zero.removeHandler(kept)
    assert kept.messages == [
        "GPU available: True (cuda), used: True",
        "`Trainer.fit` stopped: `max_time` reached.",
    ]


def warned(message, category=UserWarning, module="lightning.pytorch.loops.fit_loop") -> bool:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_library_messages()
        warnings.warn_explicit(message, category, "x.py", 1, module=module)
    return bool(caught)


def test_only_the_warnings_that_do_not_apply_are_filtered():
    assert not warned(
        "`isinstance(treespec, LeafSpec)` is deprecated, use ...",
        FutureWarning,
        "lightning.pytorch.utilities._pytree",
    )
    assert not warned("The `srun` command is available on your system but is not used. HINT: ...")
    assert not warned("The number of training batches (5) is smaller than the logging interval Trainer(...)")
    assert warned("The dataloader does not have many workers which may be a bottleneck.")
    assert warned(
        "`isinstance(treespec, LeafSpec)` is deprecated", FutureWarning, "my_code"
    )  # not Lightning's


def test_eval_mode_modules_are_expected_only_in_a_phase_that_freezes_them():
    message = "Found 253 module(s) in eval mode at the start of training. This may lead to ..."
    checkpoints = "Checkpoint directory /run/checkpoints exists and is not empty."
    for phase, continuing, expected in (
        (Phase("probe", 1, train="head", inputs="cache"), False, [checkpoints]),
        (Phase("top", 1, train="top", inputs="cache"), True, []),
        (Phase("finetune", 1, train="all"), False, [message, checkpoints]),  # nothing frozen: a real problem
        (Phase("finetune", 1, train="all"), True, [message]),  # a later phase or a resume: its own folder
    ):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with expected_warnings(phase, continuing):
                warnings.warn(message, UserWarning, stacklevel=1)
                warnings.warn(checkpoints, UserWarning, stacklevel=1)
        assert [str(w.message) for w in caught] == expected
