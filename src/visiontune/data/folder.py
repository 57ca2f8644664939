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
import math
import os
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch

from visiontune import uri as uris
from visiontune.data.images import ImageDecodeError, is_image_name, load_image
from visiontune.errors import UserError

__all__ = [
    "DatasetIndex",
    "ImageDataset",
    "ImageDecodeError",
    "collate_skip_bad",
    "discover",
    "display_name",
    "load_image",
    "scan",
]

# Folder name (lower case) -> canonical split name.
SPLIT_ALIASES = {
    "train": "train",
    "valid": "valid",
    "val": "valid",
    "validation": "valid",
    "test": "test",
}
SPLIT_ORDER = ("train", "valid", "test")
SPLIT_FILE_VERSION = 1
_NUMERIC_PREFIX = re.compile(r"^\d+[._\-\s]+(?=\S)")


def display_name(class_id: str) -> str:
    """The human name of a class folder: ``001.Affenpinscher`` -> ``Affenpinscher``."""
    return _NUMERIC_PREFIX.sub("", class_id) or class_id


def _hidden(part: str) -> bool:
    # .DS_Store, .ipynb_checkpoints, macOS resource forks: never data.
    return part.startswith(".") or part == "__MACOSX" or part == "Thumbs.db"


@dataclass
class Layout:
    """What is in a dataset root, before any judgement (``data check`` reports on this).

    ``files`` maps each canonical split to class id to image paths relative to the root.
    """

    root: str
    fs: Any
    fs_root: str
    kind: str  # "splits" or "classes"
    files: dict[str, dict[str, list[str]]]
    split_dirs: dict[str, str] = field(default_factory=dict)
    file_info: dict[str, tuple[int, str]] = field(default_factory=dict)
    non_images: list[str] = field(default_factory=list)
    stray_files: list[str] = field(default_factory=list)
    ignored_dirs: list[str] = field(default_factory=list)

    def uri_of(self, rel: str) -> str:
        """The URI (or absolute local path) of a file given relative to the root."""
        if uris.scheme_of(self.root) == "s3":
            return f"s3://{self.fs_root}/{rel}"
        return os.path.join(self.fs_root, *rel.split("/"))


def _resolve(uri: str, endpoint_url: str | None, limit_per_class: int | None) -> str:
    """Dataset names become local folders (fetched once); anything else passes through."""
    from visiontune.data import catalog

    uri = str(uri)
    if catalog.is_dataset_name(uri):
        return str(catalog.fetch(uri, limit_per_class=limit_per_class))
    if uris.scheme_of(uri) == "" and not os.path.exists(uri) and os.sep not in uri.rstrip(os.sep):
        known = ", ".join(sorted(catalog.DATASETS))
        raise UserError(f"{uri!r} is neither an existing path nor a dataset name ({known})")
    return uri


