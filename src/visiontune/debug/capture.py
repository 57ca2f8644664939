"""Reductions of a tensor, computed on its device without a host sync.

Each function returns a small float32 tensor on the input's device; the debugger concatenates
a save step's results and copies them to the host once (the only sync a save step costs, and
steps that are not saved cost nothing).
"""

from __future__ import annotations

import torch

# Order of the reduction vector; the histogram's ``bins`` counts follow.
REDUCTIONS = (
    "min",
    "max",
    "mean",
    "std",
    "l1",
    "l2",
    "zero_frac",
    "nan",
    "inf",
    "hist_min",
    "hist_max",
)
UNIT_BINS = 100
_BIG = torch.finfo(torch.float32).max


def reduce_tensor(x: torch.Tensor, bins: int) -> torch.Tensor:
    """``REDUCTIONS`` then a ``bins``-bucket histogram over [hist_min, hist_max] (finite values).

    NaN and infinities propagate into min/max/mean/std/norms (that is how ExplodingTensor sees
    them) and are counted in ``nan``/``inf``; the histogram covers the finite values only.
    Called at save steps only: it reads one number back (are all values finite?) to take the
    fast path, which is most of the time.
    """
    x = x.detach().reshape(-1).float()
    if x.numel() == 0:
        return torch.full((len(REDUCTIONS) + bins,), float("nan"), device=x.device)
    isnan, isinf = torch.isnan(x), torch.isinf(x)
    n_nan, n_inf = isnan.sum(), isinf.sum()
    if int(n_nan) + int(n_inf) == 0:
        lo, hi = torch.aminmax(x)
        fmin, fmax = lo, hi
        hist = torch.histc(x, bins, min=float(lo), max=float(hi) if hi > lo else float(lo) + 1)
    else:
        finite = ~(isnan | isinf)
        lo, hi = x.min(), x.max()  # NaN when there is one: ExplodingTensor reads it
        fmin = torch.where(finite, x, _BIG).min()
        fmax = torch.where(finite, x, -_BIG).max()
        span = (fmax - fmin).clamp_min(1e-30)
        idx = ((x - fmin) / span * bins).floor().clamp(0, bins - 1)
        idx = torch.where(finite, idx, 0.0).long()
        hist = torch.zeros(bins, device=x.device).scatter_add_(0, idx, finite.float())
    if x.numel() > 1:
        std, mean = torch.std_mean(x, correction=0)
    else:
        std, mean = torch.zeros((), device=x.device), x.mean()
    head = torch.stack(
        [
            lo,
            hi,
            mean,
            std,
            x.abs().sum(),
            torch.linalg.vector_norm(x),
            (x == 0).float().mean(),
            n_nan.float(),
            n_inf.float(),
            fmin,
            fmax,
        ]
    )
    return torch.cat([head, hist.float()])


def activation_kind(module: torch.nn.Module) -> str:
    """``relu`` (ReLU, ReLU6), ``tanh``, ``sigmoid`` or ``other``: what "inactive" means."""
    n = type(module).__name__.lower()
    if n in ("relu", "relu6"):
        return "relu"
    if "tanh" in n:
        return "tanh"
    if "sigmoid" in n:
        return "sigmoid"
    return "other"


def unit_activity(x: torch.Tensor, kind: str, thr_tanh: float, thr_sigmoid: float):
    """Histogram (``UNIT_BINS`` buckets of 1%) of each unit's activity rate over the batch.

    A unit is one element of a sample's activation; it is *active* on a sample when a ReLU
    output is > 0, a tanh output is inside (-thr_tanh, thr_tanh), a sigmoid output inside
    (1 - thr_sigmoid, thr_sigmoid). DeadRelu and SaturatedActivation read this histogram.
    """
    x = x.detach().float()
    if x.dim() < 2:
        x = x.reshape(1, -1)
    x = x.reshape(x.shape[0], -1)
    if kind == "relu":
        active = x > 0
    elif kind == "tanh":
        active = x.abs() < thr_tanh
    elif kind == "sigmoid":
        active = (x < thr_sigmoid) & (x > 1 - thr_sigmoid)
    else:
        active = x != 0
    rate = active.float().mean(0)
    idx = (rate * UNIT_BINS).floor().clamp(0, UNIT_BINS - 1).long()
    return torch.zeros(UNIT_BINS, device=x.device).scatter_add_(0, idx, torch.ones_like(rate))


def channel_mean(x: torch.Tensor, channel: int = 1) -> torch.Tensor:
    """Mean of each channel over the batch and the pixels (CheckInputImages)."""
    x = x.detach().float()
    dims = [d for d in range(x.dim()) if d != channel]
    return x.mean(dim=dims)
