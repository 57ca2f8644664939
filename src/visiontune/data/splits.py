"""The split policy, in one place: split names, ratios, the seeded split and its record.

Everything that decides which image lands in which split lives here, and train, tune,
evaluate and ``data check`` all call it:

- :data:`SPLIT_ALIASES` / :func:`canonical_split`: ``val`` and ``validation`` mean ``valid``;
- :func:`split_ratio_error` / :func:`check_ratios`: what a valid ``split_ratios`` is;
- :func:`split_stratified`: the seeded per-class split of a root of class folders;
- :func:`recorded_split`: that split written once to ``split.json`` in the run directory,
  reused afterwards and checked against the data (files gone or new, files whose class
  changed);
- :func:`resolve_splits`: the splits a run trains on, with ``valid`` carved out of ``train``
  when the dataset has none;
- :func:`pooled_splits`: train+valid pooled for cross-validation (stratified, seeded folds)
  or for a refit on both; the test split is never pooled;
- :func:`find_split_record` / :func:`export_split_record`: the record travels with the model,
  so ``evaluate`` sees the split that training used.

This module is the lowest of the data package: it imports nothing from it.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from visiontune.errors import UserError

# Folder or option name (lower case) -> canonical split name.
SPLIT_ALIASES = {
    "train": "train",
    "valid": "valid",
    "val": "valid",
    "validation": "valid",
    "test": "test",
}
SPLIT_ORDER = ("train", "valid", "test")
SPLIT_FILE = "split.json"
SPLIT_FILE_VERSION = 1
# Share of each class of ``train`` held out for validation when a dataset has no valid split.
CARVED_VALID_RATIO = 0.1

# split -> class id -> file paths relative to the dataset root
SplitFiles = dict[str, dict[str, list[str]]]
# split -> [(uri, label)]
SplitItems = dict[str, list[tuple[str, int]]]


def canonical_split(name: str) -> str:
    """``val``/``validation``/``VALID`` -> ``valid``; an unknown name is returned unchanged."""
    return SPLIT_ALIASES.get(name.lower(), name)


def split_ratio_error(ratios: Sequence[float]) -> str | None:
    """Why ``ratios`` is not a valid train/valid/test split, or ``None`` when it is.

    Valid: 2 or 3 non-negative numbers, train > 0, adding up to 1 (a missing test ratio is 0).
    Shared by the config validator and :func:`check_ratios` so both say the same thing.
    """
    try:
        values = [float(r) for r in ratios]
    except (TypeError, ValueError):
        values = []
    if (
        len(values) not in (2, 3)
        or any(math.isnan(r) or r < 0 for r in values)
        or values[0] <= 0
        or abs(sum(values) - 1.0) > 1e-6
    ):
        return (
            f"split ratios {list(ratios)} must be 2 or 3 non-negative numbers "
            "(train > 0) adding up to 1, e.g. 0.8,0.1,0.1"
        )
    return None


def check_ratios(ratios: Sequence[float]) -> tuple[float, float, float]:
    """``ratios`` as a ``(train, valid, test)`` triple.

    Raises:
        UserError: the ratios are not valid (see :func:`split_ratio_error`).
    """
    problem = split_ratio_error(ratios)
    if problem:
        raise UserError(problem)
    values = tuple(float(r) for r in ratios)
    return (*values, 0.0) if len(values) == 2 else values  # type: ignore[return-value]


def split_stratified(files: dict[str, list[str]], ratios: Sequence[float], seed: int) -> SplitFiles:
    """Split each class's files into train/valid/test with a seeded shuffle.

    The shuffle of a class depends only on the seed, the class id and its file names, so
    adding a class does not reshuffle the others. Every class keeps at least one training
    image, and a class with 3+ images gets at least one in each split with a non-zero ratio.
    """
    _, valid_r, test_r = check_ratios(ratios)
    out: SplitFiles = {s: {} for s in SPLIT_ORDER}
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


def _read_record(path: Path) -> SplitFiles:
    try:
        recorded = json.loads(path.read_text())
        return {s: {c: list(r) for c, r in cls.items()} for s, cls in recorded["splits"].items()}
    except (OSError, json.JSONDecodeError, KeyError, AttributeError, TypeError) as e:
        raise UserError(
            f"{path} is not a valid split record ({e}); delete it to re-split"
        ) from None


def _record_problem(recorded: SplitFiles, files: dict[str, list[str]]) -> str | None:
    """What differs between a recorded split and the class folders on disk, in one phrase."""
    class_of = {rel: class_id for class_id, rels in files.items() for rel in rels}
    listed: dict[str, str] = {}
    mislabelled = []
    for classes in recorded.values():
        for class_id, rels in classes.items():
            for rel in rels:
                listed[rel] = class_id
                actual = class_of.get(rel)
                if actual is not None and actual != class_id:
                    mislabelled.append(f"{rel} is in {actual}/ but recorded as {class_id}")
    gone = sorted(set(listed) - set(class_of))
    new = sorted(set(class_of) - set(listed))
    # A file that left one class folder for another shows up as one gone and one new file
    # with the same name: say so, since it means a label changed.
    new_by_name = {os.path.basename(rel): rel for rel in new}
    moved = [
        f"{rel} moved to {new_by_name[os.path.basename(rel)]}"
        for rel in gone
        if os.path.basename(rel) in new_by_name
    ]
    parts = []
    if mislabelled:
        parts.append(f"{len(mislabelled)} file(s) under the wrong class ({mislabelled[0]})")
    if moved:
        parts.append(f"{len(moved)} file(s) changed class ({moved[0]})")
    if len(gone) > len(moved):
        parts.append(f"{len(gone) - len(moved)} file(s) gone ({gone[0]})")
    if len(new) > len(moved):
        parts.append(f"{len(new) - len(moved)} new file(s) ({new[0]})")
    return "; ".join(parts) or None


def check_recorded_settings(
    record_dir: str | os.PathLike, ratios: Sequence[float], seed: int
) -> None:
    """Refuse a ``split.json`` in ``record_dir`` made with another seed or other ratios.

    A training run reads back the split recorded in its directory (see :func:`recorded_split`,
    which trusts the record over the seed, as evaluate needs); one that asks for another seed
    or other ratios would train on the recorded split while its config.yaml says otherwise.
    A record that does not say (made by hand) is not checked.

    Raises:
        UserError: the record was made with another ``split_seed`` or ``split_ratios``.
    """
    path = Path(record_dir) / SPLIT_FILE
    try:
        recorded = json.loads(path.read_text())
        r_seed, r_ratios = recorded.get("seed"), recorded.get("ratios")
        r_ratios = None if r_ratios is None else check_ratios(r_ratios)
    except (OSError, ValueError, AttributeError, TypeError, UserError):
        return  # none, or unreadable: recorded_split says what is wrong with it
    asked = check_ratios(ratios)
    parts = []
    if r_seed is not None and r_seed != seed:
        parts.append(f"split_seed {r_seed} (this run: {seed})")
    if r_ratios is not None and any(
        abs(a - b) > 1e-9 for a, b in zip(r_ratios, asked, strict=True)
    ):
        parts.append(f"split_ratios {list(r_ratios)} (this run: {list(asked)})")
    if parts:
        raise UserError(
            f"{path} records a split made with {' and '.join(parts)}; delete it to split "
            "again, or ask for the recorded split_seed/split_ratios"
        )


def recorded_split(
    root: str,
    files: dict[str, list[str]],
    ratios: Sequence[float],
    seed: int,
    record_dir: str | os.PathLike | None,
) -> SplitFiles:
    """Split a root of class folders, reusing ``record_dir/split.json`` when it exists.

    The first call writes the record (atomically); later calls (resume, evaluate, a tuning
    trial) read it back and check it against the data: every listed file must still exist
    in the class folder it is recorded under, and no new file may have appeared.

    Args:
        root: the dataset root, for messages and the record.
        files: class id -> image paths relative to the root (``class_id/name.jpg``).
        ratios: train/valid/test ratios for a new split.
        seed: seed of a new split.
        record_dir: where ``split.json`` is read from or written to; ``None`` neither reads
            nor writes.

    Raises:
        UserError: the record is unreadable or does not match the data (says what differs).
    """
    path = Path(record_dir) / SPLIT_FILE if record_dir is not None else None
    if path is not None and path.exists():
        splits = _read_record(path)
        problem = _record_problem(splits, files)
        if problem:
            raise UserError(
                f"{root} changed since its split was recorded in {path}: {problem}; "
                f"delete {path} to split again"
            )
        return splits
    splits = split_stratified(files, ratios, seed)
    if path is not None:
        from visiontune.io import atomic_write_json

        atomic_write_json(
            path,
            {
                "version": SPLIT_FILE_VERSION,
                "root": root,
                "seed": seed,
                "ratios": list(check_ratios(ratios)),
                "splits": splits,
            },
        )
    return splits


def limit_per_class(splits: SplitFiles, limit: int | None, seed: int) -> SplitFiles:
    """Keep at most ``limit`` files per class in each split (a seeded sample, not the first N)."""
    if limit is None:
        return splits
    if limit < 1:
        raise UserError(f"limit_per_class must be at least 1, got {limit}")
    out: SplitFiles = {}
    for split, classes in splits.items():
        out[split] = {}
        for class_id, items in classes.items():
            if len(items) > limit:
                # Names often sort by date or source, so the first N would be a biased sample.
                items = sorted(
                    random.Random(f"{seed}/limit/{split}/{class_id}").sample(items, limit)
                )
            out[split][class_id] = items
    return out


def carve_valid(
    train: list[tuple[str, int]], seed: int, ratio: float = CARVED_VALID_RATIO
) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """Hold out ``ratio`` of each class of ``train`` (at least one image, when it has 2+).

    Returns:
        ``(train, valid)``.
    """
    rng = random.Random(seed)
    by_class: dict[int, list[tuple[str, int]]] = {}
    for item in train:
        by_class.setdefault(item[1], []).append(item)
    keep: list[tuple[str, int]] = []
    held: list[tuple[str, int]] = []
    for label in sorted(by_class):
        items = sorted(by_class[label])
        rng.shuffle(items)
        k = max(1, round(len(items) * ratio)) if len(items) > 1 else 0
        held += items[:k]
        keep += items[k:]
    return keep, held


def resolve_splits(index: Any, seed: int, *, announce: bool = True) -> SplitItems:
    """The splits a run uses: the dataset's own, with ``valid`` carved out of ``train``
    when the dataset has no valid split.

    train, tune (its batch-size check) and evaluate all call this, so the hold-out is
    derived once, the same way everywhere.

    Args:
        index: a :class:`~visiontune.data.folder.DatasetIndex` (anything with ``splits``).
        seed: the run's ``split_seed``.
        announce: print the one-line note about the hold-out on stderr (the training run
            says it; checks that only count images stay quiet).

    Raises:
        UserError: the dataset has no training images.
    """
    splits = dict(index.splits)
    if not splits.get("train"):
        raise UserError(f"{index.root} has no training images (expected a train/ split)")
    if not splits.get("valid"):
        splits["train"], splits["valid"] = carve_valid(splits["train"], seed)
        if announce:
            print(
                f"note: no valid split; holding out {len(splits['valid'])} training images "
                "for validation",
                file=sys.stderr,
            )
    return splits


# The pool of a cross-validated (or refit) run, under this split name: its features are cached
# once under the pool's content and every fold indexes into them.
POOL = "pool"


def cv_pool(splits: SplitItems) -> list[tuple[str, int]]:
    """train + valid pooled, in one canonical order (the order the pool's features are in)."""
    return sorted([*splits.get("train", []), *splits.get("valid", [])])


def fewest_per_class(items: Sequence[tuple[str, int]]) -> int:
    """The image count of the smallest class among ``items`` (0 for none)."""
    counts: dict[int, int] = {}
    for _, label in items:
        counts[label] = counts.get(label, 0) + 1
    return min(counts.values(), default=0)


def assign_folds(
    pool: Sequence[tuple[str, int]], k: int, seed: int, class_names: Sequence[str] = ()
) -> list[int]:
    """The fold (0..k-1) of each pool item: stratified and seeded.

    Each class is shuffled by (seed, class) and dealt round-robin, starting where the previous
    class stopped, so every fold holds ``n_c // k`` or one more images of each class and the
    folds differ in size by at most one image.

    Raises:
        UserError: a class has fewer than ``k`` images (some fold would lack it).
    """
    by_class: dict[int, list[int]] = {}
    for i, (_, label) in enumerate(pool):
        by_class.setdefault(label, []).append(i)
    smallest = min(by_class, key=lambda c: len(by_class[c]), default=None)
    if smallest is None or len(by_class[smallest]) < k:
        have = len(by_class[smallest]) if smallest is not None else 0
        if smallest is not None and smallest < len(class_names):
            smallest = class_names[smallest]
        raise UserError(
            f"{k}-fold cross-validation needs at least {k} images of each class in train+valid; "
            f"class {smallest} has {have}: use fewer folds"
        )
    folds = [0] * len(pool)
    offset = 0
    for label in sorted(by_class):
        members = list(by_class[label])  # pool order: sorted by path
        random.Random(f"{seed}/cv/{label}").shuffle(members)
        for j, i in enumerate(members):
            folds[i] = (offset + j) % k
        offset += len(members)
    return folds


def pooled_splits(
    splits: SplitItems,
    seed: int,
    folds: int | None = None,
    fold: int | None = None,
    class_names: Sequence[str] = (),
) -> tuple[SplitItems, dict[str, list[int]]]:
    """train+valid pooled: for fold ``fold`` of ``folds`` (cross-validation), or all of it for
    training (a refit, ``folds=None``: no held-out valid).

    Returns:
        ``(splits, rows)``: the splits with ``train`` and ``valid`` drawn from the pool (kept
        under :data:`POOL`; ``test`` unchanged), and for ``train``/``valid`` the rows of the
        pool they are.
    """
    pool = cv_pool(splits)
    if folds is None:
        rows = {"train": list(range(len(pool))), "valid": []}
    else:
        which = assign_folds(pool, folds, seed, class_names)
        rows = {
            "train": [i for i, f in enumerate(which) if f != fold],
            "valid": [i for i, f in enumerate(which) if f == fold],
        }
    out = dict(splits)
    out[POOL] = pool
    for name, idx in rows.items():
        out[name] = [pool[i] for i in idx]
    return out, rows


def find_split_record(model_dir: str | os.PathLike) -> Path | None:
    """The ``split.json`` recorded for a model: in the model directory, else in its run.

    A model directory exported by training sits in ``RUN/model``, next to ``RUN/split.json``;
    one copied elsewhere carries its own copy (see :func:`export_split_record`).
    """
    model_dir = Path(model_dir)
    for candidate in (model_dir / SPLIT_FILE, model_dir.parent / SPLIT_FILE):
        if candidate.is_file():
            return candidate
    return None


def export_split_record(run_dir: str | os.PathLike, model_dir: str | os.PathLike) -> Path | None:
    """Copy ``RUN/split.json`` into the model directory, so the model alone knows its split.

    Returns:
        The copy, or ``None`` when the run recorded no split (a dataset with split folders).
    """
    source = Path(run_dir) / SPLIT_FILE
    if not source.is_file():
        return None
    from visiontune.io import atomic_write_bytes

    target = Path(model_dir) / SPLIT_FILE
    atomic_write_bytes(target, source.read_bytes())
    return target
