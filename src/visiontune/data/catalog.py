"""Named datasets: ``visiontune data fetch NAME`` and a name wherever a dataset URI goes.

Each entry of :data:`DATASETS` says where the data comes from and how to turn it into the
folder layout (``train/ valid/ test/``, one folder per class). Everything is fetched once into
``$VISIONTUNE_HOME/datasets/NAME`` (default ``~/.cache/visiontune``), verified, and written
atomically: a folder only counts as complete once its hidden completion marker exists.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import shutil
import struct
import tempfile
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from visiontune import uri as uris
from visiontune.data.images import is_image_name
from visiontune.errors import UserError

MARKER = ".visiontune-complete.json"


@dataclass(frozen=True)
class DatasetSpec:
    """One named dataset.

    Attributes:
        name: what users type.
        description: one line for ``data list``.
        url: where it is downloaded from (for multi-file sets, the base URL).
        materialise: ``(spec, dest, limit_per_class, progress) -> root`` writes the folder
            layout into the (new, empty) folder ``dest`` and returns the dataset root in it.
        sha256: checksum of the archive, where known.
        num_classes: expected number of classes; a different archive is refused.
        num_images: images in the full set (informational).
        files: for multi-file sets, file name -> md5 of the published file.
        local_dirs: folders that may already hold the files (a distribution package).
    """

    name: str
    description: str
    url: str
    materialise: Callable[[DatasetSpec, Path, int | None, bool], Path]
    sha256: str | None = None
    num_classes: int | None = None
    num_images: int | None = None
    files: dict[str, str] = field(default_factory=dict)
    local_dirs: tuple[str, ...] = ()


def _sample(names: list[str], limit: int | None, key: str) -> list[str]:
    if limit is None or len(names) <= limit:
        return names
    return sorted(random.Random(key).sample(sorted(names), limit))


def _from_archive(spec: DatasetSpec, dest: Path, limit: int | None, progress: bool) -> Path:
    """Download the archive once (kept in the downloads cache), extract it into ``dest``."""
    archive_file = uris.archive_name(spec.url)
    archive = uris.download(
        spec.url,
        uris.visiontune_home() / "downloads" / f"{spec.name}-{archive_file}",
        sha256=spec.sha256,
        progress=progress,
    )
    if spec.sha256 is None:
        uris.verify_archive(archive)  # no published checksum: at least every CRC must match

    def keep(names: list[str]) -> set[str]:
        by_folder: dict[str, list[str]] = defaultdict(list)
        for n in names:
            if is_image_name(n):
                by_folder[n.rsplit("/", 1)[0] if "/" in n else ""].append(n)
        return {
            n for folder, items in by_folder.items() for n in _sample(items, limit, f"0/{folder}")
        }

    root = uris.extract_archive(archive, dest, keep=keep if limit else None)
    if spec.num_classes is not None:
        from visiontune.data.layout import scan

        layout = scan(str(root))
        found = {c for classes in layout.files.values() for c in classes}
        if len(found) != spec.num_classes:
            shutil.rmtree(dest, ignore_errors=True)
            raise UserError(
                f"{spec.url} held {len(found)} classes, expected {spec.num_classes}; "
                "the archive changed upstream or is not the right file"
            )
    return root


FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
_IDX_COUNTS = {"train": 60_000, "t10k": 10_000}


def _read_idx(path: Path, kind: str, expected: int) -> np.ndarray:
    """Parse one gzipped IDX file (the MNIST format), checking its header."""
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise UserError(f"{path} is damaged ({e}); delete it and fetch again") from None
    magic, count = struct.unpack(">II", data[:8])
    want_magic = 2051 if kind == "images" else 2049
    if magic != want_magic or count != expected:
        raise UserError(f"{path} is not a Fashion-MNIST {kind} file of {expected} items")
    if kind == "images":
        rows, cols = struct.unpack(">II", data[8:16])
        arr = np.frombuffer(data, dtype=np.uint8, offset=16)
        if arr.size != count * rows * cols:
            raise UserError(f"{path} is truncated; delete it and fetch again")
        return arr.reshape(count, rows, cols)
    arr = np.frombuffer(data, dtype=np.uint8, offset=8)
    if arr.size != count or arr.max(initial=0) >= len(FASHION_MNIST_CLASSES):
        raise UserError(f"{path} is damaged; delete it and fetch again")
    return arr


def _fashion_files(spec: DatasetSpec, progress: bool) -> Path:
    """The folder holding the four .gz files: the Debian package's, or downloaded ones."""
    for folder in spec.local_dirs:
        if all((Path(folder) / name).is_file() for name in spec.files):
            return Path(folder)
    target = uris.visiontune_home() / "downloads" / spec.name
    for name, md5 in spec.files.items():
        uris.download(f"{spec.url}/{name}", target / name, md5=md5, progress=progress)
    return target


