"""Evaluation and local prediction, from a model directory alone.

``evaluate`` computes top-1/top-5 accuracy, per-class precision/recall/F1 and the confusion
matrix on a split of a dataset; ``predict`` labels image files. Both need only ``RUN/model``:
the architecture, classes and preprocessing come from ``model.json``.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from visiontune.device import autocast, autocast_dtype, default_workers, resolve_device
from visiontune.errors import UserError


def classification_metrics(
    logits: torch.Tensor, targets: torch.Tensor, class_names: Sequence[str]
) -> dict[str, Any]:
    """Top-1/top-5 accuracy, loss, per-class precision/recall/F1 and the confusion matrix.

    Args:
        logits: ``(N, C)`` scores.
        targets: ``(N,)`` class indices.
        class_names: display names, index = class.
    """
    n, c = logits.shape[0], len(class_names)
    if n == 0:
        return {"count": 0}
    logits = logits.float()
    loss = torch.nn.functional.cross_entropy(logits, targets).item()
    pred = logits.argmax(1)
    k = min(5, c)
    top5 = (logits.topk(k, dim=1).indices == targets[:, None]).any(1).float().mean().item()
    cm = torch.zeros(c, c, dtype=torch.long)
    cm.index_put_((targets, pred), torch.ones_like(targets), accumulate=True)
    tp = cm.diag().float()
    support = cm.sum(1).float()
    predicted = cm.sum(0).float()
    precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), torch.zeros_like(tp))
    recall = torch.where(support > 0, tp / support.clamp(min=1), torch.zeros_like(tp))
    f1 = torch.where(
        precision + recall > 0, 2 * precision * recall / (precision + recall), torch.zeros_like(tp)
    )
    present = support > 0
    return {
        "count": n,
        "loss": loss,
        "accuracy": (pred == targets).float().mean().item(),
        "top5": top5,
        "macro_f1": f1[present].mean().item() if present.any() else 0.0,
        "per_class": {
            name: {
                "precision": round(precision[i].item(), 6),
                "recall": round(recall[i].item(), 6),
                "f1": round(f1[i].item(), 6),
                "support": int(support[i].item()),
            }
            for i, name in enumerate(class_names)
        },
        "confusion_matrix": cm.tolist(),
    }


@torch.inference_mode()
def collect_logits(
    model: torch.nn.Module,
    batches: Iterable,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    channels_last: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Run ``model`` over ``(inputs, labels, n_bad)`` batches; return logits, labels, bad count."""
    model.eval()
    out, labels, n_bad = [], [], 0
    for inputs, targets, bad in batches:
        n_bad += bad
        if inputs.numel() == 0:
            continue
        inputs = inputs.to(device, non_blocking=True)
        if channels_last and inputs.dim() == 4:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp_dtype):
            logits = model(inputs)
        out.append(logits.float().cpu())
        labels.append(targets)
    if not out:
        return torch.empty(0, 0), torch.empty(0, dtype=torch.long), n_bad
    return torch.cat(out), torch.cat(labels), n_bad


def _same_dataset(a: str | None, b: str | None) -> bool:
    """Whether two dataset URIs (or names) point at the same data."""
    if not a or not b:
        return False
    if os.path.exists(a) and os.path.exists(b):
        return os.path.realpath(a) == os.path.realpath(b)
    return str(a).rstrip("/") == str(b).rstrip("/")


@dataclass
class EvaluationSplit:
    """The images ``evaluate`` runs on, and where their split came from.

    Attributes:
        index: the dataset index (classes, storage options).
        split: the canonical split name.
        items: ``[(uri, label)]`` of that split, labels indexing ``index.class_ids``.
        source: one phrase for people: the ``split.json`` used, the seeded split, or the
            dataset's own split folders.
    """

    index: Any
    split: str
    items: list[tuple[str, int]]
    source: str


