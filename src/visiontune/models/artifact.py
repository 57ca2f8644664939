"""The self-describing model directory: ``model.safetensors`` + ``model.json``.

A model directory alone is enough to evaluate, export, serve, predict and transform: it names
the architecture, the classes, and the exact preprocessing training used. Loading never
unpickles anything (safetensors + JSON).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import math
import os
from collections.abc import Iterator
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
    the same model. The head's kind (and an MLP's width) is read from ``model`` and recorded,
    so loading rebuilds the same layers.
    """
    from safetensors.torch import save_file

    path = Path(path)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    with write_errors(path):
        path.mkdir(parents=True, exist_ok=True)
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
        "head": head_record(model),
        "class_ids": list(class_ids),
        "class_names": list(class_names),
        "preprocess": preprocess.to_dict(),
        "metrics": metrics or {},
        "config": config or {},
        "created_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }
    with write_errors(path):
        atomic_write_json(path / META_FILE, meta)
    return path


def head_record(model: nn.Module) -> dict[str, Any]:
    """What ``build_model`` needs to rebuild ``model``'s head: ``{"type", "hidden"?}``."""
    kind = getattr(model, "head_kind", "linear")
    record: dict[str, Any] = {"type": kind}
    if kind == "mlp":
        record["hidden"] = int(model.head_hidden)  # type: ignore[attr-defined]
    return record


def _head_args(meta: dict[str, Any]) -> dict[str, Any]:
    """``build_model`` keywords for the recorded head (linear when a model predates heads)."""
    record = meta.get("head") or {"type": "linear"}
    return {"head": record["type"], "head_hidden": record.get("hidden", 512)}


@contextlib.contextmanager
def write_errors(target: str | os.PathLike) -> Iterator[None]:
    """Turn a failed write (disk full, read-only, file too large) into one clear line.

    safetensors reports I/O failures as its own ``SafetensorError`` (not an ``OSError``), so
    both are caught here; anything else is a bug and keeps its traceback.
    """
    from safetensors import SafetensorError

    try:
        yield
    except OSError as e:
        reason = e.strerror or str(e)
        raise UserError(
            f"cannot write {target}: {reason}; free some space or choose another place"
        ) from e
    except SafetensorError as e:
        raise UserError(
            f"cannot write {target}: {str(e).splitlines()[0]}; free some space or choose another place"
        ) from e


def _check_meta(meta: dict[str, Any], meta_file: Path) -> None:
    """Refuse a model.json whose classes or preprocessing cannot serve a request.

    Each problem found here would otherwise surface at request time (an index error in top-k,
    a division by a zero std), after ``/ping`` said the model was ready.
    """

    def bad(what: str) -> UserError:
        return UserError(f"{meta_file} is not usable: {what}; re-export the model from its run")

    architecture = meta.get("architecture")
    if not isinstance(architecture, str) or not architecture:
        raise bad('"architecture" is missing')
    class_ids, class_names = meta.get("class_ids"), meta.get("class_names")
    for key, values in (("class_ids", class_ids), ("class_names", class_names)):
        if not isinstance(values, list) or not values:
            raise bad(f'"{key}" must be a non-empty list')
        if not all(isinstance(v, str) and v for v in values):
            raise bad(f'"{key}" must hold non-empty strings')
    assert isinstance(class_ids, list) and isinstance(class_names, list)
    if len(set(class_ids)) != len(class_ids):
        raise bad('"class_ids" has duplicates')
    if len(class_names) != len(class_ids):
        raise bad(f"{len(class_ids)} class_ids but {len(class_names)} class_names")
    num_classes = meta.get("num_classes")
    if type(num_classes) is not int or num_classes != len(class_ids):
        raise bad(f'"num_classes" is {num_classes!r} but there are {len(class_ids)} class_ids')
    head = meta.get("head", {"type": "linear"})
    from visiontune.models.registry import HEADS

    if not isinstance(head, dict) or head.get("type") not in HEADS:
        raise bad(f'"head" must be {{"type": one of {", ".join(HEADS)}}}, got {head!r}')
    hidden = head.get("hidden", 512)
    if type(hidden) is not int or hidden < 1:
        raise bad(f'"head" hidden width must be a positive integer, got {hidden!r}')
    pre = meta.get("preprocess")
    if not isinstance(pre, dict):
        raise bad('"preprocess" is missing')
    for key in ("mean", "std"):
        values = pre.get(key)
        if (
            not isinstance(values, list | tuple)
            or len(values) != 3
            or not all(_finite_number(v) for v in values)
        ):
            raise bad(f'preprocess "{key}" must be 3 finite numbers, got {values!r}')
    if any(v <= 0 for v in pre["std"]):
        raise bad(f'preprocess "std" must be positive, got {pre["std"]!r}')
    for key in ("input_size", "min_size"):
        if key in pre and (type(pre[key]) is not int or not 1 <= pre[key] <= 4096):
            raise bad(f'preprocess "{key}" must be an integer in [1, 4096], got {pre[key]!r}')
    if "input_size" not in pre:
        raise bad('preprocess "input_size" is missing')
    if pre["input_size"] < pre.get("min_size", 1):
        raise bad(f'preprocess "input_size" {pre["input_size"]} is below its "min_size"')
    crop = pre.get("crop_pct", 0.875)
    if not _finite_number(crop) or not 0 < crop <= 1:
        raise bad(f'preprocess "crop_pct" must be in (0, 1], got {crop!r}')
    if pre.get("interpolation", "bilinear") not in _INTERPOLATIONS:
        raise bad(
            f'preprocess "interpolation" must be one of {", ".join(_INTERPOLATIONS)}, '
            f"got {pre.get('interpolation')!r}"
        )


