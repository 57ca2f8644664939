"""Evaluation and local prediction, from a model directory alone.

``evaluate`` computes top-1/top-5 accuracy, per-class precision/recall/F1 and the confusion
matrix on a split of a dataset; ``predict`` labels image files. Both need only ``RUN/model``:
the architecture, classes and preprocessing come from ``model.json``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
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
) -> dict[str, Any]:
    """Evaluate a model directory on one split of a dataset.

    Classes are matched by id: the dataset's class folders must be the model's classes.
    """
    from visiontune.data.folder import ImageDataset, collate_skip_bad, discover
    from visiontune.data.transforms import eval_transform
    from visiontune.models.artifact import load_model_dir

    dev = resolve_device(device)
    loaded = load_model_dir(model_dir, dev)
    index = discover(data, endpoint_url=endpoint_url, record_dir=None)
    split = {"val": "valid", "validation": "valid"}.get(split, split)  # folder-name aliases
    if split not in index.splits:
        raise UserError(
            f"dataset {data} has no {split!r} split (it has: {', '.join(sorted(index.splits))})"
        )
    model_ids = loaded.class_ids
    if sorted(index.class_ids) != sorted(model_ids):
        missing = sorted(set(index.class_ids) - set(model_ids))[:5]
        raise UserError(
            f"the dataset's classes do not match the model's ({len(index.class_ids)} vs "
            f"{len(model_ids)}; unknown to the model: {', '.join(missing) or '-'})"
        )
    # Dataset labels index its own sorted class ids; remap to the model's order.
    remap = torch.tensor([model_ids.index(cid) for cid in index.class_ids])
    ds = ImageDataset(
        index, split, eval_transform(loaded.preprocess), decode_size=loaded.preprocess.resize_size
    )
    loader = DataLoader(
        ds,
        batch_size=batch_size,
        num_workers=default_workers() if workers is None else workers,
        collate_fn=collate_skip_bad,
    )
    logits, labels, n_bad = collect_logits(
        loaded.model, loader, dev, autocast_dtype(dev, precision)
    )
    metrics = classification_metrics(logits, remap[labels], loaded.class_names)
    metrics.update({"split": split, "bad_images": n_bad, "model": str(model_dir)})
    return metrics


def predict(
    images: Sequence[str],
    model_dir: str | os.PathLike,
    *,
    top_k: int = 5,
    device: str = "auto",
    precision: str = "auto",
) -> list[dict[str, Any]]:
    """Label image files with a model directory: one ``{image, predictions | error}`` each."""
    from visiontune.data.folder import load_image
    from visiontune.inference import preprocess_batch, topk
    from visiontune.models.artifact import load_model_dir

    dev = resolve_device(device)
    loaded = load_model_dir(model_dir, dev)
    amp = autocast_dtype(dev, precision)
    results: list[dict[str, Any]] = []
    for path in images:
        if not Path(path).is_file():
            results.append({"image": path, "error": "file not found"})
            continue
        try:
            im = load_image(path, decode_size=loaded.preprocess.resize_size)
        except Exception as e:  # an undecodable file is reported, never a crash
            results.append({"image": path, "error": f"cannot decode image: {e}"})
            continue
        x = preprocess_batch([im], loaded.preprocess).to(dev)
        with torch.inference_mode(), autocast(dev, amp):
            probs = loaded.model(x.contiguous(memory_format=torch.channels_last)).float()
        probs = probs.softmax(1).cpu()
        preds = topk(probs, loaded.class_ids, loaded.class_names, top_k)[0]
        results.append({"image": path, "predictions": preds})
    return results
