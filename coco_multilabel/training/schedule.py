"""Training as phases: an ordered list of what trains, on which inputs, for how many epochs.

Each phase is its own ``trainer.fit`` with its own optimizer and warm-up + cosine schedule, so the
parameters a phase trains are exactly those its optimizer (and, under DDP, the DDP wrapper) holds.
``conf/schedule/`` names the schedules; a phase's length is ``schedule.<phase>.epochs=N``, and
``trainer.max_epochs`` caps the whole run, earlier phases first.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from coco_multilabel.errors import UserError

TRAINS = {  # what a phase trains
    "head": "the head only; the backbone stays frozen, in eval mode on purpose (its batch-norm "
    "statistics stay as they are)",
    "top": "the backbone's top stages (model.top_stages) and the head; the trunk below stays frozen, "
    "in eval mode on purpose (its batch-norm statistics stay as they are)",
    "all": "everything",
}
INPUTS = {  # what a phase reads
    "cache": "what the frozen part makes of each image, computed once (the feature cache)",
    "images": "the images, decoded and augmented every epoch",
}
KEYS = ("epochs", "train", "inputs", "lr_scale")


@dataclass(frozen=True)
class Phase:
    name: str
    epochs: int
    train: str = "all"
    inputs: str = "images"
    lr_scale: float = 1.0  # the backbone's trained parts' lr as a fraction of optimizer.lr (the head's)

    def record(self) -> dict:
        return asdict(self)


def phases_from_config(schedule, max_epochs: int | None = None) -> list[Phase]:
    """The phases of ``schedule`` (``{name: {epochs, train, inputs, lr_scale}}``), checked, with
    ``max_epochs`` spread over them in order; a UserError naming the key for anything malformed."""
    if not schedule:
        raise UserError("schedule is empty: pick one with schedule=<name> (conf/schedule/)")
    phases = []
    for name, spec in dict(schedule).items():
        spec = dict(spec or {})
        unknown = sorted(set(spec) - set(KEYS))
        if unknown:
            raise UserError(f"schedule.{name}: unknown key {unknown[0]!r}; a phase has {', '.join(KEYS)}")
        phase = Phase(name, **spec)
        if not isinstance(phase.epochs, int) or phase.epochs < 0:
            raise UserError(f"schedule.{name}.epochs must be a whole number >= 0, got {phase.epochs!r}")
        for key, allowed in (("train", TRAINS), ("inputs", INPUTS)):
            if getattr(phase, key) not in allowed:
                raise UserError(
                    f"schedule.{name}.{key} must be one of {', '.join(allowed)}, got {getattr(phase, key)!r}"
                )
        if not phase.lr_scale > 0:
            raise UserError(f"schedule.{name}.lr_scale must be above 0, got {phase.lr_scale}")
        if phase.inputs == "cache" and phase.train == "all":
            raise UserError(
                f"schedule.{name} trains everything on cached features, but the features of a backbone "
                "that trains change every step: use inputs: images, or train: head / top"
            )
        phases.append(phase)
    return cap_epochs(phases, max_epochs)


def top_stages_of(asked: int | None, phases: list[Phase]) -> int:
    """``model.top_stages`` for a run of ``phases``: unset (null), from the schedule: the last stage
    where a phase trains the top, else none; a number the schedule contradicts is refused."""
    running = [p for p in phases if p.epochs]
    top = [p for p in running if p.train == "top"]
    if asked is None:
        return 1 if top else 0
    if top and not asked:
        raise UserError(
            f"schedule.{top[0].name} trains the top, but model.top_stages=0: set model.top_stages=1 "
            "(the last stage) or leave it unset, or train: head"
        )
    if asked and not top:
        raise UserError(
            f"model.top_stages={asked} only matters to a phase with train: top, and this schedule "
            f"({', '.join(p.name for p in running)}) has none: leave it unset, or pick schedule=top"
        )
    return asked


def cap_epochs(phases: list[Phase], max_epochs: int | None) -> list[Phase]:
    """``max_epochs`` for the whole run: earlier phases keep theirs first."""
    if max_epochs is None or max_epochs < 0:
        return phases
    left, capped = max_epochs, []
    for phase in phases:
        epochs = min(phase.epochs, left)
        capped.append(Phase(**{**phase.record(), "epochs": epochs}))
        left -= epochs
    return capped


def phase_ends(phases: list[Phase]) -> list[int]:
    """The epoch count at which each phase ends, counted over the whole run."""
    ends, total = [], 0
    for phase in phases:
        total += phase.epochs
        ends.append(total)
    return ends


def resume_phase(saved: dict | None, phases: list[Phase], ckpt_path) -> int:
    """The phase a checkpoint was saved in (its ``phase`` record), if this schedule has it."""
    if not saved:
        return 0
    index = saved["index"]
    if index >= len(phases) or (phases[index].name, phases[index].train, phases[index].inputs) != (
        saved["name"], saved["train"], saved["inputs"]
    ):  # fmt: skip
        raise UserError(
            f"{ckpt_path} was saved in phase {saved['name']!r} ({saved['train']} on {saved['inputs']}) "
            f"of its schedule, which this run's schedule ({', '.join(p.name for p in phases)}) does not "
            "have at that place: resume with the schedule the run started with"
        )
    return index
