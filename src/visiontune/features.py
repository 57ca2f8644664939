"""Backbone features computed once and kept on disk.

With a frozen backbone and no augmentation, every epoch (and every tuning trial) would push the
same images through the same network. Instead the pooled features are computed once per
(backbone, weights, preprocessing, dataset content) and stored in a cache directory keyed by
those; training the head on them takes seconds.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from visiontune.device import autocast
from visiontune.io import atomic_write

FEATURE_FORMAT = 1


def cache_root() -> Path:
    """``$VISIONTUNE_HOME/cache`` (default ``~/.cache/visiontune/cache``)."""
    from visiontune.uri import visiontune_home

    return visiontune_home() / "cache"


def weights_key(weights: str) -> str:
    """A content key for ``--weights``: the name, or a hash of the file it points at."""
    if weights in ("imagenet", "none"):
        return weights
    h = hashlib.sha256()
    with open(weights, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def feature_key(**parts: Any) -> str:
    """A stable hash of everything that decides the features."""
    blob = json.dumps({"format": FEATURE_FORMAT, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _path(key: str) -> Path:
    return cache_root() / "features" / f"{key}.safetensors"


def is_cached(key: str) -> bool:
    """True when features for ``key`` are on disk (they are read, not computed)."""
    return _path(key).is_file()


def load(key: str) -> tuple[torch.Tensor, torch.Tensor, int] | None:
    """Cached ``(features, labels, n_bad)`` for ``key``, or ``None`` (a damaged entry is
    deleted: it is recomputed, never trusted)."""
    from safetensors.torch import load_file

    path = _path(key)
    if not path.is_file():
        return None
    try:
        d = load_file(str(path))
        return d["features"], d["labels"], int(d["n_bad"].item())
    except Exception:
        path.unlink(missing_ok=True)
        return None


def compute(
    backbone: torch.nn.Module,
    loader: Any,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    channels_last: bool = True,
    progress: Any = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Features and labels for every good image of ``loader``'s ``(images, labels, n_bad)``
    batches, stored as fp32 whatever precision computed them."""
    feats, labels, n_bad = [], [], 0
    backbone.eval()
    with torch.inference_mode():
        for images, targets, bad in loader:
            n_bad += bad
            if images.numel() == 0:
                continue
            images = images.to(device, non_blocking=True)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast(device, amp_dtype):
                f = backbone(images)
            feats.append(f.float().cpu())
            labels.append(targets)
            if progress is not None:
                progress(len(targets) + bad)
    features = torch.cat(feats) if feats else torch.empty(0)
    label_t = torch.cat(labels) if labels else torch.empty(0, dtype=torch.long)
    return features, label_t, n_bad


def save(key: str, features: torch.Tensor, labels: torch.Tensor, n_bad: int) -> None:
    """Store features under ``key`` (atomically: a reader never sees half a file)."""
    from safetensors.torch import save_file

    tensors = {"features": features, "labels": labels, "n_bad": torch.tensor(n_bad)}
    atomic_write(_path(key), lambda tmp: save_file(tensors, tmp))


def load_or_compute(
    key: str,
    backbone: torch.nn.Module,
    loader: DataLoader,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    channels_last: bool = True,
    progress: Any = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Features and labels for every good image of ``loader``, from cache or computed now.

    The loader yields ``(images, labels, n_bad)`` (see ``collate_skip_bad``). Features are
    stored as fp32 whatever precision computed them.

    Returns:
        ``(features, labels, n_bad)``.
    """
    found = load(key)
    if found is not None:
        return found
    features, labels, n_bad = compute(backbone, loader, device, amp_dtype, channels_last, progress)
    save(key, features, labels, n_bad)
    return features, labels, n_bad
