"""Turning images into predictions: shared by ``predict``, ``evaluate``, serving and transform."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from visiontune.data.transforms import Preprocess, eval_transform


def preprocess_batch(images: Sequence[Image.Image], preprocess: Preprocess) -> torch.Tensor:
    """Stack RGB PIL images into a normalised ``(N, 3, S, S)`` float tensor."""
    t = eval_transform(preprocess)
    return torch.stack([t(im) for im in images])


def topk(
    probs: torch.Tensor, class_ids: Sequence[str], class_names: Sequence[str], k: int = 5
) -> list[list[dict[str, Any]]]:
    """Per row of ``probs``, the top ``k`` classes as ``{label, class_id, probability}``."""
    k = max(1, min(k, probs.shape[1]))
    values, indices = probs.float().topk(k, dim=1)
    return [
        [
            {"label": class_names[i], "class_id": class_ids[i], "probability": round(float(v), 6)}
            for v, i in zip(vals.tolist(), idx.tolist(), strict=True)
        ]
        for vals, idx in zip(values, indices, strict=True)
    ]