_INTERPOLATIONS = ("bilinear", "bicubic", "nearest")


def _finite_number(value: Any) -> bool:
    return type(value) in (int, float) and math.isfinite(value)


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
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise UserError(f"{meta_file} is not valid JSON: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(f"{meta_file} is not a visiontune model description")
    version = meta.get("format_version", 0)
    if type(version) is not int:
        raise UserError(f"{meta_file} has a bad format_version {version!r}")
    if version > FORMAT_VERSION:
        raise UserError(f"{path} was written by a newer visiontune (format {version}); upgrade")
    _check_meta(meta, meta_file)
    return meta


def load_model_dir(path: str | os.PathLike, device: str | torch.device = "cpu") -> LoadedModel:
    """Rebuild the model from a model directory, in eval mode, on ``device``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from visiontune.models.registry import build_model

    path = Path(path)
    meta = read_meta(path)
    model, _ = build_model(
        meta["architecture"], int(meta["num_classes"]), weights="none", **_head_args(meta)
    )
    try:
        state = load_file(str(path / WEIGHTS_FILE))
    except SafetensorError as e:
        raise UserError(f"{path / WEIGHTS_FILE} is damaged: {str(e).splitlines()[0]}") from e
    check_finite_weights(state, path / WEIGHTS_FILE)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(
            f"{path / WEIGHTS_FILE} does not match {meta['architecture']}: {str(e).splitlines()[0]}"
        ) from e
    model.eval().to(device)
    return LoadedModel(model, meta, Preprocess.from_dict(meta["preprocess"]), path)


def check_finite_weights(state: dict[str, torch.Tensor], weights_file: str | os.PathLike) -> None:
    """Refuse weights holding NaN or infinity.

    A training run that diverged (too high a learning rate) still writes its model; every
    answer of such a model is NaN, which serving sent as ``"probability": NaN`` (not JSON that
    strict parsers read) and ``predict`` printed as ``cat nan`` with an arbitrary label.

    Raises:
        UserError: a floating-point tensor holds a value that is not finite.
    """
    bad = [
        name
        for name, tensor in state.items()
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())
    ]
    if bad:
        raise UserError(
            f"{weights_file} holds NaN or infinite weights ({len(bad)} of {len(state)} tensors, "
            f"first {bad[0]}): the training run diverged; retrain it, e.g. with a lower --lr"
        )


def model_fingerprint(path: str | os.PathLike) -> str:
    """A short hash of everything that decides a model's answers: weights, classes, preprocessing.

    Two model directories with the same fingerprint give the same predictions; ``version``
    alone hashes only the weights, so relabelled classes would share it.
    """
    path = Path(path)
    meta = read_meta(path)
    digest = hashlib.sha256()
    with open(path / WEIGHTS_FILE, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    answers = {k: meta[k] for k in ("architecture", "class_ids", "class_names", "preprocess")}
    digest.update(json.dumps(answers, sort_keys=True).encode())
    return digest.hexdigest()[:16]


def fetch_model_dir(uri: str, endpoint_url: str | None = None) -> str:
    """A local copy of a model directory: local paths as they are, ``s3://`` copied to the cache.

    The copy goes to ``$VISIONTUNE_HOME/models/<hash of the URI>`` and is refreshed on every
    start (a model directory is small next to the time it takes to load it).

    Raises:
        UserError: the bucket or prefix does not exist, or credentials are missing.
    """
    from visiontune.uri import download_tree, is_remote, visiontune_home

    if not is_remote(uri):
        return uri
    local = visiontune_home() / "models" / hashlib.sha1(uri.encode()).hexdigest()[:16]
    download_tree(uri, local, endpoint_url)
    return str(local)
