"""How heads for small data are trained: the L-BFGS probe and weight averaging.

The head's layers themselves are built in ``visiontune.models.registry`` (``HEADS``); this
module holds what the training loop does differently for them, as small pieces
``visiontune.train`` calls from its phases:

- :func:`fit_probe`: ``head: probe`` is a multinomial logistic regression on the frozen
  backbone's cached features, fitted full-batch with L-BFGS (strong-Wolfe line search) to
  convergence. It minimises

      mean_i CE(W x_i + b, y_i) + weight_decay / 2 * ||W||^2      (the bias is not penalised)

  which is scikit-learn's ``LogisticRegression(C=C)`` objective ``C * sum_i CE_i + ||W||^2 / 2``
  divided by ``C * n``: the same minimiser when ``C = 1 / (n_train * weight_decay)`` (three
  classes or more). With two classes scikit-learn fits one weight vector ``v`` where the
  softmax has two rows; the optimum splits it as ``w1 = -w0 = v / 2``, which halves the
  penalty, so there ``C = 2 / (n_train * weight_decay)`` (:func:`probe_c`).
- :class:`WeightAverager`: ``weight_averaging: ema | swa`` keeps a running average of the
  trainable module (``torch.optim.swa_utils.AveragedModel``) from the epoch ``swa_start`` of
  the way through; validation, best-epoch selection and the exported model use it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F


@dataclass
class ProbeFit:
    """What one L-BFGS fit of the probe did."""

    iterations: int
    loss: float  # the regularised objective at the end
    grad_max: float  # largest absolute gradient entry at the end
    converged: bool
    logits: torch.Tensor  # of the training features, at the fitted weights


def probe_c(n_train: int, weight_decay: float, num_classes: int) -> float:
    """scikit-learn's ``LogisticRegression`` ``C`` with the same minimiser as the probe fitted
    with ``weight_decay`` on ``n_train`` samples of ``num_classes`` classes."""
    return (2.0 if num_classes == 2 else 1.0) / (n_train * weight_decay)


def fit_probe(
    linear: nn.Linear,
    features: torch.Tensor,
    labels: torch.Tensor,
    weight_decay: float,
    *,
    label_smoothing: float = 0.0,
    max_iter: int = 1000,
    tolerance_grad: float = 1e-5,
) -> ProbeFit:
    """Fit ``linear`` in place to ``(features, labels)``, warm-started from its weights.

    The objective is strictly convex in ``W`` (for ``weight_decay > 0``), so a warm start
    from any weights reaches the same minimum; a fit that already converged stops at once.
    The fit runs in float64: a full-batch problem is small next to the backbone pass that made
    the features, and float32 stalls L-BFGS's line search before a tight gradient tolerance.

    Args:
        linear: the head's linear layer (``out_features`` classes).
        features: ``(n, feature_dim)`` training features.
        labels: ``(n,)`` class indices.
        weight_decay: the L2 strength (see the module docstring for scikit-learn's ``C``).
        label_smoothing: as ``nn.CrossEntropyLoss``'s.
        max_iter: L-BFGS iterations at most in this call.
        tolerance_grad: converged when every gradient entry is below this in absolute value
            (scikit-learn's lbfgs stops at 1e-4 on the same mean-loss gradient). 1e-6 left
            weakly regularised fits on 800 cached views hovering at 1.2e-6: 1000 iterations
            in every epoch of every fold (fashion-10's probe trials took minutes each).
    """
    device = linear.weight.device
    x = features.to(device, torch.float64)
    y = labels.to(device)
    w = linear.weight.detach().to(torch.float64).clone().requires_grad_(True)
    b = linear.bias.detach().to(torch.float64).clone().requires_grad_(True)
    opt = torch.optim.LBFGS(
        [w, b],
        lr=1.0,
        max_iter=max_iter,
        max_eval=max_iter * 2,
        tolerance_grad=tolerance_grad,
        tolerance_change=1e-14,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def objective() -> torch.Tensor:
        logits = F.linear(x, w, b)
        ce = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
        return ce + 0.5 * weight_decay * (w * w).sum()

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = objective()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
        loss = closure()
    grad_max = max(float(w.grad.abs().max()), float(b.grad.abs().max()))
    iterations = int(opt.state[opt._params[0]].get("n_iter", 0))
    with torch.no_grad():
        linear.weight.copy_(w.to(linear.weight.dtype))
        linear.bias.copy_(b.to(linear.bias.dtype))
        logits = F.linear(x, w, b).float()
    return ProbeFit(
        iterations=iterations,
        loss=float(loss.detach()),
        grad_max=grad_max,
        converged=grad_max <= tolerance_grad,
        logits=logits,
    )


class WeightAverager:
    """A running average of the trainable module: EMA every step, or SWA every epoch end.

    Averaging starts with epoch ``start_epoch`` (0-based; ``floor(swa_start * epochs)``, at
    most the last epoch so something is always averaged). Buffers (batch-norm statistics) are
    averaged with the weights (``use_buffers=True``), so the averaged module evaluates as it
    is, with no extra pass over the data to recompute them.

    Args:
        module: the module that trains (the head over cached features, else the model).
        mode: ``ema`` or ``swa``.
        ema_decay: EMA decay per optimizer step.
        swa_start: fraction of the epochs after which averaging starts.
        epochs: the run's length in epochs.
    """

    def __init__(
        self, module: nn.Module, mode: str, ema_decay: float, swa_start: float, epochs: int
    ):
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        if mode not in ("ema", "swa"):
            raise ValueError(f"unknown weight averaging {mode!r}")
        self.mode = mode
        self.start_epoch = min(epochs - 1, math.floor(swa_start * epochs))
        avg_fn = get_ema_multi_avg_fn(ema_decay) if mode == "ema" else None  # None: equal
        self.averaged = AveragedModel(module, multi_avg_fn=avg_fn, use_buffers=True)
        self.module = module

    def active(self, epoch: int) -> bool:
        """Whether epoch ``epoch`` (0-based) is averaged, so it validates the average."""
        return epoch >= self.start_epoch and int(self.averaged.n_averaged) > 0

    def after_step(self, epoch: int) -> None:
        """Called after every optimizer step of epoch ``epoch``."""
        if self.mode == "ema" and epoch >= self.start_epoch:
            self.averaged.update_parameters(self.module)

    def after_epoch(self, epoch: int) -> None:
        """Called when epoch ``epoch``'s steps are done, before it is validated."""
        if self.mode == "swa" and epoch >= self.start_epoch:
            self.averaged.update_parameters(self.module)

    @property
    def averaged_module(self) -> nn.Module:
        """The module holding the averaged weights (same layers as the trained one)."""
        return self.averaged.module

    def state_dict(self) -> dict[str, Any]:
        return self.averaged.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.averaged.load_state_dict(state)


def merged_state_dict(
    model: nn.Module, part: nn.Module, averaged: nn.Module
) -> dict[str, torch.Tensor]:
    """``model``'s state dict with the tensors of its sub-module ``part`` taken from
    ``averaged`` (a module with ``part``'s layers): the whole model as averaging left it."""
    prefix = next(name for name, m in model.named_modules() if m is part)
    prefix = f"{prefix}." if prefix else ""
    state = dict(model.state_dict())
    state.update({prefix + k: v for k, v in averaged.state_dict().items()})
    return state
