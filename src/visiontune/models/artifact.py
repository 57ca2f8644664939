"""The self-describing model directory: ``model.safetensors`` + ``model.json``.

A model directory alone is enough to evaluate, export, serve, predict and transform: it names
the architecture, the classes, and the exact preprocessing training used. Loading never
unpickles anything (safetensors + JSON).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from visiontune import __version__
from visiontune.data.transforms import Preprocess
from visiontune.errors import UserError
from visiontune.io import atomic_write, atomic_write_json

FORMAT = "visiontune-model"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
META_FILE = "model.json"


@dataclass
class LoadedModel:
    """A model ready for inference, with what it needs to preprocess and label."""

    model: nn.Module
    meta: dict[str, Any]
    preprocess: Preprocess
    path: Path

    @property
    def class_ids(self) -> list[str]:
        return list(self.meta["class_ids"])

    @property
    def class_names(self) -> list[str]:
        return list(self.meta["class_names"])

    @property
    def name(self) -> str:
        return str(self.meta.get("name", self.path.name))

    @property
    def version(self) -> str:
        return str(self.meta.get("version", ""))


def save_model_dir(
    path: str | os.PathLike,
    model: nn.Module,
    *,
    architecture: str,
    class_ids: list[str],
    class_names: list[str],
    preprocess: Preprocess,
    metrics: dict[str, Any] | None = None,
    config: dict[str, Any] | None = None,
    name: str | None = None,
) -> Path:
    """Write ``model.safetensors`` and ``model.json`` into ``path`` (atomically, weights first).

    The version is a short hash of the weights, so two directories with the same version hold
    the same model.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    atomic_write(path / WEIGHTS_FILE, lambda tmp: save_file(state, tmp))
    digest = hashlib.sha256((path / WEIGHTS_FILE).read_bytes()).hexdigest()[:12]
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "visiontune_version": __version__,
        "name": name or path.resolve().parent.name or "model",
        "version": digest,
        "architecture": architecture,
        "num_classes": len(class_ids),
        "class_ids": list(class_ids),
        "class_names": list(class_names),
        "preprocess": preprocess.to_dict(),
        "metrics": metrics or {},
        "config": config or {},
        "created_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }
    atomic_write_json(path / META_FILE, meta)
    return path


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check ``model.json``; a directory that is not a model fails in one line."""
    path = Path(path)
    meta_file = path / META_FILE
    if not path.exists():
        raise UserError(f"model directory not found: {path}")
    if not meta_file.is_file() or not (path / WEIGHTS_FILE).is_file():
        raise UserError(
            f"{path} is not a visiontune model directory (needs {META_FILE} and {WEIGHTS_FILE}; "
            f"a training run writes them to RUN/model)"
        )
    try:
        meta = json.loads(meta_file.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{meta_file} is not valid JSON: {e}") from e
    if meta.get("format") != FORMAT:
        raise UserError(f"{meta_file} is not a visiontune model description")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise UserError(
            f"{path} was written by a newer visiontune (format {meta['format_version']}); upgrade"
        )
    return meta


def load_model_dir(path: str | os.PathLike, device: str | torch.device = "cpu") -> LoadedModel:
    """Rebuild the model from a model directory, in eval mode, on ``device``."""
    from safetensors.torch import load_file

    from visiontune.models.registry import build_model

    path = Path(path)
    meta = read_meta(path)
    model, _ = build_model(meta["architecture"], int(meta["num_classes"]), weights="none")
    state = load_file(str(path / WEIGHTS_FILE))
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(
            f"{path / WEIGHTS_FILE} does not match {meta['architecture']}: {str(e).splitlines()[0]}"
        ) from e
    model.eval().to(device)
    return LoadedModel(model, meta, Preprocess.from_dict(meta["preprocess"]), path)
