"""Inference runtimes: the same model directory run by eager torch or by onnxruntime.

A runtime takes a preprocessed ``(N, 3, S, S)`` float batch and returns class probabilities
``(N, num_classes)``. Every runtime satisfies :class:`Runtime` and passes the one contract test
in ``tests/serving/test_runtimes.py``; a new runtime is one entry in :data:`RUNTIMES`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from visiontune.data.transforms import Preprocess
from visiontune.device import available_cores
from visiontune.errors import UserError

# OpenVINO without its usage telemetry. `import openvino` imports openvino.tools.ovc, which
# sends a usage event to Google Analytics unless the user opted out in ~/intel (no opt-out file
# counts as consent), from a process forked off a thread pool, and counts uses in ~/intel. A
# server must not report to a third party, and that fork from a threaded process once
# deadlocked on the import lock and outlived its server (seen after a test run, stuck resolving
# Google's host name). Unimportable here, the package is replaced by ovc's own no-op stub. Set
# once at import, before any code below (runtime detection included) can import openvino.
sys.modules.setdefault("openvino_telemetry", None)  # type: ignore[arg-type]


@dataclass(frozen=True)
class ModelInfo:
    """What a runtime serves: labels and identity from ``model.json``."""

    name: str
    version: str
    class_ids: list[str]
    class_names: list[str]
    preprocess: Preprocess


@runtime_checkable
class Runtime(Protocol):
    """A loaded model that turns preprocessed batches into probabilities."""

    name: str
    info: ModelInfo

    def predict(self, batch: torch.Tensor) -> torch.Tensor:
        """Probabilities ``(N, C)`` (float32, CPU) for a ``(N, 3, S, S)`` float32 batch."""
        ...


def _info(loaded) -> ModelInfo:
    return ModelInfo(
        loaded.name, loaded.version, loaded.class_ids, loaded.class_names, loaded.preprocess
    )


class TorchRuntime:
    """Eager PyTorch: channels_last, bf16 autocast where the hardware has it, CUDA when present."""

    name = "torch"

    def __init__(
        self,
        model_dir: str | os.PathLike,
        *,
        device: str = "auto",
        precision: str = "auto",
        threads: int | None = None,
    ):
        from visiontune.device import autocast_dtype, resolve_device
        from visiontune.models.artifact import load_model_dir

        self.device = resolve_device(device)
        if self.device.type == "cpu":
            # One intra-op thread per core: more only makes threads fight on a small machine.
            torch.set_num_threads(threads or available_cores())
        loaded = load_model_dir(model_dir, self.device)
        self.info = _info(loaded)
        self.dtype = autocast_dtype(self.device, precision)
        # channels_last lets oneDNN/cuDNN pick their fastest convolution kernels.
        self.model = loaded.model.to(memory_format=torch.channels_last)

    def predict(self, batch: torch.Tensor) -> torch.Tensor:
        from visiontune.device import autocast

        x = batch.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), autocast(self.device, self.dtype):
            logits = self.model(x)
        return torch.softmax(logits.float(), dim=1).cpu()


class OnnxRuntime:
    """onnxruntime on ``MODEL/model.onnx``; exported (into the cache) when missing or stale."""

    name = "onnx"

    def __init__(
        self,
        model_dir: str | os.PathLike,
        *,
        device: str = "auto",
        precision: str = "auto",
        threads: int | None = None,
    ):
        import onnxruntime as ort

        from visiontune.models.artifact import load_model_dir

        loaded = load_model_dir(model_dir, "cpu")
        self.info = _info(loaded)
        path = onnx_file_for(Path(model_dir), loaded)
        options = ort.SessionOptions()
        # Intra-op threads = cores; one inter-op thread, since a CNN is a chain of ops.
        options.intra_op_num_threads = threads or available_cores()
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers = ["CPUExecutionProvider"]
        if device in ("auto", "cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        self.input_name = self.session.get_inputs()[0].name

    def predict(self, batch: torch.Tensor) -> torch.Tensor:
        x = batch.detach().to("cpu", torch.float32).contiguous().numpy()
        (logits,) = self.session.run(None, {self.input_name: x})
        return torch.softmax(torch.from_numpy(logits).float(), dim=1)


class OpenVinoRuntime:
    """OpenVINO on the same ONNX export; bf16 inference where the CPU has it (AMX/AVX512-BF16).

    OpenVINO compiles the graph for the CPU it runs on (oneDNN kernels, AMX tiles); on CPUs
    without native bf16 it runs fp32, so top-1 matches torch and onnxruntime.
    """

    name = "openvino"

    def __init__(
        self,
        model_dir: str | os.PathLike,
        *,
        device: str = "auto",
        precision: str = "auto",
        threads: int | None = None,
    ):
        try:
            import openvino as ov
        except ImportError:
            raise UserError(
                "--runtime openvino needs the openvino package: pip install 'visiontune[openvino]'"
            ) from None
        from visiontune.device import cpu_supports_bf16
        from visiontune.models.artifact import load_model_dir

        if device == "cuda":
            raise UserError("--runtime openvino runs on the CPU; use --runtime torch for CUDA")
        loaded = load_model_dir(model_dir, "cpu")
        self.info = _info(loaded)
        path = onnx_file_for(Path(model_dir), loaded)
        bf16 = precision == "bf16" or (precision == "auto" and cpu_supports_bf16())
        config = {
            "INFERENCE_NUM_THREADS": int(threads or available_cores()),
            "INFERENCE_PRECISION_HINT": "bf16" if bf16 else "f32",
            "PERFORMANCE_HINT": "LATENCY",
        }
        core = ov.Core()
        with _signal_stack_kept():
            self.compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
            self.request = self.compiled.create_infer_request()

    def predict(self, batch: torch.Tensor) -> torch.Tensor:
        x = batch.detach().to("cpu", torch.float32).contiguous().numpy()
        # One infer request: the batcher calls predict from one thread at a time.
        logits = self.request.infer({0: x})[self.compiled.output(0)]
        return torch.softmax(torch.from_numpy(logits.copy()).float(), dim=1)


@contextlib.contextmanager
def _signal_stack_kept():
    """Give the calling thread back its own alternate signal stack when the block ends.

    OpenVINO's CPU plugin (2026.4) installs an alternate signal stack of its own on the thread
    that compiles a model, and reinstalls the one it found when that model is freed. Two models
    freed in the order they were made leave the thread on the first one's stack, already
    unmapped; the next signal handled on that thread (torch's DataLoader SIGCHLD handler, as
    soon as any child process exits) then kills the process with SIGSEGV, before any Python or
    faulthandler code runs. With the thread's own stack back in place, the plugin's later
    reinstall puts back that same, live stack.
    """
    if sys.platform != "linux":
        yield
        return
    import ctypes

    class StackT(ctypes.Structure):
        _fields_ = (
            ("ss_sp", ctypes.c_void_p),
            ("ss_flags", ctypes.c_int),
            ("ss_size", ctypes.c_size_t),
        )

    libc = ctypes.CDLL(None, use_errno=True)
    before = StackT()
    if libc.sigaltstack(None, ctypes.byref(before)) != 0:
        yield
        return
    try:
        yield
    finally:
        libc.sigaltstack(ctypes.byref(before), None)


def onnx_file_for(model_dir: Path, loaded) -> Path:
    """``model_dir/model.onnx`` if it matches the weights; else a fresh export in the cache."""
    from visiontune.export import ONNX_FILE, export_onnx
    from visiontune.uri import visiontune_home

    in_dir = model_dir / ONNX_FILE
    if in_dir.is_file() and _recorded_version(in_dir) == loaded.version:
        return in_dir
    cached = visiontune_home() / "onnx" / f"{loaded.version or 'unversioned'}" / ONNX_FILE
    if not cached.is_file():
        export_onnx(loaded.model.cpu(), loaded.preprocess.input_size, cached, loaded.version)
    return cached


def _recorded_version(path: Path) -> str | None:
    """The model version ``path`` records, or ``None`` (so it counts as stale) when it is not
    a readable ONNX file: a damaged ``MODEL/model.onnx`` (a copy cut short) failed the load
    of the default runtime, leaving a server that answered 503 for good although the weights,
    which every export is made from, were fine."""
    from visiontune.export import onnx_version

    try:
        return onnx_version(path)
    except Exception as e:  # protobuf's DecodeError and onnx's own errors share no base
        logging.getLogger("visiontune.serving").warning(
            "%s is not a readable ONNX file (%s); exporting the weights afresh instead",
            path,
            f"{type(e).__name__}: {e}".splitlines()[0],
        )
        return None


# Name -> constructor ``(model_dir, *, device, precision, threads) -> Runtime``.
RUNTIMES: dict[str, Callable[..., Runtime]] = {
    "torch": TorchRuntime,
    "onnx": OnnxRuntime,
    "openvino": OpenVinoRuntime,
}


AUTO = "auto"


def resolve_runtime(name: str, device: str = "auto", precision: str = "auto") -> str:
    """The runtime ``auto`` stands for: the fastest installed one on CPU, torch on a GPU.

    On CPU, OpenVINO (bf16 where the CPU has it) is fastest, then onnxruntime, both with the
    same top-1 as eager torch; measured side by side in benchmarks/serving.py. onnxruntime runs
    fp32 only, so a torch precision asked for without OpenVINO gets torch.

    Raises:
        UserError: an unknown runtime name.
    """
    if name != AUTO:
        if name not in RUNTIMES:
            raise UserError(f"unknown runtime {name!r}; use one of {', '.join([AUTO, *RUNTIMES])}")
        return name
    from visiontune.device import resolve_device

    if resolve_device(device).type != "cpu":
        return "torch"
    if _installed("openvino"):
        return "openvino"
    if precision in ("auto", "fp32") and _installed("onnxruntime"):
        return "onnx"
    return "torch"


def check_precision(runtime: str, device: str = "auto", precision: str = "auto") -> None:
    """Refuse a precision that ``runtime`` (a resolved name, not ``auto``) would not run.

    Without this, OpenVINO and onnxruntime ran fp16 (and onnxruntime bf16) as fp32 without a
    word, and torch on a CPU failed with fp16 while loading, after the server had started.

    Raises:
        UserError: fp16 off CUDA or off the torch runtime; bf16 on onnxruntime.
    """
    from visiontune.device import resolve_device

    if precision == "fp16" and (runtime != "torch" or resolve_device(device).type != "cuda"):
        raise UserError(
            "--precision fp16 runs on a CUDA GPU with --runtime torch; on CPU use bf16 or fp32"
        )
    if precision == "bf16" and runtime == "onnx":
        raise UserError("--runtime onnx runs fp32 only; for bf16 use --runtime openvino or torch")


def _installed(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def load_runtime(
    name: str,
    model_dir: str | os.PathLike,
    *,
    device: str = "auto",
    precision: str = "auto",
    threads: int | None = None,
) -> Runtime:
    """Load ``model_dir`` with the runtime called ``name``.

    Args:
        name: ``auto`` (see :func:`resolve_runtime`) or a key of :data:`RUNTIMES`.
        model_dir: a visiontune model directory.
        device: ``auto``, ``cpu`` or ``cuda``.
        precision: ``auto`` (bf16 where the hardware has it), ``fp32`` or ``bf16`` (torch only).
        threads: intra-op threads; default one per available core.

    Raises:
        UserError: unknown runtime or not a model directory.
    """
    factory = RUNTIMES[resolve_runtime(name, device, precision)]
    return factory(model_dir, device=device, precision=precision, threads=threads)
