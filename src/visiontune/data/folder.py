"""Find the images of a folder dataset and serve them to training.

A dataset root holds split folders (``train/``, ``valid/`` or ``val/`` or ``validation/``,
``test/``), each with one folder per class, or just class folders, which are then split
stratified and seeded (the split recorded in ``split.json`` so every later stage sees the same
one). The root may be a local folder, ``s3://bucket/prefix``, an http(s) archive, or a dataset
name from :mod:`visiontune.data.catalog`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch

from visiontune import uri as uris
from visiontune.data import catalog
from visiontune.data.images import ImageDecodeError, load_image
from visiontune.data.layout import Layout, display_name, scan, validate
from visiontune.data.splits import (
    SPLIT_ORDER,
    recorded_split,
    split_stratified,
)
from visiontune.data.splits import (
    limit_per_class as _limit,
)
from visiontune.errors import UserError

__all__ = [
    "DatasetIndex",
    "ImageDataset",
    "ImageDecodeError",
    "Layout",
    "collate_skip_bad",
    "discover",
    "display_name",
    "load_image",
    "scan",
    "split_stratified",
]


@dataclass
class DatasetIndex:
    """Every image of a dataset with its label, per split: what training iterates over.

    Attributes:
        root: the resolved URI or local path of the dataset root.
        class_ids: sorted class folder names; the position is the label.
        class_names: display names (numeric prefixes dropped).
        splits: ``"train"``/``"valid"``/``"test"`` -> ``[(uri_or_path, label)]``, only splits
            that exist.
        storage_options: what fsspec needs to open the URIs again (JSON-serialisable, no
            secrets).
        file_info: ``uri -> (size, ETag or mtime)``, used for content keys.
        layout: ``"splits"`` (the dataset's own split folders) or ``"classes"`` (class
            folders only, split seeded or from a record).
    """

    root: str
    class_ids: list[str]
    class_names: list[str]
    splits: dict[str, list[tuple[str, int]]]
    storage_options: dict = field(default_factory=dict)
    file_info: dict[str, tuple[int, str]] = field(default_factory=dict, repr=False)
    layout: str = "splits"

    def fingerprint(self, split: str | None = None, *, portable: bool = False) -> str:
        """A stable key of the content (paths, sizes, ETags/mtimes, labels) for caches.

        Args:
            split: only this split's files; ``None`` for the whole index.
            portable: paths under the root and no ETags/mtimes, so a copy of the files
                elsewhere (``cp``, ``rsync`` without ``-t``) has the same key: what a continued
                study compares its data by.
        """
        h = hashlib.sha256()
        h.update(json.dumps([None if portable else self.root, self.class_ids]).encode())
        root = self.root.rstrip("/")
        for name in sorted(self.splits):
            if split is not None and name != split:
                continue
            for path, label in self.splits[name]:
                size, tag = self.file_info.get(path, (-1, ""))
                if portable:
                    path, tag = path.removeprefix(root), ""
                h.update(f"{name}\0{path}\0{label}\0{size}\0{tag}\n".encode())
        return h.hexdigest()[:32]

    def counts(self) -> dict[str, list[int]]:
        """Images per class for each split (index = label)."""
        out = {}
        for split, items in self.splits.items():
            counts = [0] * len(self.class_ids)
            for _, label in items:
                counts[label] += 1
            out[split] = counts
        return out


def discover(
    uri: str,
    *,
    endpoint_url: str | None = None,
    split_ratios: Sequence[float] = (0.8, 0.1, 0.1),
    split_seed: int = 0,
    record_dir: str | Path | None = None,
    limit_per_class: int | None = None,
) -> DatasetIndex:
    """Find every image of a dataset and its label, per split.

    Args:
        uri: a local folder, ``file://``, ``s3://bucket/prefix``, an http(s) archive, or a
            dataset name (``hymenoptera``, ``dogimages``, ``fashion-mnist``).
        endpoint_url: S3-compatible endpoint; default from the AWS environment/config.
        split_ratios: train/valid/test ratios for a root with class folders only.
        split_seed: seed of that split (and of ``limit_per_class`` sampling).
        record_dir: where to record the split (``split.json``, written atomically) and to
            reuse it from, so resume and evaluate see the same split.
        limit_per_class: keep at most this many images per class in each split
            (deterministic seeded sample).

    Returns:
        The :class:`DatasetIndex`.

    Raises:
        UserError: for every bad input: missing path or bucket, empty folder, a split with
            no classes, a class with no images, a file where a folder is expected, permission
            denied, unknown scheme or dataset name, wrong S3 credentials.
    """
    resolved = catalog.resolve(uri, limit_per_class)
    layout = scan(resolved, endpoint_url=endpoint_url)
    validate(layout)
    if layout.kind == "splits":
        splits = {s: layout.files[s] for s in SPLIT_ORDER if s in layout.files}
    else:
        splits = recorded_split(layout.root, layout.files[""], split_ratios, split_seed, record_dir)
    splits = _limit(splits, limit_per_class, split_seed)

    class_ids = sorted({c for classes in splits.values() for c in classes})
    label_of = {c: i for i, c in enumerate(class_ids)}
    index_splits: dict[str, list[tuple[str, int]]] = {}
    file_info: dict[str, tuple[int, str]] = {}
    for split in SPLIT_ORDER:
        if split not in splits:
            continue
        items = []
        for class_id in sorted(splits[split]):
            for rel in splits[split][class_id]:
                path = layout.uri_of(rel)
                items.append((path, label_of[class_id]))
                file_info[path] = layout.file_info[rel]
        index_splits[split] = items
    root = resolved if uris.scheme_of(resolved) == "s3" else layout.fs_root
    return DatasetIndex(
        root=root,
        class_ids=class_ids,
        class_names=[display_name(c) for c in class_ids],
        splits=index_splits,
        storage_options=uris.storage_options(resolved, endpoint_url),
        file_info=file_info,
        layout=layout.kind,
    )


class ImageDataset(torch.utils.data.Dataset):
    """The images of one split as ``(tensor, label)``, or ``None`` for a file that won't decode.

    Local files are read directly. S3 objects are cached on local disk on first read
    (``s3_cache="cache"``, keyed by ETag and size, so a changed object is read again) or read
    from S3 every time (``"stream"``). Filesystems are opened lazily in each process, so the
    dataset works in forked DataLoader workers.

    Args:
        index: from :func:`discover`.
        split: ``"train"``, ``"valid"`` or ``"test"``.
        transform: called with a PIL RGB image; its result is returned.
        decode_size: the shorter side the transform needs; larger JPEGs decode at reduced
            scale (Pillow ``draft()``), which is several times faster for big photos.
        s3_cache: ``"cache"`` or ``"stream"``.
        cache_dir: where S3 objects are cached (default ``$VISIONTUNE_HOME/cache/s3``).
    """

    def __init__(
        self,
        index: DatasetIndex,
        split: str,
        transform,
        *,
        decode_size: int | None = None,
        s3_cache: str = "cache",
        cache_dir: str | Path | None = None,
    ):
        if split not in index.splits:
            raise UserError(
                f"{index.root} has no {split!r} split (it has {', '.join(index.splits) or 'none'})"
            )
        if s3_cache not in ("cache", "stream"):
            raise UserError(f"s3_cache must be 'cache' or 'stream', got {s3_cache!r}")
        self.index = index
        self.split = split
        self.samples = index.splits[split]
        self.targets = [label for _, label in self.samples]
        self.transform = transform
        self.decode_size = decode_size
        self.s3_cache = s3_cache
        self.cache_dir = Path(cache_dir) if cache_dir else uris.visiontune_home() / "cache" / "s3"
        self._fs = None
        self._fs_pid: int | None = None

    def __len__(self) -> int:
        return len(self.samples)

    def _s3(self):
        # A filesystem opened before fork shares sockets and an event loop with the parent.
        if self._fs is None or self._fs_pid != os.getpid():
            self._fs = uris.filesystem("s3", self.index.storage_options)
            self._fs_pid = os.getpid()
        return self._fs

    def cache_path(self, path: str) -> Path:
        """Where an S3 object is cached locally; the name changes when its ETag/size does."""
        size, tag = self.index.file_info.get(path, (-1, ""))
        endpoint = self.index.storage_options.get("endpoint_url") or "aws"
        host = re.sub(r"[^A-Za-z0-9.-]+", "_", endpoint.split("://")[-1]).strip("_")
        key = hashlib.sha1(f"{path}\0{size}\0{tag}".encode()).hexdigest()[:12]
        bucket_key = path[len("s3://") :]
        stem, ext = os.path.splitext(bucket_key)
        return self.cache_dir / host / f"{stem}.{key}{ext}"

    def read(self, path: str) -> bytes | str | BinaryIO:
        """The encoded bytes (or a local path) of one sample."""
        if not path.startswith("s3://"):
            return path
        if self.s3_cache == "stream":
            return self._s3().cat_file(path)
        cached = self.cache_path(path)
        if cached.exists():
            return str(cached)
        data = self._s3().cat_file(path)
        from visiontune.io import atomic_write_bytes

        atomic_write_bytes(cached, data)
        return data

    def __getitem__(self, i: int) -> tuple[Any, int] | None:
        path, label = self.samples[i]
        try:
            image = load_image(self.read(path), self.decode_size)
        except (ImageDecodeError, FileNotFoundError):
            return None  # collate_skip_bad drops it and counts it
        return self.transform(image) if self.transform else image, label


def collate_skip_bad(batch: list) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Stack the samples that decoded; return ``(images, labels, number_dropped)``.

    A batch where nothing decoded gives empty tensors (``images.shape[0] == 0``).
    """
    good = [b for b in batch if b is not None]
    dropped = len(batch) - len(good)
    if not good:
        return torch.empty(0), torch.empty(0, dtype=torch.long), dropped
    images = torch.stack([torch.as_tensor(x) for x, _ in good])
    labels = torch.tensor([y for _, y in good], dtype=torch.long)
    return images, labels, dropped
