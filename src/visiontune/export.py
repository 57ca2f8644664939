"""Export a model directory to ONNX or TorchScript, for onnxruntime or for C++/mobile users.

Both formats take a normalised ``(N, 3, S, S)`` float batch (``S`` from ``model.json``) with a
dynamic batch axis and return logits ``(N, num_classes)``. The file goes into the model
directory by default (``model.onnx`` / ``model.torchscript.pt``), beside the weights it was
made from; the ONNX file records the model version it was exported from, so a runtime can tell
a stale export from a current one.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from visiontune.errors import UserError

ONNX_FILE = "model.onnx"
TORCHSCRIPT_FILE = "model.torchscript.pt"
ONNX_OPSET = 18
INPUT_NAME = "input"
OUTPUT_NAME = "logits"


def export_onnx(
    model: nn.Module, input_size: int, path: str | os.PathLike, version: str = ""
) -> Path:
    """Write ``model`` as ONNX with a dynamic batch axis and return the path.

    Args:
        model: the network in eval mode, on CPU.
        input_size: the square input side ``S``.
        path: where to write.
        version: the model version, stored in the file's metadata (``visiontune_version``).
    """
    import onnx

    from visiontune.io import atomic_write

    path = Path(path)
    example = torch.zeros(2, 3, input_size, input_size)

    def write(tmp: str) -> None:
        with warnings.catch_warnings():
            # The TorchScript-based exporter is deprecated but is exact, fast and needs no
            # graph tracing through torch.export, which some timm blocks still trip.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                (example,),
                tmp,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                opset_version=ONNX_OPSET,
                dynamo=False,
            )
        proto = onnx.load(tmp)
        entry = proto.metadata_props.add()
        entry.key, entry.value = "visiontune_version", version
        onnx.checker.check_model(proto)
        onnx.save(proto, tmp)

    atomic_write(path, write)
    return path


def onnx_version(path: str | os.PathLike) -> str | None:
    """The model version an ONNX file was exported from (``None`` if it records none)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return next((p.value for p in proto.metadata_props if p.key == "visiontune_version"), None)


def export_torchscript(
    model: nn.Module, input_size: int, path: str | os.PathLike, version: str = ""
) -> Path:
    """Write ``model`` as a traced TorchScript module (loadable with ``torch.jit.load``)."""
    from visiontune.io import atomic_write

    path = Path(path)
    example = torch.zeros(2, 3, input_size, input_size)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, example)

    def write(tmp: str) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated upstream
            torch.jit.save(traced, tmp, _extra_files={"version": version})

    atomic_write(path, write)
    return path


def is_onnx_export(path: str | os.PathLike) -> bool:
    """True when ``path`` is an ONNX file written by :func:`export_onnx` (it names its version)."""
    try:
        return onnx_version(path) is not None
    except Exception:  # not protobuf, truncated, unreadable: not an export
        return False


def is_torchscript_export(path: str | os.PathLike) -> bool:
    """True when ``path`` is a TorchScript archive written by :func:`export_torchscript`."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("/extra/version") for name in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


# Format -> (exporter, default file name, "is this file an earlier export?"). A new format is
# one entry here.
EXPORTERS: dict[str, tuple[Callable[..., Path], str, Callable[[Path], bool]]] = {
    "onnx": (export_onnx, ONNX_FILE, is_onnx_export),
    "torchscript": (export_torchscript, TORCHSCRIPT_FILE, is_torchscript_export),
}


def export_model(
    model_dir: str | os.PathLike, fmt: str = "onnx", output: str | os.PathLike | None = None
) -> Path:
    """Export a visiontune model directory and return the written file.

    Args:
        model_dir: a model directory (``model.safetensors`` + ``model.json``).
        fmt: ``onnx`` or ``torchscript``.
        output: the file to write; default ``MODEL_DIR/model.onnx`` or
            ``MODEL_DIR/model.torchscript.pt``.

    An earlier export in the same format at ``output`` is replaced; any other existing file is
    refused, so a mistyped ``--output`` (the model's own ``model.safetensors``, a file of
    another kind) cannot destroy it.

    Raises:
        UserError: unknown format, not a model directory, an ``output`` that is a folder or a
            file this format's export did not write, or the file cannot be written.
    """
    from visiontune.models.artifact import load_model_dir, write_errors

    if fmt not in EXPORTERS:
        raise UserError(f"unknown export format {fmt!r}; use one of {', '.join(EXPORTERS)}")
    exporter, default_name, is_export = EXPORTERS[fmt]
    target = Path(output) if output is not None else Path(model_dir) / default_name
    if target.is_dir():
        raise UserError(f"--output {target} is a folder; give the file to write")
    if target.exists() and not is_export(target):
        raise UserError(
            f"--output {target} exists and is not a visiontune {fmt} export; it would be "
            "overwritten. Remove it first or choose another --output"
        )
    loaded = load_model_dir(model_dir, "cpu")
    with write_errors(target):  # disk full, read-only folder: one line, the old file kept
        return exporter(loaded.model, loaded.preprocess.input_size, target, loaded.version)
