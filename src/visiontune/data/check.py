"""``visiontune data check``: what is in a dataset, and everything wrong with it.

Every image is read once: hashed (exact duplicates within a split, and across splits, which is
leakage) and decoded (unreadable, truncated, corrupt files and contents that do not match the
extension), never crashing on a bad file. Paths in the report are relative to the dataset root,
so the same data gives the same report on a local disk and on S3.
"""

from __future__ import annotations

import hashlib
import os
import statistics
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from visiontune import uri as uris
from visiontune.data import catalog
from visiontune.data.images import ImageDecodeError, decode_image, extension_matches
from visiontune.data.layout import Layout, scan
from visiontune.data.splits import CARVED_VALID_RATIO

IMBALANCE_WARNING_RATIO = 3.0  # largest class / smallest class above this is worth a look
RARE_FORMAT_FRACTION = 0.05  # a format this rare in a dataset is probably a placeholder/stray
_READ_BATCH = 64
_CHECK_DECODE_SIZE = 64  # JPEG draft decode still reads every byte, so truncation still shows


@dataclass
class Problem:
    """One thing wrong with a dataset.

    ``kind`` is one of: unreadable, extension_mismatch, empty_class, empty_split,
    missing_class, too_few_classes, duplicate, leakage, imbalance, non_image_file,
    stray_file, ignored_folder.
    """

    kind: str
    message: str
    path: str | None = None
    split: str | None = None
    class_id: str | None = None


@dataclass
class CheckReport:
    """The result of :func:`check_dataset`; ``problems`` empty means nothing to fix."""

    root: str
    layout: str
    classes: list[str]
    counts: dict[str, dict[str, int]]
    imbalance_ratio: dict[str, float | None]
    formats: dict[str, int]
    image_size: dict[str, dict[str, float]]
    duplicates: list[dict[str, Any]] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def total_images(self) -> int:
        return sum(sum(c.values()) for c in self.counts.values())

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (what ``--json`` prints)."""
        d = asdict(self)
        d["ok"] = self.ok
        d["total_images"] = self.total_images
        d["problem_counts"] = dict(Counter(p.kind for p in self.problems))
        return d


@dataclass
class _FileResult:
    rel: str
    split: str
    digest: str | None = None
    image_format: str | None = None
    size: tuple[int, int] | None = None
    error: str | None = None


def _read_all(layout: Layout, rels: list[str]) -> dict[str, bytes | Exception]:
    """Read many files; S3 reads go out concurrently through s3fs's async ``cat``."""
    paths = {layout.uri_of(r): r for r in rels}
    if uris.scheme_of(layout.root) == "s3":
        fs_paths = {p[len("s3://") :]: r for p, r in paths.items()}
        with uris.storage_errors(layout.root):
            data = layout.fs.cat(list(fs_paths), on_error="return")
        return {fs_paths[p]: v for p, v in data.items()}
    out: dict[str, bytes | Exception] = {}
    for path, rel in paths.items():
        try:
            with open(path, "rb") as f:
                out[rel] = f.read()
        except OSError as e:
            out[rel] = e
    return out


def _inspect(rel: str, split: str, data: bytes | Exception) -> _FileResult:
    result = _FileResult(rel=rel, split=split)
    if isinstance(data, Exception):
        mapped = uris.storage_error(data, rel)
        result.error = f"cannot read: {mapped or data}"
        return result
    try:
        _, result.image_format, result.size = decode_image(data, decode_size=_CHECK_DECODE_SIZE)
    except ImageDecodeError as e:
        result.error = e.reason
        return result
    result.digest = hashlib.sha256(data).hexdigest()
    return result


def _stats(values: list[int]) -> dict[str, float]:
    if not values:
        return {}
    return {
        "min": min(values),
        "median": float(statistics.median(values)),
        "mean": round(statistics.fmean(values), 1),
        "max": max(values),
    }


