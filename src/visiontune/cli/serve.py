"""``visiontune serve``, ``visiontune export`` and ``visiontune transform``.

Each command only parses its options and calls a stage function; torch, fastapi and
onnxruntime are imported inside the commands so ``visiontune --help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path

import typer

from visiontune.cli import TTA_HELP, TTA_VIEWS_HELP, app


@app.command()
def serve(
    model: str = typer.Argument(..., help="Model directory (local or s3://) to serve."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0 for all)."),
    port: int = typer.Option(8080, help="Port to listen on (SageMaker uses 8080)."),
    runtime: str = typer.Option(
        "auto",
        help="Inference runtime: auto (fastest installed on CPU: openvino, onnx; else torch), "
        "torch, onnx or openvino.",
    ),
    handler: Path | None = typer.Option(
        None, "--handler", help="A SageMaker-style inference.py overriding model_fn/input_fn/..."
    ),
    max_batch_size: int = typer.Option(32, help="Most images predicted together."),
    max_batch_delay_ms: float = typer.Option(
        10.0, help="Longest a request waits for others to share its batch."
    ),
    workers: int = typer.Option(1, help="Server processes (each loads the model)."),
    top_k: int = typer.Option(5, help="Classes per image unless the request asks otherwise."),
    max_body_mb: float = typer.Option(6.0, help="Request body limit in MB (413 above it)."),
    request_timeout: float = typer.Option(60.0, help="Seconds before a request gets 504."),
    max_instances: int = typer.Option(
        64, help="Most images in one request (413 above); predicted in --max-batch-size batches."
    ),
    max_request_pixels: int = typer.Option(
        100_000_000, help="Most pixels of all a request's images together (413 above)."
    ),
    header_timeout: float = typer.Option(
        10.0, help="Seconds for a request's headers to arrive (408 and closed after)."
    ),
    body_timeout: float = typer.Option(
        60.0, help="Seconds for a request's body to arrive after its headers."
    ),
    max_connections: int = typer.Option(1000, help="Open connections above this are answered 503."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    precision: str = typer.Option("auto", help="auto (bf16 where supported), fp32 or bf16."),
    threads: int | None = typer.Option(None, help="Inference threads per worker (default: cores)."),
    access_log: str | None = typer.Option(
        "-", help="JSON-lines access log: '-' for stderr, a file path, or 'off'."
    ),
    endpoint_url: str | None = typer.Option(
        None, help="S3-compatible endpoint for an s3:// MODEL (default from the AWS config)."
    ),
    tta: bool = typer.Option(
        False,
        "--tta",
        help=TTA_HELP + " Off by default: each image then costs the model --tta-views rows.",
    ),
    tta_views: int | None = typer.Option(None, "--tta-views", help=TTA_VIEWS_HELP),
) -> None:
    """Serve MODEL over HTTP with SageMaker's container contract (/ping, /invocations)."""
    from visiontune.models.artifact import fetch_model_dir
    from visiontune.serving.app import ServeConfig
    from visiontune.serving.app import serve as run_server
    from visiontune.tracking.registry import resolve_model_uri
    from visiontune.tta import views_from_flags

    views = views_from_flags(tta, tta_views)  # a bad count fails before any model download
    run_server(
        ServeConfig(
            model_dir=fetch_model_dir(resolve_model_uri(model), endpoint_url),
            host=host,
            port=port,
            runtime=runtime,
            handler=str(handler) if handler else None,
            max_batch_size=max_batch_size,
            max_batch_delay_ms=max_batch_delay_ms,
            workers=workers,
            top_k=top_k,
            max_body_mb=max_body_mb,
            request_timeout_s=request_timeout,
            max_instances=max_instances,
            max_request_pixels=max_request_pixels,
            header_timeout_s=header_timeout,
            body_timeout_s=body_timeout,
            max_connections=max_connections,
            device=device,
            precision=precision,
            threads=threads,
            access_log=None if access_log in (None, "", "off", "none") else access_log,
            tta=views,
        )
    )


@app.command()
def export(
    model: Path = typer.Argument(..., help="Model directory to export."),
    format: str = typer.Option("onnx", "--format", help="onnx or torchscript."),
    output: Path | None = typer.Option(
        None, "--output", help="File to write (default MODEL/model.onnx or model.torchscript.pt)."
    ),
) -> None:
    """Export MODEL to ONNX or TorchScript (dynamic batch axis)."""
    from rich.console import Console

    from visiontune.export import export_model

    # A spinner on a terminal: exporting a large backbone takes tens of seconds.
    with Console(stderr=True).status(f"exporting {model} to {format}"):
        path = export_model(model, format, output)
    typer.echo(f"wrote {path}")


@app.command()
def transform(
    model: str = typer.Argument(..., help="Model directory (local or s3://)."),
    input: str = typer.Option(..., "--input", help="Folder or s3:// prefix of images."),
    output: str = typer.Option(
        ..., "--output", help="Folder or s3:// prefix for predictions.jsonl."
    ),
    runtime: str = typer.Option(
        "auto", help="auto (fastest installed on CPU), torch, onnx or openvino."
    ),
    batch_size: int = typer.Option(32, help="Images predicted (and written) together."),
    top_k: int = typer.Option(5, help="Classes per image."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    endpoint_url: str | None = typer.Option(None, help="S3-compatible endpoint for s3:// URIs."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Start OUTPUT afresh (needed when another model wrote it)."
    ),
    progress: bool = typer.Option(True, help="Show a progress bar on stderr."),
    tta: bool = typer.Option(False, "--tta", help=TTA_HELP),
    tta_views: int | None = typer.Option(None, "--tta-views", help=TTA_VIEWS_HELP),
) -> None:
    """Batch predictions for every image under INPUT; resumes where a previous run stopped."""
    from visiontune.transform import transform as run_transform
    from visiontune.tta import views_from_flags

    result = run_transform(
        model,
        input,
        output,
        runtime=runtime,
        batch_size=batch_size,
        top_k=top_k,
        device=device,
        endpoint_url=endpoint_url,
        overwrite=overwrite,
        progress=progress,
        tta=views_from_flags(tta, tta_views),
    )
    typer.echo(
        f"{result.predicted} predicted, {result.errors} errors, {result.skipped} already done "
        f"-> {result.output}"
    )
