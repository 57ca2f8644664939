"""``visiontune train``, ``evaluate``, ``predict`` and ``models``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import typer
from typer.core import TyperCommand

from visiontune.cli import TTA_HELP, TTA_VIEWS_HELP, app

_TRAIN_HELP = """Fine-tune a pretrained backbone on an image dataset.

Options come from --config (YAML) and flags, flags winning; --set KEY=VALUE sets any other
config key. The run directory gets config.yaml, metrics.jsonl, checkpoints/ and model/.
"""


class _ConfigDefaultsCommand(TyperCommand):
    """Shows TrainConfig's defaults in ``--help``. The options themselves default to None
    (a flag not given must not override the config file or a resumed run), so the defaults
    are looked up only when help is drawn: importing the config costs startup time."""

    def format_help(self, ctx, formatter):
        from visiontune.config import TrainConfig

        for param in self.params:
            field = TrainConfig.model_fields.get(param.name or "")
            if field is None or param.default is not None or field.is_required():
                continue
            default = field.get_default(call_default_factory=True)
            if default not in (None, [], {}) and not hasattr(default, "model_dump"):
                param.show_default = str(default)
        return super().format_help(ctx, formatter)


@app.command(help=_TRAIN_HELP, cls=_ConfigDefaultsCommand)
def train(
    data: str = typer.Option(None, "--data", "-d", help="Dataset folder, s3:// prefix or name."),
    config: Path = typer.Option(None, "--config", "-c", help="YAML file of config keys."),
    resume: str = typer.Option(None, "--resume", help="Continue the run in this directory."),
    output: str = typer.Option(None, "--output", "-o", help="Run directory (or s3://...)."),
    model: str = typer.Option(None, help="Backbone name (see `visiontune models`)."),
    weights: str = typer.Option(None, help="imagenet | none | PATH."),
    trainable: str = typer.Option(None, help="head | all | last:N."),
    dropout: float = typer.Option(None, help="Dropout before the new head."),
    backbone_lr_scale: float = typer.Option(None, help="LR multiplier for backbone layers."),
    lr: float = typer.Option(None, help="Peak learning rate."),
    batch_size: int = typer.Option(None, help="Images per step."),
    epochs: int = typer.Option(None, help="Passes over the training split."),
    optimizer: str = typer.Option(None, help="sgd | adamw."),
    weight_decay: float = typer.Option(None),
    label_smoothing: float = typer.Option(None),
    schedule: str = typer.Option(None, help="cosine | step | onecycle | constant."),
    warmup_epochs: float = typer.Option(None),
    augment: str = typer.Option(None, help="none | light | strong."),
    # heads for small data (issue #16)
    head: str = typer.Option(
        None, help="linear | mlp | probe (L-BFGS logistic regression on cached features)."
    ),
    head_hidden: int = typer.Option(None, help="Hidden width of the mlp head."),
    weight_averaging: str = typer.Option(
        None, help="none | ema | swa: validate and export averaged weights."
    ),
    ema_decay: float = typer.Option(None, help="EMA decay per step (--weight-averaging ema)."),
    swa_start: float = typer.Option(None, help="Fraction of epochs before averaging starts."),
    augment_views: int = typer.Option(
        None, help="Frozen backbone: cache features of K augmented views per image (0: off)."
    ),
    image_size: int = typer.Option(None, help="Input size (default: the backbone's)."),
    seed: int = typer.Option(None),
    device: str = typer.Option(None, help="auto | cpu | cuda."),
    precision: str = typer.Option(None, help="auto | fp32 | bf16 | fp16."),
    workers: int = typer.Option(None, help="DataLoader workers (default: CPU count)."),
    early_stopping: int = typer.Option(
        None,
        help="Stop after N epochs without improvement of --monitor (patience). "
        "(tune prunes whole trials with its own rule.)",
    ),
    monitor: str = typer.Option(None, help="Metric that picks the best epoch."),
    limit_per_class: int = typer.Option(None, help="Use at most N images per class."),
    endpoint_url: str = typer.Option(None, help="S3-compatible endpoint URL."),
    checkpoint_every_steps: int = typer.Option(None, help="Also checkpoint every N steps."),
    nproc_per_node: str = typer.Option(
        None,
        "--nproc-per-node",
        help="Data-parallel on torchrun: processes on this machine (a number, or gpu for one "
        "per GPU); --batch-size is then the global batch.",
        rich_help_panel="Distributed (torchrun)",
    ),
    nnodes: str = typer.Option(
        "1",
        help="Machines in the job (MIN:MAX for elastic).",
        rich_help_panel="Distributed (torchrun)",
    ),
    node_rank: int = typer.Option(
        None,
        help="This machine's rank (static rendezvous; node 0 hosts it).",
        rich_help_panel="Distributed (torchrun)",
    ),
    rdzv_endpoint: str = typer.Option(
        None, help="HOST:PORT where the machines meet.", rich_help_panel="Distributed (torchrun)"
    ),
    max_restarts: int = typer.Option(
        0,
        min=0,
        help="Restart the group this often after a rank fails (resumes from the last checkpoint).",
        rich_help_panel="Distributed (torchrun)",
    ),
    set_: list[str] = typer.Option(None, "--set", help="Any config key: KEY=VALUE."),
    callback: list[str] = typer.Option(
        None, "--callback", help="Attach a callback by name (debugger, profiler, module:Class)."
    ),
    debug: bool = typer.Option(False, "--debug", help="Turn the debugger on (docs/debugging.md)."),
    tracking_uri: str = typer.Option(
        None, "--tracking", help="Log to MLflow: http://HOST:PORT, sqlite:///FILE or a folder."
    ),
    register_model: str = typer.Option(
        None, "--register-model", help="Register the model in MLflow under this name."
    ),
    tracking_optional: bool = typer.Option(
        False, "--tracking-optional", help="Train anyway if the tracking server is unreachable."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    profile_steps: str = typer.Option(
        None, help="A-B: record steps A..B with torch.profiler (trace in RUN/profile/)."
    ),
) -> None:
    options = dict(locals())  # every option by name, for the steps below
    cfg = _with_switches(_config_from_options(options), options)
    result = _train_or_launch(cfg, options)
    from visiontune import dist

    if dist.is_main_process():
        _echo_result(result, json_out)


def _config_from_options(options: dict[str, Any]):
    """The run's ``TrainConfig``: --config (or the resumed run's config.yaml), the flags over
    it, then --set and --callback.

    Raises:
        UserError: nothing to train on, nothing to resume, or a bad option.
    """
    from visiontune.config import TrainConfig, build_config, parse_overrides, read_config_file
    from visiontune.errors import UserError

    flags: dict[str, Any] = {
        k: v
        for k, v in options.items()
        if k in TrainConfig.model_fields and v is not None and k != "config"
    }
    # Apart from the flags: a flag left out is None, while --set KEY=null means null.
    settings = parse_overrides(options["set_"] or [])
    if options["callback"]:
        flags["callbacks"] = list(options["callback"])
    resume = options["resume"]
    if resume:
        from visiontune.train import pull_remote_run

        _refuse_another_output(resume, options["output"])

        saved = pull_remote_run(resume, options["endpoint_url"]) / "config.yaml"
        if not saved.is_file():
            raise UserError(f"nothing to resume: {saved} does not exist")
        # A --config file counts as what this call asks, under the flags: the resume checks
        # it against the run like any flag (more epochs extend the run; a changed
        # hyperparameter is refused) instead of not reading it.
        asked = read_config_file(options["config"]) if options["config"] else {}
        # The run resumes where it is, whatever --set output says.
        return build_config(TrainConfig, saved, {**asked, **flags}, {**settings, "output": resume})
    if options["data"] is None and options["config"] is None:
        raise UserError("say what to train on: --data DATA (a folder, s3:// prefix or name)")
    return build_config(TrainConfig, options["config"], flags, settings)


def _refuse_another_output(resume: str, output: str | None) -> None:
    """``--resume RUN --output OTHER``: a run continues in its own directory, so OTHER would be
    ignored while RUN is extended and its model replaced, the opposite of a copy.

    Raises:
        UserError: ``output`` names another directory than ``resume``.
    """
    from visiontune.errors import UserError
    from visiontune.uri import is_remote

    if output is None:
        return

    def where(uri: str) -> str:
        return (
            uri.rstrip("/") if is_remote(uri) else str(Path(uri.removeprefix("file://")).resolve())
        )

    if where(output) != where(resume):
        raise UserError(
            f"--resume continues {resume} in place; it cannot write to --output {output}. "
            f"Copy the run directory to {output} and resume the copy to keep {resume} as it is"
        )


def _with_switches(cfg, options: dict[str, Any]):
    """``cfg`` with the flags that switch on a section: --debug, --profile-steps, --tracking
    (with --register-model and --tracking-optional).

    Raises:
        UserError: a bad --profile-steps window.
    """
    from visiontune.errors import UserError

    if options["debug"]:
        from visiontune.debug.config import DebuggerConfig

        cfg.debugger = (cfg.debugger or DebuggerConfig()).model_copy(update={"enabled": True})
    profile_steps = options["profile_steps"]
    if profile_steps:
        from visiontune.profile.config import parse_step_window

        try:
            parse_step_window(profile_steps)
        except ValueError as e:
            raise UserError(str(e)) from None
        # The flag turns the profiler on, as --debug does the debugger; the rest of the
        # profiler section is kept.
        update = {"enabled": True, "profile_steps": profile_steps}
        cfg.profiler = cfg.profiler.model_copy(update=update)
    from visiontune.tracking.config import with_tracking_flags

    o = options
    return with_tracking_flags(cfg, o["tracking_uri"], o["register_model"], o["tracking_optional"])


def _train_or_launch(cfg, options: dict[str, Any]):
    """Train in this process, or (--nproc-per-node) start this command on torchrun and exit
    with its code. Ctrl-C stops at a step boundary with one line and exit code 128+signal; a
    rank of a distributed run that fails reports its one line before the traceback."""
    from visiontune import dist
    from visiontune.train import TrainingInterrupted
    from visiontune.train import train as run_train

    o = options
    try:
        # The config is checked (built) before launching; each process runs this same command.
        if o["nproc_per_node"] is not None:
            code = _launch(
                cfg,
                o["nproc_per_node"],
                o["nnodes"],
                o["node_rank"],
                o["rdzv_endpoint"],
                o["max_restarts"],
            )
            raise SystemExit(code)
        return run_train(cfg, resume=bool(o["resume"]))
    except TrainingInterrupted as e:
        if dist.is_main_process():  # every rank stopped at the same step; one says so
            same = " and the same --nproc-per-node" if dist.env_world_size() > 1 else ""
            print(f"stopped: {e}{same}", file=sys.stderr)
        raise typer.Exit(128 + e.signum) from None
    except Exception as e:
        if dist.env_world_size() > 1:
            dist.report_failure(e)  # this rank's one line, for torchrun and the launcher
        raise


def _echo_result(result, json_out: bool) -> None:
    """Where the model went and its test accuracy: a line, or the summary as JSON."""
    summary = {
        "run_dir": str(result.run_dir),
        "model_dir": str(result.model_dir),
        "best_epoch": result.best_epoch,
        "best": result.best_metrics,
        "test": {k: result.test_metrics.get(k) for k in ("split", "accuracy", "top5", "loss")}
        if result.test_metrics
        else None,
        "stop_reason": result.stop_reason,
        "bad_images": result.bad_images,
    }
    if json_out:
        typer.echo(json.dumps(summary, indent=2))
    else:
        t = summary["test"] or {}
        typer.echo(
            f"model written to {result.model_dir} (best epoch {result.best_epoch}; "
            f"{t.get('split', 'test')} accuracy {t.get('accuracy', float('nan')):.4f}, "
            f"top-5 {t.get('top5', float('nan')):.4f})"
        )


_LAUNCHER_FLAGS = (
    "--nproc-per-node",
    "--nnodes",
    "--node-rank",
    "--rdzv-endpoint",
    "--max-restarts",
)


def _launch(cfg, nproc_per_node, nnodes, node_rank, rdzv_endpoint, max_restarts) -> int:
    """Start this same command under torchrun, without the launcher's own flags."""
    import hashlib

    from visiontune import dist

    if nnodes.isdigit() and nproc_per_node.isdigit():
        dist.per_rank_batch(cfg.batch_size, int(nnodes) * int(nproc_per_node))  # fail now
    argv, skip = [], False
    for arg in sys.argv[1:]:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in _LAUNCHER_FLAGS:
            skip = "=" not in arg
            continue
        argv.append(arg)
    return dist.launch(
        argv,
        nproc_per_node=nproc_per_node,
        nnodes=nnodes,
        node_rank=node_rank,
        rdzv_endpoint=rdzv_endpoint,
        # The same on every machine of the job, different for another output.
        rdzv_id="visiontune-" + hashlib.sha256(cfg.output.encode()).hexdigest()[:12],
        max_restarts=max_restarts,
    )