def scan(uri: str, *, endpoint_url: str | None = None) -> Layout:
    """List a dataset root once and sort its files into splits and classes.

    One recursive listing (paginated by s3fs on S3), so a prefix of any size costs a few
    requests, not one per folder.

    Raises:
        UserError: the root does not exist, is a file, is empty, cannot be read, holds no
            class folders, or holds split folders that are ambiguous (``val/`` and ``valid/``).
    """
    fs, root = uris.open_fs(uri, endpoint_url)
    with uris.storage_errors(uri, endpoint_url):
        if uris.scheme_of(uri) == "s3":
            # List first: a listing fails with a precise error code (wrong key, no bucket),
            # where an existence check (HEAD) only says "Forbidden".
            entries = fs.find(root, detail=True, withdirs=True)
            if not entries:
                fs.ls(root.split("/", 1)[0])  # a missing bucket raises its own clear error
                raise UserError(f"{uri} does not exist (no objects under that prefix)")
            if entries.get(root, {}).get("type") == "file":
                raise UserError(f"{uri} is a file; expected a dataset folder with class folders")
        else:
            if not fs.exists(root):
                raise UserError(f"{uri} does not exist")
            if fs.isfile(root):
                raise UserError(f"{uri} is a file; expected a dataset folder with class folders")
            entries = fs.find(root, detail=True, withdirs=True)

    layout = Layout(root=uri, fs=fs, fs_root=root, kind="classes", files={})
    dirs: set[str] = set()
    files: dict[str, dict] = {}
    prefix = root.rstrip("/") + "/"
    for name, info in entries.items():
        name = name.replace(os.sep, "/") if os.sep != "/" else name
        if not name.startswith(prefix):
            continue
        rel = name[len(prefix) :].strip("/")
        if not rel or any(_hidden(p) for p in rel.split("/")):
            continue
        if info.get("type") == "directory":
            dirs.add(rel)
        else:
            files[rel] = info
            for i in range(1, rel.count("/") + 1):  # S3 has no real folders: infer them
                dirs.add(rel.rsplit("/", i)[0])
    if not dirs and not files:
        raise UserError(f"{uri} is empty; expected class folders or train/ valid/ test/ folders")

    top_dirs = sorted(d for d in dirs if "/" not in d)
    split_dirs: dict[str, str] = {}
    for d in top_dirs:
        canonical = SPLIT_ALIASES.get(d.lower())
        if canonical is None:
            continue
        if canonical in split_dirs:
            raise UserError(
                f"{uri} has both {split_dirs[canonical]}/ and {d}/ for the {canonical} split; "
                "keep one"
            )
        split_dirs[canonical] = d
    split_dirs = {s: split_dirs[s] for s in SPLIT_ORDER if s in split_dirs}

    if split_dirs:
        layout.kind = "splits"
        layout.split_dirs = split_dirs
        layout.ignored_dirs = [d for d in top_dirs if d not in split_dirs.values()]
        for split, folder in split_dirs.items():
            layout.files[split] = {
                d.split("/", 1)[1]: []
                for d in dirs
                if d.startswith(folder + "/") and d.count("/") == 1
            }
        by_folder = {folder: split for split, folder in split_dirs.items()}
        for rel in sorted(files):
            parts = rel.split("/")
            split = by_folder.get(parts[0])
            if split is None:
                if len(parts) == 1:
                    layout.stray_files.append(rel)
                continue  # inside a folder that is not a split: ignored (and reported)
            if len(parts) == 2:
                layout.stray_files.append(rel)  # an image beside the class folders
                continue
            _add(layout, layout.files[split][parts[1]], rel, files[rel])
    else:
        layout.files[""] = {d: [] for d in top_dirs}
        for rel in sorted(files):
            parts = rel.split("/")
            if len(parts) == 1:
                layout.stray_files.append(rel)
                continue
            _add(layout, layout.files[""][parts[0]], rel, files[rel])
    return layout


def _add(layout: Layout, bucket: list[str], rel: str, info: dict) -> None:
    if not is_image_name(rel):
        layout.non_images.append(rel)
        return
    bucket.append(rel)
    # Content key for caches: ETag on S3 (changes with the bytes), mtime on local disks.
    tag = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified")
    layout.file_info[rel] = (int(info.get("size") or 0), str(tag).strip('"'))


def _validate(layout: Layout) -> None:
    """Raise the one-line errors that make a layout unusable for training."""
    root = layout.root
    if layout.kind == "classes" and not layout.files[""]:
        if layout.stray_files:
            raise UserError(
                f"{root} holds files but no class folders; put each class in its own folder: "
                f"{uris.join(root, '<class>', '<image>')}"
            )
        raise UserError(f"{root} holds no class folders")
    for split, classes in layout.files.items():
        where = uris.join(root, layout.split_dirs.get(split, ""))
        if not classes:
            raise UserError(
                f"split {split or 'root'} ({where}) has no class folders; expected "
                f"{uris.join(where, '<class>', '<image>')}"
            )
        for class_id, images in classes.items():
            if not images:
                others = [
                    r
                    for r in layout.non_images
                    if r.startswith(_class_dir(layout, split, class_id))
                ]
                extra = f" (only non-image files such as {others[0]!r})" if others else ""
                raise UserError(
                    f"class {class_id!r} has no images{extra}: {uris.join(where, class_id)}"
                )
    class_ids = {c for classes in layout.files.values() for c in classes}
    if len(class_ids) < 2:
        raise UserError(
            f"{root} has only {len(class_ids)} class ({', '.join(class_ids)}); "
            "a classifier needs at least 2 class folders"
        )


