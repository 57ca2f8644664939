"""Test-time augmentation: the one owner of TTA views and of how their answers are combined.

Every consumer (``evaluate``, ``predict``, ``transform`` and the endpoint) turns a preprocessed
``(N, 3, S, S)`` batch into ``N * V`` rows with :func:`expand`, runs its model on those rows as
it runs any batch, and averages the softmax probabilities of each image's ``V`` views with
:func:`average`. The views are taken from the preprocessed tensor (made from the model's
recorded :class:`~visiontune.data.transforms.Preprocess`), so they are the same for an image
file, a JSON instance or an ``.npy`` array, and the ONNX/OpenVINO runtimes see ordinary rows of
the size they were exported for.

Views, in order (the first ``V`` are used; deterministic, no randomness):

* ``full``, ``full+flip``: the model's input and its horizontal mirror (``V=2``, the default);
* ``center``, ``center+flip``: the central 87.5 % scaled back up to ``S`` (a zoom);
* ``top_left``, ``bottom_right``, ``top_right``, ``bottom_left`` zooms, each with its mirror.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from visiontune.data.transforms import Preprocess
from visiontune.errors import UserError

DEFAULT_VIEWS = 2
# The zoomed crops keep this fraction of the side: close to the eval transform's own crop_pct,
# so objects stay whole while the framing changes.
ZOOM = 0.875
_CROPS = ("full", "center", "top_left", "bottom_right", "top_right", "bottom_left")
MAX_VIEWS = 2 * len(_CROPS)


def check_views(views: int) -> int:
    """``views`` if it is a usable view count: 0 (TTA off) or 2 to :data:`MAX_VIEWS`.

    Raises:
        UserError: any other count.
    """
    if views == 0 or 2 <= views <= MAX_VIEWS:
        return int(views)
    raise UserError(
        f"--tta-views must be between 2 (image + its mirror) and {MAX_VIEWS}, got {views}"
    )


def views_from_flags(tta: bool, views: int | None) -> int:
    """The view count the CLI's ``--tta`` and ``--tta-views N`` ask for (``--tta-views`` implies
    ``--tta``, so ``--tta-views 0`` is out of range like 1); 0 when TTA is off.

    Raises:
        UserError: a view count out of range.
    """
    if views is None:
        return DEFAULT_VIEWS if tta else 0
    if views == 0:  # check_views takes 0 as off (config files); a flag asking for TTA does not
        raise UserError(
            f"--tta-views must be between 2 (image + its mirror) and {MAX_VIEWS}, got 0 "
            "(leave out --tta and --tta-views for no TTA)"
        )
    return check_views(views)


def view_names(views: int) -> list[str]:
    """The names of the first ``views`` views, e.g. ``["full", "full+flip"]``."""
    names = [name + flip for name in _CROPS for flip in ("", "+flip")]
    return names[: check_views(views)]


def describe(views: int) -> dict[str, Any] | None:
    """What outputs record about TTA: ``{"views": V, "names": [...]}``, or ``None`` when off."""
    if not views:
        return None
    return {"views": views, "names": view_names(views)}


def _crop(batch: torch.Tensor, name: str, preprocess: Preprocess | None) -> torch.Tensor:
    if name == "full":
        return batch
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    h, w = batch.shape[-2:]
    ch, cw = max(1, round(h * ZOOM)), max(1, round(w * ZOOM))
    top, left = {
        "center": ((h - ch) // 2, (w - cw) // 2),
        "top_left": (0, 0),
        "bottom_right": (h - ch, w - cw),
        "top_right": (0, w - cw),
        "bottom_left": (h - ch, 0),
    }[name]
    mode = InterpolationMode((preprocess or Preprocess()).interpolation)
    # Resizing is linear and each output pixel's weights sum to 1, so resizing the normalised
    # tensor equals normalising the resized image: no need to undo the normalisation.
    region = batch[..., top : top + ch, left : left + cw]
    return F.resize(region, [int(h), int(w)], interpolation=mode, antialias=True)


def expand(batch: torch.Tensor, views: int, preprocess: Preprocess | None = None) -> torch.Tensor:
    """The ``views`` views of every image: ``(N, 3, S, S)`` -> ``(N * views, 3, S, S)``.

    Rows are grouped by image (image 0's views first), so :func:`average` can fold them back.

    Args:
        batch: a preprocessed batch (normalised with the model's mean and std).
        views: how many views per image (2 to :data:`MAX_VIEWS`).
        preprocess: the model's preprocessing (its interpolation resizes the zoomed crops).
    """
    names = view_names(views)
    crops = {name: _crop(batch, name, preprocess) for name in _CROPS if name in set(names)}
    rows = [
        crops[name].flip(-1) if flip else crops[name]
        for name, flip in (n.partition("+")[::2] for n in names)
    ]
    return torch.stack(rows, dim=1).reshape(-1, *batch.shape[1:])


def average(probs: torch.Tensor, views: int) -> torch.Tensor:
    """The mean probabilities over each image's views: ``(N * views, C)`` -> ``(N, C)``.

    Raises:
        ValueError: the row count is not a multiple of ``views`` (a bug in the caller).
    """
    if probs.shape[0] % views:
        raise ValueError(f"{probs.shape[0]} rows are not a whole number of {views}-view groups")
    return probs.float().reshape(-1, views, probs.shape[-1]).mean(1)


def predict_proba(
    predict: Callable[[torch.Tensor], torch.Tensor],
    batch: torch.Tensor,
    views: int,
    preprocess: Preprocess | None = None,
    *,
    max_rows: int | None = None,
) -> torch.Tensor:
    """Probabilities ``(N, C)`` of ``batch``, averaged over ``views`` views (0: no TTA).

    Args:
        predict: rows -> probabilities, e.g. a serving runtime's ``predict``.
        batch: a preprocessed ``(N, 3, S, S)`` batch.
        views: views per image; 0 runs ``predict`` on ``batch`` as it is.
        preprocess: the model's preprocessing.
        max_rows: the most rows given to ``predict`` at once (memory stays that of a batch
            of this size, whatever the view count); default all at once.
    """
    if not views:
        return predict(batch)
    rows = expand(batch, views, preprocess)
    parts = torch.split(rows, max_rows) if max_rows else (rows,)
    return average(torch.cat([predict(part) for part in parts]), views)


class TTAModel(nn.Module):
    """A classifier whose output is the log of its view-averaged softmax probabilities.

    Drop-in where logits are expected (argmax, cross-entropy and softmax of the output give
    the TTA prediction, loss and probabilities).

    Args:
        model: the classifier (logits out).
        views: views per image (2 to :data:`MAX_VIEWS`).
        preprocess: the model's preprocessing.
        keep_single_view: keep the first (plain) view's logits of every batch in
            :attr:`single_view_logits`, so one pass measures accuracy with and without TTA.
    """

    def __init__(
        self,
        model: nn.Module,
        views: int,
        preprocess: Preprocess | None = None,
        *,
        keep_single_view: bool = False,
    ):
        super().__init__()
        self.model = model
        self.views = check_views(views)
        self.preprocess = preprocess
        self.keep_single_view = keep_single_view
        self.single_view_logits: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(expand(x, self.views, self.preprocess)).float()
        if self.keep_single_view:
            self.single_view_logits.append(logits[:: self.views].cpu())
        # Mean probabilities, not mean logits: one view's very large logit would otherwise
        # outvote the others. The log keeps argmax, cross-entropy and softmax meaningful.
        return average(logits.softmax(1), self.views).clamp_min(1e-12).log()