def check_dataset(
    uri: str,
    endpoint_url: str | None = None,
    *,
    workers: int | None = None,
    progress: bool = False,
) -> CheckReport:
    """Read every image of a dataset and report counts, problems and statistics.

    Args:
        uri: a dataset folder, ``s3://`` prefix, http(s) archive or dataset name.
        endpoint_url: S3-compatible endpoint.
        workers: decoding threads (default: CPU count).
        progress: show a progress bar on stderr.

    Returns:
        The :class:`CheckReport`; bad files are listed in it, never raised.

    Raises:
        UserError: when there is no dataset to check at all (missing path or bucket, empty
            folder, a file instead of a folder, wrong credentials, unknown name).
    """
    resolved = catalog.resolve(uri)
    layout = scan(resolved, endpoint_url=endpoint_url)
    report = CheckReport(
        root=resolved,
        layout=layout.kind,
        classes=[],
        counts={},
        imbalance_ratio={},
        formats={},
        image_size={},
    )
    split_name = {s: (s or "all") for s in layout.files}
    _note_missing_splits(report, layout)
    _check_structure(report, layout, split_name)
    _check_stray_files(report, layout)
    results = _inspect_images(layout, split_name, workers=workers, progress=progress)
    by_digest = _check_images(report, results)
    _check_duplicates(report, by_digest)
    _check_imbalance(report)
    _note_rare_formats(report, results)
    report.problems.sort(key=lambda p: (p.kind, p.path or "", p.message))
    return report


def _note_missing_splits(report: CheckReport, layout: Layout) -> None:
    """Say how training will split a dataset that lacks split folders or a valid split."""
    if layout.kind == "classes":
        report.notes.append(
            "no split folders: training splits the class folders stratified and seeded "
            "(default 80/10/10) and records the split in the run directory"
        )
    elif "valid" not in layout.files:
        report.notes.append(
            f"no valid split: training holds out {CARVED_VALID_RATIO:.0%} of each class of "
            "train for validation"
        )


def _check_structure(report: CheckReport, layout: Layout, split_name: dict[str, str]) -> None:
    """Classes and per-split counts; too few classes, empty splits, missing or empty classes."""
    problems = report.problems
    all_classes = sorted({c for classes in layout.files.values() for c in classes})
    report.classes = all_classes
    if len(all_classes) < 2:
        problems.append(
            Problem("too_few_classes", f"{len(all_classes)} class folder(s); a classifier needs 2+")
        )
    for split, classes in layout.files.items():
        name = split_name[split]
        report.counts[name] = {c: len(classes.get(c, [])) for c in sorted(classes)}
        if not classes:
            problems.append(
                Problem("empty_split", f"split {name} has no class folders", split=name)
            )
        for class_id in all_classes:
            if class_id not in classes and classes:
                problems.append(
                    Problem(
                        "missing_class",
                        f"class {class_id!r} is missing from split {name}",
                        split=name,
                        class_id=class_id,
                    )
                )
            elif class_id in classes and not classes[class_id]:
                problems.append(
                    Problem(
                        "empty_class",
                        f"class {class_id!r} in split {name} has no images",
                        split=name,
                        class_id=class_id,
                    )
                )


def _check_stray_files(report: CheckReport, layout: Layout) -> None:
    """Files and folders the layout scan passed over: non-images, strays, unknown splits."""
    problems = report.problems
    for rel in layout.non_images:
        problems.append(Problem("non_image_file", f"not an image file (by extension): {rel}", rel))
    for rel in layout.stray_files:
        problems.append(Problem("stray_file", f"file outside any class folder: {rel}", rel))
    for d in layout.ignored_dirs:
        problems.append(
            Problem("ignored_folder", f"folder {d}/ is not a split (train, valid/val, test)", d)
        )


def _inspect_images(
    layout: Layout, split_name: dict[str, str], *, workers: int | None, progress: bool
) -> list[_FileResult]:
    """Read, hash and decode every image, in batches (reads) over a thread pool (decodes)."""
    jobs = [
        (rel, split_name[split])
        for split, classes in layout.files.items()
        for images in classes.values()
        for rel in images
    ]
    results: list[_FileResult] = []
    with (
        ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 2) as pool,
        _progress_bar(len(jobs), progress) as advance,
    ):
        for start in range(0, len(jobs), _READ_BATCH):
            batch = jobs[start : start + _READ_BATCH]
            data = _read_all(layout, [rel for rel, _ in batch])
            results.extend(
                pool.map(_inspect, *zip(*[(r, s, data[r]) for r, s in batch], strict=True))
            )
            advance(len(batch))
    return results