def fashion_mnist_folder(name: str) -> str:
    """Class folder names keep the label order: ``0.T-shirt_top`` ... ``9.Ankle_boot``."""
    index = FASHION_MNIST_CLASSES.index(name)
    return f"{index}.{name.replace('/', '_').replace(' ', '_')}"


def _from_fashion_mnist(spec: DatasetSpec, dest: Path, limit: int | None, progress: bool) -> Path:
    """Write Fashion-MNIST as PNG folders: train/ (minus a seeded 10% valid/) and test/."""
    from PIL import Image

    source = _fashion_files(spec, progress)
    parts = {}
    for prefix, split in (("train", "train"), ("t10k", "test")):
        images = _read_idx(source / f"{prefix}-images-idx3-ubyte.gz", "images", _IDX_COUNTS[prefix])
        labels = _read_idx(source / f"{prefix}-labels-idx1-ubyte.gz", "labels", _IDX_COUNTS[prefix])
        parts[split] = (images, labels)

    train_labels = parts["train"][1]
    selected: dict[str, dict[int, list[int]]] = {"train": {}, "valid": {}, "test": {}}
    for label in range(len(FASHION_MNIST_CLASSES)):
        idx = np.flatnonzero(train_labels == label).tolist()
        random.Random(f"fashion-mnist/valid/{label}").shuffle(idx)
        n_valid = len(idx) // 10
        selected["valid"][label] = sorted(idx[:n_valid])
        selected["train"][label] = sorted(idx[n_valid:])
        selected["test"][label] = np.flatnonzero(parts["test"][1] == label).tolist()

    dest.mkdir(parents=True, exist_ok=True)
    for split, by_label in selected.items():
        images = parts["test" if split == "test" else "train"][0]
        for label, idx in by_label.items():
            folder = dest / split / fashion_mnist_folder(FASHION_MNIST_CLASSES[label])
            folder.mkdir(parents=True, exist_ok=True)
            keep = (
                idx
                if limit is None
                else sorted(
                    random.Random(f"fashion-mnist/limit/{split}/{label}").sample(
                        idx, min(limit, len(idx))
                    )
                )
            )
            for i in keep:
                Image.fromarray(images[i], "L").save(folder / f"{i:05d}.png", optimize=False)
    return dest


# The registry: a new named dataset is one entry here.
DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec(
            name="dogimages",
            description="Udacity dog breeds: 133 classes, 8,351 photos, train/valid/test",
            url="https://s3-us-west-1.amazonaws.com/udacity-aind/dog-project/dogImages.zip",
            materialise=_from_archive,
            num_classes=133,
            num_images=8351,
        ),
        DatasetSpec(
            name="hymenoptera",
            description="PyTorch tutorial ants vs bees: 2 classes, ~400 photos, train/val",
            url="https://download.pytorch.org/tutorial/hymenoptera_data.zip",
            materialise=_from_archive,
            num_classes=2,
        ),
        DatasetSpec(
            name="fashion-mnist",
            description="Zalando Fashion-MNIST: 10 classes, 70,000 28x28 PNGs, train/valid/test",
            url="http://fashion-mnist.s3-website.eu-central-1.amazonaws.com",
            materialise=_from_fashion_mnist,
            num_classes=10,
            num_images=70_000,
            # md5 of the published .gz files (from the dataset's README).
            files={
                "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
                "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
                "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
            },
            # Debian/Ubuntu package `dataset-fashion-mnist`: no network needed.
            local_dirs=("/usr/share/datasets/fashion-mnist",),
        ),
    )
}


