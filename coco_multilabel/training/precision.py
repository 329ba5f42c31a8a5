"""Numeric precision on each device: what mixed precision a GPU runs fast (the default, by device),
float32 matmuls on tensor cores, and the one precision that the cache build, validation and submit
all evaluate at."""

from __future__ import annotations

import contextlib

import lightning as L
import torch

from coco_multilabel.errors import UserError

EVAL_PRECISIONS = {"32": None, "bf16": torch.bfloat16, "16": torch.float16}


GPU_ACCELERATORS = ("auto", "gpu", "cuda")


def device_precision(accelerator: str = "auto") -> str:
    """``trainer.precision`` by default: ``bf16-mixed`` where every visible GPU has bfloat16 tensor
    cores (Ampere, compute capability 8, or newer), ``16-mixed`` on older GPUs, ``32-true`` on CPU,
    also on a GPU machine told ``trainer.accelerator=cpu``. Every DDP rank resolves this on its own,
    before it knows its device: the capability is read for all visible GPUs and the lowest counts,
    so ranks that see the same GPUs agree (``check_ranks_agree`` refuses a run whose ranks do not)."""
    if str(accelerator) not in GPU_ACCELERATORS or not torch.cuda.is_available():
        return "32-true"
    gpus = range(max(1, torch.cuda.device_count()))
    major = min(torch.cuda.get_device_capability(i)[0] for i in gpus)
    return "bf16-mixed" if major >= 8 else "16-mixed"


def eval_precision_of(trainer_precision) -> str:
    """``model.eval_precision`` by default: the trainer's compute type (``bf16-mixed`` -> ``bf16``,
    ``16-mixed`` -> ``16``, else ``32``). The cache build, validation, threshold tuning and submit
    then compute at the precision training ran at."""
    name = str(trainer_precision)
    if name.startswith("bf16"):
        return "bf16"
    if name.startswith("16"):
        return "16"
    return "32"


def check_ranks_agree(trainer: L.Trainer) -> None:
    """Under DDP each rank composed its own config: refuse a run whose ranks chose different
    precisions (GPUs of different kinds) before any of them computes at its own."""
    if trainer.world_size < 2:
        return
    ours = str(trainer.precision)
    rank0 = trainer.strategy.broadcast(ours, src=0)
    if not trainer.strategy.reduce_boolean_decision(ours == rank0, all=True):
        raise UserError(
            f"the processes of this DDP run chose different precisions (rank 0 {rank0}, rank "
            f"{trainer.global_rank} {ours}): its GPUs are of different kinds; set trainer.precision="
            "16-mixed (every GPU runs it) or 32-true for all of them"
        )


def use_tensor_cores(trainer: L.Trainer) -> None:
    """float32 matmuls in TF32 on CUDA (``torch.set_float32_matmul_precision("high")``): what
    Lightning recommends on every GPU with tensor cores; nothing changes on CPU. Training and
    submit both set it, so validation and submit multiply at the same precision."""
    if trainer.strategy.root_device.type == "cuda":
        torch.set_float32_matmul_precision("high")


def check_eval_precision(value) -> str:
    name = str(value)
    if name not in EVAL_PRECISIONS:
        raise UserError(f"model.eval_precision must be one of {', '.join(EVAL_PRECISIONS)}, got {value!r}")
    return name


def eval_autocast(precision: str, device: torch.device):
    """The autocast of evaluation (validation, predict, submit), whatever the trainer's precision:
    ``32`` switches a mixed-precision trainer's autocast off, ``bf16``/``16`` switch it on. The
    thresholds are tuned on what validation computes, so submit must compute the same."""
    dtype = EVAL_PRECISIONS[precision]
    if device.type not in ("cpu", "cuda", "mps", "xpu"):
        return contextlib.nullcontext()
    if dtype is None:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=dtype)


def float32_head(device: torch.device):
    """No autocast around the head: float32 logits, so probabilities are not rounded to fp16's 11
    bits (ties in AP and in threshold tuning). The head is one matmul: its cost does not show."""
    if device.type not in ("cpu", "cuda", "mps", "xpu"):
        return contextlib.nullcontext()
    return torch.autocast(device.type, enabled=False)