def evaluation_split(
    meta: dict[str, Any],
    model_dir: str | os.PathLike,
    data: str,
    split: str = "test",
    *,
    endpoint_url: str | None = None,
) -> EvaluationSplit:
    """The images of ``split`` exactly as the model's training run split them.

    On a root of class folders the split is the one recorded with the model (``split.json``
    in the model directory or in its run directory), else the seeded split its training
    config describes (``split_seed``, ``split_ratios``, ``limit_per_class``); a ``valid``
    split carved out of ``train`` is carved the same way training did.

    Args:
        meta: the model's ``model.json``.
        model_dir: the model directory.
        data: the dataset to evaluate on.
        split: ``train``, ``valid`` (or ``val``/``validation``) or ``test``.
        endpoint_url: S3-compatible endpoint.

    Raises:
        UserError: the dataset has no such split, or does not match the recorded split.
    """
    from visiontune.data.folder import discover
    from visiontune.data.splits import canonical_split, find_split_record, resolve_splits

    cfg = meta.get("config") or {}
    seed = int(cfg.get("split_seed", 0))
    ratios = cfg.get("split_ratios") or (0.8, 0.1, 0.1)
    record = find_split_record(model_dir)
    same = _same_dataset(data, cfg.get("data"))
    if record is not None and not same:
        try:
            same = _same_dataset(data, json.loads(record.read_text()).get("root"))
        except (OSError, ValueError, AttributeError):
            same = False
    use_record = record if same else None
    index = discover(
        data,
        endpoint_url=endpoint_url,
        split_ratios=ratios,
        split_seed=seed,
        # Only an existing record is passed: discover writes one where there is none.
        record_dir=use_record.parent if use_record is not None else None,
        limit_per_class=cfg.get("limit_per_class") if same else None,
    )
    split = canonical_split(split)
    splits = dict(index.splits)
    carved = not splits.get("valid") and bool(splits.get("train"))
    if carved:
        # Training held valid out of train: both are evaluated as training saw them.
        splits = resolve_splits(index, seed, announce=False)
    if not splits.get(split):
        raise UserError(
            f"dataset {data} has no {split!r} split (it has: {', '.join(sorted(splits))})"
        )
    if use_record is not None and index.layout == "classes":
        source = f"recorded in {use_record}"
    elif index.layout == "classes":
        source = f"split_seed {seed} and split_ratios {list(ratios)} of the training config"
    else:
        source = "the dataset's split folders"
    if carved and split in ("train", "valid"):
        source += f"; valid held out of train with split_seed {seed}, as training did"
    return EvaluationSplit(index, split, splits[split], source)


