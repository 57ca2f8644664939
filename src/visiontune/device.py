"""Device and precision choices shared by training, evaluation and serving."""

from __future__ import annotations

import contextlib
import functools
import math
import os
from pathlib import Path

import torch

from visiontune.errors import UserError


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else CPU; ``cpu``, ``cuda`` or ``cuda:N`` as asked.

    Raises:
        UserError: an unknown device name, or a GPU asked for that this machine does not have
            (torch would fail later, with a traceback, on the first tensor moved there).
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kind, colon, index = name.partition(":")
    if kind not in ("cpu", "cuda") or (colon and not index.isdigit()):
        raise UserError(f"unknown device {name!r}; use auto, cpu or cuda (cuda:N for GPU N)")
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserError(
            f"--device {name} was asked for but no CUDA GPU is visible; use --device cpu"
        )
    if kind == "cuda" and index and int(index) >= torch.cuda.device_count():
        raise UserError(
            f"--device {name} was asked for but this machine has "
            f"{torch.cuda.device_count()} GPU(s) (cuda:0 to cuda:{torch.cuda.device_count() - 1})"
        )
    return torch.device(name)


@functools.cache
def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 arithmetic (AVX512-BF16 or AMX), where autocast pays."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in ("avx512_bf16", "amx_bf16"))


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device``, or ``None`` for plain fp32.

    ``auto``: bf16 on CPUs with native bf16 and on CUDA GPUs that support it, fp16 on older
    GPUs, fp32 elsewhere. Master weights always stay fp32.
    """
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        if device.type != "cuda":
            raise UserError("--precision fp16 needs a CUDA GPU; on CPU use bf16 or fp32")
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_supports_bf16() else None


def autocast(device: torch.device, dtype: torch.dtype | None):
    """An autocast context for ``dtype``, or a no-op context for fp32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def available_cores() -> int:
    """CPU cores this process may use (respects taskset and container CPU sets)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def default_workers() -> int:
    """DataLoader workers sized to the machine: at least 70% of the cores (SageMaker's
    Dataloader rule flags fewer as starving the accelerator), at most 32 processes."""
    return min(32, max(1, math.ceil(0.7 * available_cores())))
