"""Train and eval preprocessing, built from the numbers a backbone carries.

Every registry entry carries a :class:`Preprocess`; training, evaluation and serving all build
their transforms from it, and ``model.json`` stores it, so serving uses the same numbers
training used.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

_INTERP = {
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
    "nearest": InterpolationMode.NEAREST,
}


@dataclass(frozen=True)
class Preprocess:
    """How images are turned into the tensor a backbone expects.

    Attributes:
        input_size: side of the square crop fed to the network.
        crop_pct: eval resizes the shorter side to ``input_size / crop_pct`` then centre-crops.
        mean, std: per-channel normalisation of [0, 1] RGB values.
        interpolation: ``bilinear`` or ``bicubic`` (or ``nearest``).
        min_size: the smallest input the architecture accepts.
    """

    input_size: int = 224
    crop_pct: float = 0.875
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: Literal["bilinear", "bicubic", "nearest"] = "bilinear"
    min_size: int = 32

    @property
    def resize_size(self) -> int:
        return round(self.input_size / self.crop_pct)

    def with_size(self, size: int | None) -> Preprocess:
        """The same preprocessing at another input size (``None`` keeps this one)."""
        if size is None or size == self.input_size:
            return self
        return Preprocess(**{**asdict(self), "input_size": int(size)})

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["resize_size"] = self.resize_size
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocess:
        fields = {
            k: d[k] for k in ("input_size", "crop_pct", "interpolation", "min_size") if k in d
        }
        return cls(mean=tuple(d["mean"]), std=tuple(d["std"]), **fields)


def eval_transform(p: Preprocess) -> T.Compose:
    """Resize the shorter side, centre-crop, scale to [0, 1], normalise. Takes a PIL RGB image."""
    return T.Compose(
        [
            T.PILToTensor(),
            T.Resize(p.resize_size, interpolation=_INTERP[p.interpolation], antialias=True),
            T.CenterCrop(p.input_size),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(p.mean, p.std),
        ]
    )


def train_transform(p: Preprocess, augment: str) -> T.Compose:
    """Training transform for an augmentation preset: ``none``, ``light`` or ``strong``.

    ``none`` is exactly the eval transform, so backbone features can be computed once and
    reused across epochs and tuning trials.
    """
    if augment == "none":
        return eval_transform(p)
    interp = _INTERP[p.interpolation]
    if augment == "light":
        ops = [
            T.PILToTensor(),
            T.RandomResizedCrop(
                p.input_size, scale=(0.35, 1.0), interpolation=interp, antialias=True
            ),
            T.RandomHorizontalFlip(),
        ]
        tail: list[Any] = []
    elif augment == "strong":
        ops = [
            T.PILToTensor(),
            T.RandomResizedCrop(
                p.input_size, scale=(0.08, 1.0), interpolation=interp, antialias=True
            ),
            T.RandomHorizontalFlip(),
            T.TrivialAugmentWide(interpolation=interp),
        ]
        tail = [T.RandomErasing(p=0.25)]
    else:
        raise ValueError(f"unknown augmentation preset {augment!r}")
    return T.Compose(
        [*ops, T.ToDtype(torch.float32, scale=True), T.Normalize(p.mean, p.std), *tail]
    )


def decode_size_hint(p: Preprocess) -> int:
    """The shorter side an image needs before transforms: JPEG drafts may decode down to it."""
    return p.resize_size