def _check_images(report: CheckReport, results: list[_FileResult]) -> dict[str, list[_FileResult]]:
    """Unreadable files, extension mismatches, formats and sizes; returns images by digest."""
    problems = report.problems
    by_digest: dict[str, list[_FileResult]] = defaultdict(list)
    formats: Counter[str] = Counter()
    widths, heights = [], []
    for r in results:
        if r.error:
            problems.append(Problem("unreadable", f"{r.rel}: {r.error}", r.rel, r.split))
            continue
        formats[r.image_format] += 1
        widths.append(r.size[0])
        heights.append(r.size[1])
        by_digest[r.digest].append(r)
        if not extension_matches(r.rel, r.image_format):
            problems.append(
                Problem(
                    "extension_mismatch",
                    f"{r.rel}: the extension says {os.path.splitext(r.rel)[1]} but the "
                    f"content is {r.image_format}",
                    r.rel,
                    r.split,
                )
            )
    report.formats = dict(formats.most_common())
    report.image_size = {
        "width": _stats(widths),
        "height": _stats(heights),
        "shorter_side": _stats([min(w, h) for w, h in zip(widths, heights, strict=True)]),
    }
    return by_digest


def _check_duplicates(report: CheckReport, by_digest: dict[str, list[_FileResult]]) -> None:
    """Identical images: a duplicate within one split, leakage across splits."""
    for digest, group in by_digest.items():
        if len(group) < 2:
            continue
        splits = sorted({r.split for r in group})
        paths = sorted(r.rel for r in group)
        report.duplicates.append({"sha256": digest, "paths": paths, "splits": splits})
        if len(splits) > 1:
            report.problems.append(
                Problem(
                    "leakage",
                    f"the same image is in {' and '.join(splits)}: {', '.join(paths)}",
                    paths[0],
                )
            )
        else:
            report.problems.append(
                Problem(
                    "duplicate",
                    f"identical images in {splits[0]}: {', '.join(paths)}",
                    paths[0],
                    splits[0],
                )
            )
    report.duplicates.sort(key=lambda d: d["paths"])


def _check_imbalance(report: CheckReport) -> None:
    """Each split's largest/smallest class ratio; a problem above IMBALANCE_WARNING_RATIO."""
    for name, counts in report.counts.items():
        present = [n for n in counts.values() if n > 0]
        ratio = round(max(present) / min(present), 2) if present else None
        report.imbalance_ratio[name] = ratio
        if ratio is not None and ratio > IMBALANCE_WARNING_RATIO:
            biggest = max(counts, key=counts.get)
            smallest = min((c for c in counts if counts[c]), key=counts.get)
            report.problems.append(
                Problem(
                    "imbalance",
                    f"split {name} is imbalanced {ratio}:1 ({biggest} "
                    f"{counts[biggest]} vs {smallest} {counts[smallest]})",
                    split=name,
                )
            )


def _note_rare_formats(report: CheckReport, results: list[_FileResult]) -> None:
    """Note image formats rare enough in the dataset to be strays.

    A rare format in a dataset is often a placeholder (a "not found" GIF) rather than data:
    readable, so not a problem, but worth a look.
    """
    formats = Counter(r.image_format for r in results if not r.error)
    total = sum(formats.values())
    for fmt, n in formats.items():
        if total and n / total < RARE_FORMAT_FRACTION and len(formats) > 1:
            examples = sorted(r.rel for r in results if r.image_format == fmt)[:5]
            report.notes.append(
                f"{n} {fmt} file(s) among {total} images, worth a look (placeholder?): "
                + ", ".join(examples)
            )


def _progress_bar(total: int, enabled: bool):
    import contextlib

    if not enabled:
        return contextlib.nullcontext(lambda n: None)
    from rich.console import Console
    from rich.progress import Progress

    @contextlib.contextmanager
    def bar():
        with Progress(console=Console(stderr=True), transient=True) as p:
            task = p.add_task("checking images", total=total)
            yield lambda n: p.advance(task, n)

    return bar()