@app.command()
def evaluate(
    model: str = typer.Argument(..., help="Model directory (RUN/model)."),
    data: str = typer.Option(..., "--data", "-d", help="Dataset folder, s3:// prefix or name."),
    split: str = typer.Option(
        "test",
        help="Split to evaluate: train, valid (val) or test. On a folder of class folders, "
        "the split recorded when the model was trained.",
    ),
    endpoint_url: str = typer.Option(None, help="S3-compatible endpoint URL."),
    batch_size: int = typer.Option(64, min=1, help="Images per forward pass."),
    device: str = typer.Option("auto", help="auto | cpu | cuda."),
    tta: bool = typer.Option(False, "--tta", help=TTA_HELP),
    tta_views: int | None = typer.Option(None, "--tta-views", help=TTA_VIEWS_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print all metrics as JSON."),
) -> None:
    """Top-1/top-5 accuracy, per-class precision/recall/F1 and the confusion matrix."""
    from visiontune.evaluate import evaluate as run_evaluate
    from visiontune.tta import views_from_flags

    m = run_evaluate(
        model,
        data,
        split,
        endpoint_url=endpoint_url,
        batch_size=batch_size,
        device=device,
        tta=views_from_flags(tta, tta_views),
    )
    if json_out:
        typer.echo(json.dumps(m, indent=2))
        return
    _print_evaluation(m)


# Up to this many classes the whole confusion matrix fits a table; beyond, the top mistakes.
_MATRIX_MAX_CLASSES = 12


def _print_evaluation(m: dict[str, Any]) -> None:
    from rich.table import Table

    from visiontune.cli import output_console

    console = output_console()
    tta = m.get("tta")
    if tta:
        console.print(
            f"test-time augmentation: {tta['views']} views ({', '.join(tta['names'])}); "
            f"the plain image alone: accuracy {tta['single_view']['accuracy']:.4f}  "
            f"loss {tta['single_view']['loss']:.4f}",
            highlight=False,
            markup=False,
        )
    console.print(
        f"{m['split']} ({m['split_source']}): {m['count']} images  accuracy "
        f"{m['accuracy']:.4f}  top-5 {m['top5']:.4f}  loss {m['loss']:.4f}  "
        f"macro F1 {m['macro_f1']:.4f}"
        + (f"  ({m['bad_images']} unreadable skipped)" if m["bad_images"] else ""),
        highlight=False,
        markup=False,
    )
    table = Table("class", "precision", "recall", "f1", "support")
    for name, c in m["per_class"].items():
        table.add_row(
            name, f"{c['precision']:.3f}", f"{c['recall']:.3f}", f"{c['f1']:.3f}", str(c["support"])
        )
    console.print(table)
    names = list(m["per_class"])
    if len(names) <= _MATRIX_MAX_CLASSES:
        matrix = Table("true \\ predicted", *names, title="confusion matrix")
        for name, row in zip(names, m["confusion_matrix"], strict=True):
            matrix.add_row(name, *map(str, row))
        console.print(matrix)
    confusions = m.get("top_confusions") or []
    if not confusions:
        console.print("no confusions: every image was labelled correctly", highlight=False)
        return
    top = Table("true class", "predicted as", "images", title="top confusions")
    for c in confusions:
        top.add_row(c["true"], c["predicted"], str(c["count"]))
    console.print(top)


def _refuse_folders(images: list[str], model: str | None) -> None:
    from visiontune.errors import UserError

    for image in images:
        if Path(image).is_dir():
            raise UserError(
                f"{image} is a folder; predict labels image files. To label every image in it: "
                f"visiontune transform {model or 'MODEL'} --input {image} --output PREDICTIONS"
            )


@app.command()
def predict(
    images: list[str] = typer.Argument(..., help="Image files (for a folder: `transform`)."),
    model: str = typer.Option(None, "--model", "-m", help="Model directory (RUN/model)."),
    endpoint: str = typer.Option(None, "--endpoint", help="URL of a running endpoint."),
    top_k: int = typer.Option(5, "--top-k", min=1, help="Classes per image."),
    device: str = typer.Option("auto", help="auto | cpu | cuda."),
    tta: bool = typer.Option(False, "--tta", help=TTA_HELP + " With --model only."),
    tta_views: int | None = typer.Option(None, "--tta-views", help=TTA_VIEWS_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Label image files with a model directory or a running endpoint."""
    from visiontune.errors import UserError
    from visiontune.tta import views_from_flags

    if (model is None) == (endpoint is None):
        raise UserError("give exactly one of --model DIR or --endpoint URL")
    views = views_from_flags(tta, tta_views)
    if endpoint and views:
        raise UserError(
            "--tta applies to --model; an endpoint uses TTA when it was started with "
            "`visiontune serve --tta`"
        )
    _refuse_folders(images, model)
    if endpoint:
        from visiontune.serving.client import predict_endpoint

        results = predict_endpoint(images, endpoint, top_k=top_k)
    else:
        from visiontune.evaluate import predict as run_predict

        results = run_predict(images, model, top_k=top_k, device=device, tta=views)
    if json_out:
        typer.echo(json.dumps(results, indent=2))
    else:
        from visiontune.serving.client import describe_result

        for r in results:
            typer.echo(describe_result(r))
    if any("error" in r for r in results):
        raise SystemExit(1)


@app.command()
def models(
    json_out: bool = typer.Option(False, "--json", help="Print the list as JSON."),
) -> None:
    """List the backbones: input size, where the weights come from, whether they are on disk
    now (offline-ready) or need a download or a package, and their licence."""
    from visiontune.models.registry import REGISTRY, weights_status

    rows = []
    for spec in REGISTRY.values():
        status = weights_status(spec)
        rows.append(
            {
                "name": spec.name,
                "input_size": spec.preprocess.input_size,
                "weights": spec.weights,
                "offline_ready": status.offline_ready,
                "weights_status": status.detail,
                "weights_action": status.action,
                "license": spec.license,
                "description": spec.description,
            }
        )
    if json_out:
        typer.echo(json.dumps(rows, indent=2))
        return
    from rich.table import Table

    from visiontune.cli import output_console

    table = Table("name", "input", "offline-ready", "license", "description")
    for row in rows:
        offline = "yes" if row["offline_ready"] else f"no ({row['weights_action']})"
        table.add_row(
            row["name"], str(row["input_size"]), offline, row["license"], row["description"]
        )
    output_console().print(table)
    ready = sum(r["offline_ready"] for r in rows)
    output_console().print(
        f"{ready} of {len(rows)} backbones are offline-ready (weights on disk now); "
        "`visiontune models --json` says where each one's weights are or come from"
    )