def is_dataset_name(uri: str) -> bool:
    """True when ``uri`` is a registered dataset name and no local path of that name exists."""
    return uri.lower() in DATASETS and not os.path.exists(uri)


def default_dest(name: str, limit_per_class: int | None = None) -> Path:
    """``$VISIONTUNE_HOME/datasets/NAME`` (a limited copy gets its own folder)."""
    suffix = f"-limit{limit_per_class}" if limit_per_class else ""
    return uris.visiontune_home() / "datasets" / f"{name}{suffix}"


def fetch(
    name: str,
    dest: str | Path | None = None,
    limit_per_class: int | None = None,
    *,
    progress: bool = True,
) -> Path:
    """Fetch a named dataset once and return the root of its folder layout.

    Args:
        name: a key of :data:`DATASETS` (case-insensitive).
        dest: the folder to create; default ``$VISIONTUNE_HOME/datasets/NAME``.
        limit_per_class: keep at most N images per class in each split (seeded sample).
        progress: show a download progress bar.

    Raises:
        UserError: unknown name, a ``dest`` that holds something else, a failed or corrupt
            download (naming the URL and where to put the file by hand).
    """
    spec = DATASETS.get(name.lower())
    if spec is None:
        raise UserError(
            f"unknown dataset name {name!r}; known names: {', '.join(sorted(DATASETS))}"
        )
    if limit_per_class is not None and limit_per_class < 1:
        raise UserError(f"--limit-per-class must be at least 1, got {limit_per_class}")
    dest = Path(dest).expanduser() if dest else default_dest(spec.name, limit_per_class)
    marker = dest / MARKER
    wanted = {"dataset": spec.name, "limit_per_class": limit_per_class}
    if marker.exists():
        try:
            recorded = json.loads(marker.read_text())
            recorded.get("dataset")
        except (OSError, ValueError, AttributeError):
            # Written atomically, so damage is from elsewhere; dest may be the user's folder,
            # so it is not removed here.
            raise UserError(
                f"{marker} is damaged, so whether {dest} is complete is unknown; delete "
                f"{dest} and fetch again"
            ) from None
        if all(recorded.get(k) == v for k, v in wanted.items()):
            return dest / recorded.get("root", "")
        raise UserError(
            f"{dest} already holds {recorded.get('dataset')} (limit {recorded.get('limit_per_class')}); "
            "choose another --dest"
        )
    if dest.is_file():
        raise UserError(f"{dest} is a file; --dest must be a folder")
    if dest.exists() and any(dest.iterdir()):
        raise UserError(
            f"{dest} is not empty and holds no visiontune dataset; choose another --dest"
        )
    if dest.exists():
        dest.rmdir()

    # Build in a hidden sibling and rename at the end: a crash leaves no complete-looking dest.
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent))
    try:
        work = tmp / "data"
        root = spec.materialise(spec, work, limit_per_class, progress)
        rel_root = root.relative_to(work).as_posix() if root != work else ""
        from visiontune.io import atomic_write_json

        (work / MARKER).unlink(missing_ok=True)
        atomic_write_json(work / MARKER, {**wanted, "root": rel_root, "source": spec.url})
        os.replace(work, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest / rel_root


def resolve(uri: str, limit_per_class: int | None = None) -> str:
    """A dataset name becomes its local folder (fetched once); any other URI passes through.

    Raises:
        UserError: ``uri`` is a bare word that is neither an existing path nor a known name.
    """
    uri = str(uri)
    if is_dataset_name(uri):
        return str(fetch(uri, limit_per_class=limit_per_class))
    if uris.scheme_of(uri) == "" and not os.path.exists(uri) and os.sep not in uri.rstrip(os.sep):
        known = ", ".join(sorted(DATASETS))
        raise UserError(f"{uri!r} is neither an existing path nor a dataset name ({known})")
    return uri