def evaluate(
    model_dir: str | os.PathLike,
    data: str,
    split: str = "test",
    *,
    endpoint_url: str | None = None,
    batch_size: int = 64,
    device: str = "auto",
    precision: str = "auto",
    workers: int | None = None,
    progress: bool | None = None,
    tta: int = 0,
) -> dict[str, Any]:
    """Evaluate a model directory on one split of a dataset, the split its training used.

    Classes are matched by id: the dataset's class folders must be the model's classes.

    Args:
        model_dir: ``RUN/model`` or a copy of it.
        data: dataset folder, ``s3://`` prefix or name.
        split: ``test``, ``valid`` (``val``) or ``train``; on a root of class folders, the
            split recorded with the model (see :func:`evaluation_split`).
        endpoint_url: S3-compatible endpoint.
        batch_size: images per forward pass.
        device: ``auto``, ``cpu`` or ``cuda``.
        precision: ``auto``, ``fp32``, ``bf16`` or ``fp16``.
        workers: DataLoader workers (default: from the CPU count).
        progress: show a progress bar on stderr; default when stderr is a terminal or
            ``VISIONTUNE_PROGRESS=1``.
        tta: test-time augmentation views per image (0: off; 2: the image and its mirror;
            see :mod:`visiontune.tta`). The metrics are those of the averaged probabilities.

    Returns:
        The metrics of :func:`classification_metrics` plus ``split``, ``split_source``,
        ``top_confusions``, ``bad_images``, ``model`` and ``tta``: ``None``, or
        ``{"views", "names", "single_view"}`` where ``single_view`` holds the accuracy, top-5,
        loss and macro F1 of the plain image alone, measured in the same pass.

    Raises:
        UserError: a bad model directory, dataset or split, or classes that differ.
    """
    from visiontune.data.folder import ImageDataset, collate_skip_bad
    from visiontune.data.transforms import eval_transform
    from visiontune.models.artifact import load_model_dir
    from visiontune.tta import TTAModel, check_views, describe

    check_views(tta)
    dev = resolve_device(device)
    loaded = load_model_dir(model_dir, dev)
    chosen = evaluation_split(loaded.meta, model_dir, data, split, endpoint_url=endpoint_url)
    index = chosen.index
    model_ids = loaded.class_ids
    if sorted(index.class_ids) != sorted(model_ids):
        missing = sorted(set(index.class_ids) - set(model_ids))[:5]
        raise UserError(
            f"the dataset's classes do not match the model's ({len(index.class_ids)} vs "
            f"{len(model_ids)}; unknown to the model: {', '.join(missing) or '-'})"
        )
    # Dataset labels index its own sorted class ids; remap to the model's order.
    remap = torch.tensor([model_ids.index(cid) for cid in index.class_ids])
    view = replace(index, splits={chosen.split: chosen.items})
    ds = ImageDataset(
        view,
        chosen.split,
        eval_transform(loaded.preprocess),
        decode_size=loaded.preprocess.resize_size,
    )
    loader = DataLoader(
        ds,
        # With TTA each image is `tta` rows: the forward pass stays about batch_size rows.
        batch_size=max(1, batch_size // tta) if tta else batch_size,
        num_workers=default_workers() if workers is None else workers,
        collate_fn=collate_skip_bad,
    )
    model = loaded.model
    if tta:
        model = TTAModel(model, tta, loaded.preprocess, keep_single_view=True)
    with _progress_bar(len(loader), f"evaluating {chosen.split}", progress) as advance:
        logits, labels, n_bad = collect_logits(
            model, _advancing(loader, advance), dev, autocast_dtype(dev, precision)
        )
    metrics = classification_metrics(logits, remap[labels], loaded.class_names)
    tta_record = describe(tta)
    if tta_record is not None and len(labels):
        single = classification_metrics(
            torch.cat(model.single_view_logits), remap[labels], loaded.class_names
        )
        tta_record["single_view"] = {k: single[k] for k in ("accuracy", "top5", "loss", "macro_f1")}
    metrics.update(
        {
            "split": chosen.split,
            "split_source": chosen.source,
            "top_confusions": top_confusions(metrics, loaded.class_names),
            "bad_images": n_bad,
            "model": str(model_dir),
            "tta": tta_record,
        }
    )
    return metrics


def top_confusions(
    metrics: dict[str, Any], class_names: Sequence[str], n: int = 5
) -> list[dict[str, Any]]:
    """The ``n`` most frequent mistakes: ``{true, predicted, count}``, most frequent first."""
    cm = metrics.get("confusion_matrix") or []
    pairs = [
        (count, i, j)
        for i, row in enumerate(cm)
        for j, count in enumerate(row)
        if i != j and count > 0
    ]
    pairs.sort(key=lambda p: (-p[0], p[1], p[2]))
    return [
        {"true": class_names[i], "predicted": class_names[j], "count": count}
        for count, i, j in pairs[:n]
    ]


def progress_enabled(progress: bool | None = None) -> bool:
    """Progress bars go to stderr when it is a terminal, or when ``VISIONTUNE_PROGRESS=1``."""
    if progress is not None:
        return progress
    return sys.stderr.isatty() or os.environ.get("VISIONTUNE_PROGRESS") == "1"


def _progress_bar(total: int, label: str, progress: bool | None):
    import contextlib

    if not progress_enabled(progress):
        return contextlib.nullcontext(lambda n: None)

    @contextlib.contextmanager
    def bar():
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        columns = (
            TextColumn(label),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("batches"),
            TimeRemainingColumn(),
        )
        # VISIONTUNE_PROGRESS=1 asks for the bar where stderr is not a terminal (a CI log).
        console = Console(stderr=True, force_terminal=True if progress is None else None)
        with Progress(*columns, console=console, transient=True) as p:
            task = p.add_task(label, total=total)
            yield lambda n: p.advance(task, n)

    return bar()


def _advancing(batches: Iterable, advance) -> Iterator:
    for batch in batches:
        yield batch
        advance(1)


class Predictor:
    """A model directory loaded once, for labelling images from Python.

    Example:
        >>> predictor = Predictor("runs/first/model")
        >>> predictor.predict(["photo.jpg"])
        ['bee']

    Args:
        model_dir: ``RUN/model`` (or a copy of it): weights, classes and preprocessing.
        device: ``auto``, ``cpu`` or ``cuda``.
        precision: ``auto``, ``fp32``, ``bf16`` or ``fp16``.
        tta: test-time augmentation views per image (0: off; 2: the image and its mirror);
            probabilities are averaged over the views.
    """

    def __init__(
        self,
        model_dir: str | os.PathLike,
        *,
        device: str = "auto",
        precision: str = "auto",
        tta: int = 0,
    ):
        from visiontune.models.artifact import load_model_dir
        from visiontune.tta import check_views

        self.tta = check_views(tta)
        self.device = resolve_device(device)
        self.loaded = load_model_dir(model_dir, self.device)
        self._amp = autocast_dtype(self.device, precision)

    @property
    def class_names(self) -> list[str]:
        """Display names, in the order of the probability columns."""
        return self.loaded.class_names

    def _images(self, images: Sequence[Any]) -> list[Any]:
        from PIL import Image

        from visiontune.data.images import load_image

        if isinstance(images, (str, bytes, os.PathLike, Image.Image)):
            images = [images]  # one image, not a sequence of characters
        size = self.loaded.preprocess.resize_size
        return [
            im.convert("RGB") if isinstance(im, Image.Image) else load_image(im, size)
            for im in images
        ]

    def predict_proba(self, images: Sequence[Any]) -> torch.Tensor:
        """Class probabilities, ``(N, C)``, for image paths, encoded bytes or PIL images.

        Raises:
            FileNotFoundError: a path does not exist.
            visiontune.data.images.ImageDecodeError: an image cannot be decoded.
        """
        from visiontune import tta
        from visiontune.inference import preprocess_batch

        batch = self._images(images)
        if not batch:
            return torch.empty(0, len(self.class_names))
        x = preprocess_batch(batch, self.loaded.preprocess)
        return tta.predict_proba(self._probabilities, x, self.tta, self.loaded.preprocess)

    def _probabilities(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), autocast(self.device, self._amp):
            logits = self.loaded.model(x)
        return logits.float().softmax(1).cpu()

    def predict(self, images: Sequence[Any]) -> list[str]:
        """The most likely label of each image (paths, encoded bytes or PIL images)."""
        probs = self.predict_proba(images)
        return [self.class_names[i] for i in probs.argmax(1).tolist()]

    def top_k(self, images: Sequence[Any], k: int = 5) -> list[list[dict[str, Any]]]:
        """Per image, the ``k`` most likely classes as ``{label, class_id, probability}``."""
        from visiontune.inference import topk

        probs = self.predict_proba(images)
        return topk(probs, self.loaded.class_ids, self.class_names, k)


def predict(
    images: Sequence[str],
    model_dir: str | os.PathLike,
    *,
    top_k: int = 5,
    device: str = "auto",
    precision: str = "auto",
    tta: int = 0,
) -> list[dict[str, Any]]:
    """Label image files with a model directory: one ``{image, predictions | error}`` each.

    With ``tta`` views (see :mod:`visiontune.tta`) each answer also holds
    ``"tta": {"views", "names"}``.

    Raises:
        UserError: ``top_k`` is below 1, or an image path is a folder (use ``transform``).
    """
    from visiontune.data.images import ImageDecodeError

    if top_k < 1:
        raise UserError(f"top_k must be at least 1, got {top_k}")
    folders = [p for p in images if Path(p).is_dir()]
    if folders:
        raise UserError(
            f"{folders[0]} is a folder; predict labels image files. To label every image in "
            f"it: visiontune transform {model_dir} --input {folders[0]} --output PREDICTIONS"
        )
    from visiontune.tta import describe

    predictor = Predictor(model_dir, device=device, precision=precision, tta=tta)
    tta_record = describe(tta)
    results: list[dict[str, Any]] = []
    for path in images:
        if not Path(path).is_file():
            results.append({"image": path, "error": "file not found"})
            continue
        try:
            preds = predictor.top_k([path], top_k)[0]
        except (ImageDecodeError, OSError) as e:  # an undecodable file is reported, not a crash
            results.append({"image": path, "error": f"cannot decode image: {e}"})
            continue
        results.append(
            {"image": path, "predictions": preds, **({"tta": tta_record} if tta_record else {})}
        )
    return results
