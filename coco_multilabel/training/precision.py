"""Numeric precision on each device: what mixed precision a GPU runs fast, float32 matmuls on tensor
cores, and the one precision that validation and submit both evaluate at."""

from __future__ import annotations

import contextlib

import lightning as L
import torch

from coco_multilabel.errors import UserError

EVAL_PRECISIONS = {"32": None, "bf16": torch.bfloat16, "16": torch.float16}


def gpu_precision() -> str:
    """``trainer=gpu``/``ddp``'s mixed precision: ``bf16-mixed`` where the GPU has bfloat16 tensor
    cores (Ampere, compute capability 8, or newer), else ``16-mixed``; ``32-true`` without a GPU
    (``trainer=ddp trainer.accelerator=cpu``). Reads the capability without allocating on the GPU:
    every DDP rank resolves this before it knows its own device."""
    if not torch.cuda.is_available():
        return "32-true"
    major, _ = torch.cuda.get_device_capability(0)
    return "bf16-mixed" if major >= 8 else "16-mixed"


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
