"""Batch transform: predictions for every image under a folder or S3 prefix, resumable.

Writes ``OUTPUT/predictions.jsonl``: one line per image, ``{"image": relative path,
"predictions": [top-k], "model": {name, version, fingerprint}}`` or ``{"image": ..., "error":
"why", "model": ...}`` for a file that is not a usable image (recorded, then the run goes on).
Every line also records the input it came from (``"input"``: the folder's absolute path or the
``s3://`` prefix); with test-time augmentation it holds ``"tta": {"views", "names"}``.
Images already in the output are skipped, so a killed run picks up where it stopped. An output
that holds another model's answers, another input's (whose images may have the same names), or
answers made with another TTA setting or ``top_k`` is refused (``overwrite=True`` starts it
afresh), so a resumed run never mixes two jobs' predictions nor passes one input's answers off
as another's. Lines are flushed and fsynced after every batch, so a kill loses nothing already
written. Decoding runs in a thread pool ahead of the model; prediction uses the
same runtimes as ``visiontune serve``.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from visiontune.errors import UserError

OUTPUT_FILE = "predictions.jsonl"


@dataclass
class TransformResult:
    """What one run did."""

    output: str
    predicted: int
    errors: int
    skipped: int


def _list_images(input_uri: str, endpoint_url: str | None) -> tuple[Any, str, list[str]]:
    from visiontune.data.images import is_image_name
    from visiontune.uri import open_fs, storage_errors

    with storage_errors(input_uri, endpoint_url):
        fs, root = open_fs(input_uri, endpoint_url)
        if not fs.exists(root):
            raise UserError(f"input {input_uri} does not exist")
        if not fs.isdir(root):
            raise UserError(f"input {input_uri} is a file; give the folder (or prefix) of images")
        files = sorted(p for p in fs.find(root) if is_image_name(p))
    return fs, root, files


def _describe(model: dict[str, Any] | None) -> str:
    if not model:
        return "a model it does not name (written before lines recorded their model)"
    return f"model {model.get('name')!r} version {model.get('version')!r}"


def _describe_tta(tta: dict[str, Any] | None) -> str:
    return f"test-time augmentation with {tta.get('views')} views" if tta else "no TTA"


def input_identity(input_uri: str) -> str:
    """What an output line records as its input: a local folder's absolute path (``photos``,
    ``./photos/`` and ``/home/me/photos`` are one input), an ``s3://`` prefix without its
    trailing slash."""
    from visiontune.uri import is_remote

    if is_remote(input_uri):
        return input_uri.rstrip("/")
    return str(Path(input_uri.removeprefix("file://")).resolve())


@dataclass(frozen=True)
class _Job:
    """What a resumed run must share with the lines already written."""

    model: dict[str, str]
    input: str
    tta: dict[str, Any] | None
    answers: int  # predictions per line: top_k, or fewer when the model has fewer classes


def _done_images(path: Path, job: _Job, shown_as: str) -> set[str]:
    """Images already in the output; a torn last line (a kill mid-write) is cut off first.

    Raises:
        UserError: a line was written by another model (another fingerprint), for another
            input, with another test-time augmentation setting or another ``top_k``.
    """
    if not path.exists():
        return set()
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        with open(path, "r+b") as f:
            f.truncate(cut)
        data = data[:cut]
    done = set()
    for line in data.splitlines():
        try:
            record = json.loads(line)
            image = record["image"]
        except (ValueError, KeyError, TypeError):
            continue
        problem = _line_problem(record, job)
        if problem:
            raise UserError(
                f"{shown_as} holds {problem}; choose another --output or pass --overwrite"
            )
        done.add(image)
    return done


def _line_problem(record: dict[str, Any], job: _Job) -> str | None:
    """How a line already in the output differs from what this run would write, or ``None``."""
    written_by = record.get("model")
    if (
        not isinstance(written_by, dict)
        or written_by.get("fingerprint") != job.model["fingerprint"]
    ):
        by = written_by if isinstance(written_by, dict) else None
        return f"predictions of {_describe(by)}, not of {_describe(job.model)}"
    # Images are matched by their path under the input: another folder's IMG_0001.jpg would
    # pass for this one's and never be predicted. Lines written before inputs were recorded
    # carry none and are resumed as before.
    if "input" in record and record["input"] != job.input:
        return f"predictions for the images of {record['input']}, not of {job.input}"
    if record.get("tta") != job.tta:
        # One output, one way of predicting: TTA answers differ from plain ones.
        return (
            f"predictions made with {_describe_tta(record.get('tta'))}, "
            f"this run uses {_describe_tta(job.tta)}"
        )
    answers = record.get("predictions")
    if isinstance(answers, list) and len(answers) != job.answers:
        return f"{len(answers)} predictions per image, this run asks for {job.answers} (--top-k)"
    return None


def _local_output(folder: Path) -> Path:
    """``FOLDER/predictions.jsonl``, creating the folder; a path that is a file is one line."""
    if folder.exists() and not folder.is_dir():
        raise UserError(
            f"--output {folder} is a file; give a folder (predictions.jsonl is written inside it)"
        )
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the output folder {folder}: {e.strerror or e}") from None
    target = folder / OUTPUT_FILE
    if target.exists() and not target.is_file():
        raise UserError(f"{target} exists and is not a file; remove it or choose another --output")
    return target


@contextlib.contextmanager
def _progress_bar(total: int, *, enabled: bool) -> Iterator[Callable[[int], None]]:
    """A rich progress bar over ``total`` images on stderr; ``advance(n)`` moves it."""
    if not enabled:
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("transform"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("images"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True)) as bar:
        task = bar.add_task("transform", total=total)
        yield lambda n: bar.advance(task, n)


def _chunks(items: list[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def transform(
    model_dir: str | os.PathLike,
    input_uri: str,
    output_uri: str,
    *,
    runtime: str = "auto",
    batch_size: int = 32,
    top_k: int = 5,
    device: str = "auto",
    precision: str = "auto",
    endpoint_url: str | None = None,
    overwrite: bool = False,
    progress: bool = False,
    tta: int = 0,
) -> TransformResult:
    """Predict every image under ``input_uri`` and append the answers to ``output_uri``.

    Args:
        model_dir: a visiontune model directory (local or ``s3://``).
        input_uri: a folder or ``s3://`` prefix of images (searched recursively).
        output_uri: a folder or ``s3://`` prefix; ``predictions.jsonl`` is written there.
        runtime: ``auto`` (the fastest installed on CPU), ``torch``, ``onnx`` or ``openvino``.
        batch_size: images predicted together (and written together).
        top_k: classes per image.
        device: ``auto``, ``cpu`` or ``cuda``.
        precision: ``auto`` (bf16 where the hardware has it), ``fp32`` or ``bf16``.
        endpoint_url: S3-compatible endpoint for ``s3://`` URIs.
        overwrite: start the output afresh instead of resuming it (needed when it holds
            another model's predictions).
        progress: show a progress bar (images done, rate, time left) on stderr.
        tta: test-time augmentation views per image (0: off; 2: the image and its mirror; see
            :mod:`visiontune.tta`); the model still sees at most ``batch_size`` rows at once.

    Returns:
        Counts of predicted, failed and skipped (already done) images.

    Raises:
        UserError: a missing input, not a model directory, an output that is a file or holds
            another model's predictions, or storage errors.
    """
    from visiontune.device import available_cores
    from visiontune.models.artifact import fetch_model_dir, model_fingerprint
    from visiontune.serving.runtimes import load_runtime
    from visiontune.tta import check_views, describe
    from visiontune.tta import predict_proba as tta_predict_proba
    from visiontune.uri import join

    if batch_size < 1 or top_k < 1:
        raise UserError("--batch-size and --top-k must be at least 1")
    check_views(tta)
    tta_record = describe(tta)
    local_model = fetch_model_dir(str(model_dir), endpoint_url)
    model = load_runtime(runtime, local_model, device=device, precision=precision)
    info = model.info
    identity = {
        "name": info.name,
        "version": info.version,
        "fingerprint": model_fingerprint(local_model),
    }
    fs, root, files = _list_images(input_uri, endpoint_url)
    job = _Job(identity, input_identity(input_uri), tta_record, min(top_k, len(info.class_ids)))
    # One job at a time per output: a second would predict the same images again and
    # interleave its lines with the first's.
    with _Output.open(output_uri, endpoint_url, overwrite=overwrite) as output:
        done = _done_images(output.local, job, join(output_uri, OUTPUT_FILE))
        todo = _pending_images(files, root, input_uri, done)
        decode = _image_decoder(fs, info.preprocess)
        # What every line records besides the image and its answer.
        fields = {
            "model": identity,
            "input": job.input,
            **({"tta": tta_record} if tta_record else {}),
        }

        def predict(batch):  # the image and its TTA views, probabilities averaged over the views
            return tta_predict_proba(
                model.predict, batch, tta, info.preprocess, max_rows=batch_size
            )

        predicted = errors = 0
        chunks = list(_chunks(todo, batch_size))
        with (
            ThreadPoolExecutor(available_cores()) as pool,
            open(output.local, "a") as out,
            _progress_bar(len(todo), enabled=progress) as advance,
        ):
            for chunk, decoded in _decode_ahead(pool, decode, chunks):
                lines = _prediction_lines(predict, info, chunk, decoded, top_k, fields)
                failed = sum("error" in line for line in lines)
                errors += failed
                predicted += len(lines) - failed
                _append_durably(out, lines)
                output.upload()
                advance(len(chunk))
        if not chunks and overwrite:
            output.upload()  # nothing new, but an s3:// output asked afresh must not keep old lines
        return TransformResult(
            output=join(output_uri, OUTPUT_FILE),
            predicted=predicted,
            errors=errors,
            # Images of this input found in the output: lines of files since removed do not count.
            skipped=len(files) - len(todo),
        )


@dataclass
class _Output:
    """Where the lines go: a local file, mirrored to ``remote_file`` on ``fs`` for S3."""

    local: Path
    fs: Any = None
    remote_file: str | None = None
    output_uri: str = ""
    endpoint_url: str | None = None

    @classmethod
    @contextlib.contextmanager
    def open(
        cls, output_uri: str, endpoint_url: str | None, *, overwrite: bool
    ) -> Iterator[_Output]:
        """The local file to append to (the output itself, or a copy of the S3 object), held
        for this job alone while the block runs.

        Raises:
            UserError: another transform is writing to the same output on this machine.
        """
        import hashlib

        from visiontune.uri import is_remote, open_fs, storage_errors, visiontune_home

        if not is_remote(output_uri):
            local = _local_output(Path(output_uri))
            with _only_writer(local, join_output(output_uri)):
                if overwrite:
                    local.unlink(missing_ok=True)
                yield cls(local)
            return
        # S3 objects cannot be appended to: keep a local copy, upload it after every batch.
        key = hashlib.sha1(output_uri.encode()).hexdigest()[:16]
        local = visiontune_home() / "transform" / key / OUTPUT_FILE
        local.parent.mkdir(parents=True, exist_ok=True)
        with _only_writer(local, join_output(output_uri)):
            out_fs, out_root = open_fs(output_uri, endpoint_url)
            remote_file = f"{out_root.rstrip('/')}/{OUTPUT_FILE}"
            with storage_errors(output_uri, endpoint_url):
                if out_fs.exists(remote_file) and not overwrite:
                    out_fs.get(remote_file, str(local))
                else:
                    local.unlink(missing_ok=True)
            yield cls(local, out_fs, remote_file, output_uri, endpoint_url)

    def upload(self) -> None:
        """Copy the local file to S3 (nothing to do for a local output)."""
        from visiontune.uri import storage_errors

        if self.fs is None:
            return
        with storage_errors(self.output_uri, self.endpoint_url):
            self.fs.put(str(self.local), self.remote_file)


def join_output(output_uri: str) -> str:
    """``OUTPUT/predictions.jsonl`` as the user would name it."""
    from visiontune.uri import join

    return join(output_uri, OUTPUT_FILE)


def _only_writer(local: Path, shown_as: str):
    """Hold ``local`` for this process: an exclusive lock on a hidden file beside it.

    Raises:
        UserError: another process holds it.
    """
    from visiontune.io import held_lock

    return held_lock(
        local.with_name(f".{local.name}.lock"),
        f"another visiontune transform is writing {shown_as}; let it finish (a rerun then "
        "predicts only what it left) or choose another --output",
    )


def _pending_images(
    files: list[str], root: str, input_uri: str, done: set[str]
) -> list[tuple[str, str]]:
    """``(path, name in the output)`` of every image not in the output yet."""
    from visiontune.uri import is_remote

    todo = [
        (f, os.path.relpath(f, root) if not is_remote(input_uri) else f[len(root) :].lstrip("/"))
        for f in files
    ]
    return [(f, rel) for f, rel in todo if rel not in done]


def _image_decoder(fs: Any, preprocess: Any) -> Callable[[str], Any]:
    """``decode(path)``: the model's input tensor, or why the file is not a usable image."""
    from visiontune.data.images import ImageDecodeError, load_image
    from visiontune.data.transforms import decode_size_hint, eval_transform

    transform_fn = eval_transform(preprocess)
    decode_size = decode_size_hint(preprocess)

    def decode(path: str) -> Any:
        try:
            with fs.open(path, "rb") as f:
                data = f.read()
            return transform_fn(load_image(data, decode_size=decode_size))
        except ImageDecodeError as e:
            return e.reason
        except OSError as e:
            return f"cannot read the file: {e}"

    return decode


def _decode_ahead(
    pool: ThreadPoolExecutor, decode: Callable[[str], Any], chunks: list[list[tuple[str, str]]]
) -> Iterator[tuple[list[tuple[str, str]], list[Any]]]:
    """Each chunk with its decoded images; the next chunk decodes while this one is predicted.

    So two batches are in memory at most.
    """

    def submit(i: int):
        return [pool.submit(decode, f) for f, _ in chunks[i]] if i < len(chunks) else []

    upcoming = submit(0)
    for i, chunk in enumerate(chunks):
        current, upcoming = upcoming, submit(i + 1)
        yield chunk, [future.result() for future in current]


def _prediction_lines(
    predict: Callable[[Any], Any],
    info: Any,
    chunk: list[tuple[str, str]],
    decoded: list[Any],
    top_k: int,
    fields: dict[str, Any],
) -> list[dict[str, Any]]:
    """One output line per image of ``chunk``: its top-k predictions, or its decode error.

    Args:
        predict: a batch of model inputs -> class probabilities (a runtime's ``predict``).
        info: the model's class ids and names.
        chunk: ``(path, name in the output)`` of each image.
        decoded: each image's model input, or why it could not be decoded.
        top_k: classes per image.
        fields: added to every line after the image and its answer (``model``).
    """
    import torch

    from visiontune.inference import topk

    names = [rel for _, rel in chunk]
    lines: list[dict[str, Any]] = []
    good = [(n, x) for n, x in zip(names, decoded, strict=True) if not isinstance(x, str)]
    answers: dict[str, Any] = {}
    if good:
        probs = predict(torch.stack([x for _, x in good]))
        for (name, _), top in zip(
            good, topk(probs, info.class_ids, info.class_names, top_k), strict=True
        ):
            answers[name] = top
    for name, x in zip(names, decoded, strict=True):
        if isinstance(x, str):
            lines.append({"image": name, "error": x, **fields})
        else:
            lines.append({"image": name, "predictions": answers[name], **fields})
    return lines


def _append_durably(out: Any, lines: list[dict[str, Any]]) -> None:
    """Append ``lines`` as JSON lines, flushed and fsynced: a kill loses nothing written."""
    out.write("".join(json.dumps(line) + "\n" for line in lines))
    out.flush()
    os.fsync(out.fileno())