def _class_dir(layout: Layout, split: str, class_id: str) -> str:
    folder = layout.split_dirs.get(split)
    return f"{folder}/{class_id}/" if folder else f"{class_id}/"


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
    """

    root: str
    class_ids: list[str]
    class_names: list[str]
    splits: dict[str, list[tuple[str, int]]]
    storage_options: dict = field(default_factory=dict)
    file_info: dict[str, tuple[int, str]] = field(default_factory=dict, repr=False)

    def fingerprint(self, split: str | None = None) -> str:
        """A stable key of the content (paths, sizes, ETags/mtimes, labels) for caches.

        Args:
            split: only this split's files; ``None`` for the whole index.
        """
        h = hashlib.sha256()
        h.update(json.dumps([self.root, self.class_ids]).encode())
        for name in sorted(self.splits):
            if split is not None and name != split:
                continue
            for path, label in self.splits[name]:
                size, tag = self.file_info.get(path, (-1, ""))
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


def _check_ratios(split_ratios: Sequence[float]) -> tuple[float, float, float]:
    ratios = tuple(float(r) for r in split_ratios)
    if len(ratios) == 2:
        ratios = (*ratios, 0.0)
    if (
        len(ratios) != 3
        or any(r < 0 or math.isnan(r) for r in ratios)
        or ratios[0] <= 0
        or abs(sum(ratios) - 1.0) > 1e-6
    ):
        raise UserError(
            f"split ratios {list(split_ratios)} must be 2 or 3 non-negative numbers "
            "(train > 0) adding up to 1, e.g. 0.8,0.1,0.1"
        )
    return ratios  # type: ignore[return-value]


def split_stratified(
    files: dict[str, list[str]], ratios: Sequence[float], seed: int
) -> dict[str, dict[str, list[str]]]:
    """Split each class's files into train/valid/test with a seeded shuffle.

    The shuffle of a class depends only on the seed, the class id and its file names, so
    adding a class does not reshuffle the others. Every class keeps at least one training
    image, and a class with 3+ images gets at least one in each split with a non-zero ratio.
    """
    _, valid_r, test_r = _check_ratios(ratios)
    out: dict[str, dict[str, list[str]]] = {s: {} for s in SPLIT_ORDER}
    for class_id in sorted(files):
        items = sorted(files[class_id])
        random.Random(f"{seed}/{class_id}").shuffle(items)
        n = len(items)
        n_valid, n_test = round(n * valid_r), round(n * test_r)
        if n >= 3:
            n_valid = max(n_valid, 1 if valid_r > 0 else 0)
            n_test = max(n_test, 1 if test_r > 0 else 0)
        while n_valid + n_test >= n and (n_valid or n_test):
            if n_valid >= n_test:
                n_valid -= 1
            else:
                n_test -= 1
        out["valid"][class_id] = sorted(items[:n_valid])
        out["test"][class_id] = sorted(items[n_valid : n_valid + n_test])
        out["train"][class_id] = sorted(items[n_valid + n_test :])
    return {s: c for s, c in out.items() if any(c.values())}


def _recorded_split(
    layout: Layout, ratios: Sequence[float], seed: int, record_dir: str | Path | None
) -> dict[str, dict[str, list[str]]]:
    """Split a class-folder root, reusing ``record_dir/split.json`` when it exists."""
    files = layout.files[""]
    current = {rel for images in files.values() for rel in images}
    path = Path(record_dir) / "split.json" if record_dir is not None else None
    if path is not None and path.exists():
        try:
            recorded = json.loads(path.read_text())
            splits = {
                s: {c: list(r) for c, r in cls.items()} for s, cls in recorded["splits"].items()
            }
        except (json.JSONDecodeError, KeyError, AttributeError, TypeError) as e:
            raise UserError(
                f"{path} is not a valid split record ({e}); delete it to re-split"
            ) from None
        listed = {rel for cls in splits.values() for images in cls.values() for rel in images}
        if listed != current:
            missing, new = len(listed - current), len(current - listed)
            raise UserError(
                f"{layout.root} changed since its split was recorded in {path} ({missing} files "
                f"gone, {new} new); delete {path} to split again"
            )
        return splits
    splits = split_stratified(files, ratios, seed)
    if path is not None:
        from visiontune.io import atomic_write_json

        atomic_write_json(
            path,
            {
                "version": SPLIT_FILE_VERSION,
                "root": layout.root,
                "seed": seed,
                "ratios": list(_check_ratios(ratios)),
                "splits": splits,
            },
        )
    return splits


def _limit(
    splits: dict[str, dict[str, list[str]]], limit: int | None, seed: int
) -> dict[str, dict[str, list[str]]]:
    if limit is None:
        return splits
    if limit < 1:
        raise UserError(f"limit_per_class must be at least 1, got {limit}")
    out: dict[str, dict[str, list[str]]] = {}
    for split, classes in splits.items():
        out[split] = {}
        for class_id, items in classes.items():
            if len(items) > limit:
                # A seeded sample, not the first N names: names often sort by date or source.
                items = sorted(
                    random.Random(f"{seed}/limit/{split}/{class_id}").sample(items, limit)
                )
            out[split][class_id] = items
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
    resolved = _resolve(uri, endpoint_url, limit_per_class)
    layout = scan(resolved, endpoint_url=endpoint_url)
    _validate(layout)
    if layout.kind == "splits":
        splits = {s: layout.files[s] for s in SPLIT_ORDER if s in layout.files}
    else:
        splits = _recorded_split(layout, split_ratios, split_seed, record_dir)
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
