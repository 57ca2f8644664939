"""What is in a dataset root: one listing sorted into splits and class folders.

:func:`scan` lists a local folder or an ``s3://`` prefix once and reports what it found,
before any judgement (``data check`` reports on the :class:`Layout`; :func:`validate` raises
the errors that make it unusable for training). It takes a URI, never a dataset name: the
caller resolves names first (:func:`visiontune.data.catalog.resolve`), so the catalog can
use this module without a cycle.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

from visiontune import uri as uris
from visiontune.data.images import is_image_name
from visiontune.data.splits import SPLIT_ALIASES, SPLIT_ORDER
from visiontune.errors import UserError

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


def validate(layout: Layout) -> None:
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
