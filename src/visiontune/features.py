"""Backbone features computed once and kept on disk.

With a frozen backbone and no augmentation, every epoch (and every tuning trial) would push the
same images through the same network. Instead the pooled features are computed once per
(backbone, weights, preprocessing, dataset content) and stored in a cache directory keyed by
those; training the head on them takes seconds.

With augmentation, ``augment_views`` K > 0 caches the features of K augmented views of every
training image instead. View ``v`` of image ``i`` is drawn under its own seed
(:func:`view_seed` of the run's seed, ``i`` and ``v``), so it is the same on every run, machine,
loader worker and batch order; each view is stored under its own key (the plain key plus the
preset, the seed and ``v``), so a run with K=8 reuses the 4 views a K=4 run computed. In
epoch ``e`` sample ``i`` trains on view :func:`view_choice` of its (seed, epoch, index) seed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from visiontune.device import autocast
from visiontune.errors import UserError
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


# --------------------------------------------------------------------------------------------
# Augmented views


def _mix(x: int) -> int:
    """splitmix64: a well-spread 64-bit hash of an integer (the same on every machine)."""
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def view_seed(seed: int, index: int, view: int) -> int:
    """The seed that draws view ``view`` of training image ``index`` for run seed ``seed``."""
    return _mix(_mix(_mix(seed) ^ index) ^ (view + 0x5EED)) % (2**63)


def check_views_fit(
    views: int,
    images: int,
    feature_dim: int,
    available: int | None = None,
    processes: int = 1,
) -> None:
    """Refuse, before any compute, cached views whose features would not fit in memory.

    The head trains on all ``views`` x ``images`` feature rows held at once (float32), and
    computing the missing ones briefly holds them twice; more than that against the memory
    available now would end in the kernel killing the run after the whole backbone pass.
    Under torchrun every one of this machine's ``processes`` holds them all.

    Raises:
        UserError: the features need more than half the available memory.
    """
    need = 2 * views * images * feature_dim * 4 * processes
    if available is None:
        import psutil

        available = int(psutil.virtual_memory().available)
    if need > available // 2:

        def size(n: int) -> str:
            for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
                if n >= scale:
                    return f"{n / scale:.1f} {unit}"
            return f"{n / 2**10:.0f} KiB"

        each = f" in each of {processes} processes" if processes > 1 else ""
        raise UserError(
            f"augment_views {views}: the features of {views} views of {images} images "
            f"({feature_dim} wide{each}) need about {size(need)} of memory while computed, "
            f"and {size(available)} is available: use fewer views"
        )


def view_choice(sample_seed: int, views: int) -> int:
    """Which of ``views`` cached views a sample trains on, from its per-epoch sample seed
    (``train.EpochSampler`` derives that from seed, epoch and index: resume stays exact)."""
    return _mix(sample_seed) % views


class AugmentedViews(Dataset):
    """Views ``views`` of every item of ``base`` (an image dataset with a random transform),
    view-major: item ``j`` is view ``views[j // n]`` of image ``j % n``, drawn under
    :func:`view_seed`.

    The global RNG is forked around each item: seeding here does not disturb other streams.
    """

    def __init__(self, base: Dataset, seed: int, views: list[int]):
        self.base, self.seed, self.views = base, seed, list(views)
        self.n = len(base)  # type: ignore[arg-type]

    def __len__(self) -> int:
        return self.n * len(self.views)

    def __getitem__(self, j: int):
        v, i = divmod(j, self.n)
        with torch.random.fork_rng(devices=[]):
            # The CPU generator alone (what augmentation draws from): torch.manual_seed would
            # also reseed the GPU's, which fork_rng(devices=[]) does not restore.
            torch.default_generator.manual_seed(view_seed(self.seed, i, self.views[v]))
            return self.base[i]


class ViewFeatures(Dataset):
    """Cached features of K views ``[K, N, D]`` and labels ``[N]``; item ``(i, sample_seed)``
    (what ``train.EpochSampler`` yields) is view :func:`view_choice` of sample ``i``.

    Only the augmented views are drawn from, never the plain (eval-transform) features: the
    head then sees what training over images with the same preset shows it, one random
    augmentation a sample an epoch, and K large tends to exactly that.
    """

    def __init__(self, views: torch.Tensor, labels: torch.Tensor):
        self.views, self.labels = views, labels

    def __len__(self) -> int:
        return self.views.shape[1]

    def rows(self, rows: list[int]) -> ViewFeatures:
        """The views of samples ``rows`` only (a cross-validation fold of the pool)."""
        return ViewFeatures(self.views[:, rows], self.labels[rows])

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        i, sample_seed = key
        return self.views[view_choice(sample_seed, self.views.shape[0]), i], self.labels[i]
