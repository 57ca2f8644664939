"""The training job: fine-tune a pretrained backbone on an image dataset.

``train()`` is the table of contents; each phase is a function below it, in the order a run
goes through them (in the spirit of torchvision's references/classification/train.py and
torchtune's recipes):

    prepare the run directory and config      RunDir (visiontune.run), _resolve_runtime, _open_run
    load_data                                 splits, recorded with the run
    setup_model                               registry backbone + fresh head, trainable layers
    setup_data                                image loaders, or cached backbone features
    setup_optimization                        optimizer, schedule, scaler, loss
    distribute                                DistributedDataParallel under torchrun
    train_one_epoch / validate / end_epoch    the loop, written out
    save_checkpoint                           everything exact resume needs
    export_best                               the best epoch evaluated and written as RUN/model

Callbacks (``visiontune.callbacks``) are the only extension point: the debugger, profiler,
trackers and tuner subscribe to events; the loop never branches on who listens, and
``on_train_end`` fires on every exit.

Several processes (torchrun, ``visiontune.dist``) run this same job, one per device: the step
module is wrapped in DistributedDataParallel, each rank takes its shard of every global batch,
running sums and evaluation are gathered so every rank sees the whole job's numbers, rank 0
alone writes the run directory (the others get a read-only view of it), and a group that
torchrun restarted resumes from the last checkpoint. With one process every collective is the
identity and the job is what it always was.

Resuming is exact. Each epoch visits a permutation drawn from (seed, epoch); each sample's
augmentation is seeded from (seed, epoch, index); the checkpoint holds model, optimizer,
schedule, scaler, RNG states and the loop state (position inside the epoch, the epoch's
running sums, the best epoch so far). A run killed mid-epoch and resumed ends with the same
metrics as one that never stopped.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import random
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset

from visiontune import dist
from visiontune import features as feature_cache
from visiontune.callbacks import Callback, CallbackList, TrainState, resolve_callbacks
from visiontune.config import Resolved, TrainConfig
from visiontune.data.splits import POOL
from visiontune.device import autocast, autocast_dtype, default_workers, resolve_device
from visiontune.errors import UserError
from visiontune.evaluate import classification_metrics, collect_logits
from visiontune.heads import WeightAverager, merged_state_dict
from visiontune.run import RunDir

# Config keys a resumed run may change: they do not change what the run computes.
RESUMABLE_CHANGES = frozenset(
    {
        "output", "endpoint_url", "s3_cache", "workers", "progress", "checkpoint_every_steps",
        "callbacks", "debugger", "profiler", "report", "resolved", "collective_timeout",
        "tracking",
    }
)  # fmt: skip


class TrainingInterrupted(Exception):
    """SIGTERM/SIGINT arrived: a checkpoint was saved and the run can be resumed."""

    def __init__(self, run_dir: Path | str, signum: int):
        self.run_dir = run_dir
        self.signum = signum
        super().__init__(
            f"stopped by {signal.Signals(signum).name}; checkpoint saved, resume with "
            f"`visiontune train --resume {run_dir}`"
        )


@dataclass
class TrainResult:
    """What a finished (or stopped) training run produced."""

    run_dir: Path
    model_dir: Path | None
    best_epoch: int | None
    best_metrics: dict[str, float]
    history: list[dict[str, float]]
    test_metrics: dict[str, Any] | None
    stop_reason: str | None
    bad_images: int = 0
    used_feature_cache: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Runtime:
    """What ``auto`` became here: device, autocast dtype, loader workers."""

    device: torch.device
    amp_dtype: torch.dtype | None
    workers: int

    @property
    def precision(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.amp_dtype]


@dataclass
class Data:
    """The dataset as this run sees it: the index and the splits it trains and evaluates on."""

    index: Any  # visiontune.data.folder.DatasetIndex
    splits: dict[str, list]
    # Cross-validation or refit: the rows of splits["pool"] that train and valid are.
    pool_rows: dict[str, list[int]] | None = None

    @property
    def class_names(self) -> list[str]:
        return list(self.index.class_names)

    @property
    def num_classes(self) -> int:
        return len(self.index.class_ids)

    def view(self) -> _SplitView:
        return _SplitView(self.index, self.splits)

    @functools.cached_property
    def fingerprint(self) -> dict[str, Any]:
        """What a checkpoint records of the data it was trained on: the classes, and per split
        the number of images and a digest of which images (by path under the root) with which
        labels. Contents are not read: a copy of the folder elsewhere is the same data. Once
        per run: every checkpoint records it."""
        root = self.index.root.rstrip("/")
        splits = {}
        for name, items in sorted(self.splits.items()):
            rows = [(str(uri).removeprefix(root), int(label)) for uri, label in items]
            digest = hashlib.sha256(json.dumps(rows, separators=(",", ":")).encode()).hexdigest()
            splits[name] = {"count": len(items), "sha256": digest}
        return {"classes": list(self.index.class_ids), "splits": splits}


@dataclass
class Loaders:
    """The training stream and evaluation loaders, over images or cached features."""

    train: DataLoader
    sampler: EpochSampler
    make_eval: Callable[[str], DataLoader]
    step_model: nn.Module  # the whole model, or its head when features are cached
    uses_feature_cache: bool
    # What a training step calls: step_model, under DistributedDataParallel with several ranks.
    trainer: nn.Module | None = None
    # Every cached training feature at once (head=probe fits on them full-batch).
    train_tensors: TensorDataset | None = None


@dataclass
class Optimization:
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    loss_fn: nn.Module
    better: Callable[[float, float], bool]


@dataclass
class Job:
    """Everything the phases share, built once by :func:`train`."""

    cfg: TrainConfig
    run: RunDir
    runtime: Runtime
    state: TrainState
    cbs: CallbackList
    progress: _Progress
    signals: list[int]
    dist: dist.Group = field(default_factory=dist.Group)
    data: Data | None = None
    model: nn.Module | None = None
    loaders: Loaders | None = None
    opt: Optimization | None = None
    last_eval: tuple[torch.Tensor, torch.Tensor] | None = None  # logits, labels of validate()
    averager: WeightAverager | None = None  # weight_averaging: ema | swa


# --------------------------------------------------------------------------------------------
# The job


def train(
    cfg: TrainConfig,
    callbacks: Sequence[Callback] = (),
    *,
    resume: bool = False,
) -> TrainResult:
    """Run a training job described by ``cfg``; write everything under ``cfg.output``.

    Args:
        cfg: the validated config.
        callbacks: listeners for loop events besides those the config names (the tuner's
            reporter, a notebook's own); see ``visiontune.callbacks``.
        resume: continue the run in ``cfg.output`` from its last good checkpoint.

    Raises:
        UserError: bad data, bad options, an existing run directory without ``resume``, or a
            resume that would change the run's hyperparameters.
        TrainingInterrupted: SIGTERM/SIGINT; a checkpoint was saved first.
    """
    runtime, group = _resolve_runtime(cfg)  # joins torchrun's process group when launched by it
    run = RunDir.open(cfg.output, cfg.endpoint_url)
    with run.only_writer(group.is_main):  # one process writes a run: rank 0 of one job
        return _train(cfg, callbacks, resume, runtime, group, run)


def _train(
    cfg: TrainConfig,
    callbacks: Sequence[Callback],
    resume: bool,
    runtime: Runtime,
    group: dist.Group,
    run: RunDir,
) -> TrainResult:
    """:func:`train` once its run directory is this process's alone."""
    from visiontune.models.registry import get_spec

    # Rank 0 reads the run directory; the others get what it found (or its failure).
    cfg, checkpoint, resume = group.on_main(lambda: _open_run(run, cfg, resume, group))
    run = run.for_rank(group.rank)
    preprocess = get_spec(cfg.model).preprocess_for(cfg.image_size)  # fails before compute
    state = TrainState(
        config=cfg,
        run_dir=run.path,
        device=runtime.device,
        precision=runtime.precision,
        workers=runtime.workers,
        resumed=resume,
        rank=group.rank,
        world_size=group.world_size,
    )
    signals, restore_signals = _signal_guard()
    progress = _Progress(cfg.progress and group.is_main)
    job = Job(cfg, run, runtime, state, CallbackList(), progress, signals, group)
    result: TrainResult | None = None
    try:
        # Callbacks the config names (debugger, profiler, trackers) write files: rank 0 only.
        named = resolve_callbacks(cfg, callbacks) if group.is_main else list(callbacks)
        job.cbs = CallbackList(named)
        with run.starting():  # a start that fails here leaves no run folder behind
            run.record_job(dist.job_id())  # how a group torchrun restarts finds its own run
            job.data = group.on_main(lambda: load_data(cfg, run, resume))
            if checkpoint is not None:
                check_same_data(job.data, checkpoint, run)
            cfg = _small_data_defaults(job)
            setup_model(job)
        job.cbs.fire("on_train_start", state)
        setup_data(job, preprocess)
        _record_config(job)
        setup_optimization(job)
        distribute(job)
        if checkpoint is not None:
            restore_checkpoint(job, checkpoint)
        else:
            run.reset_metrics()
        while state.epoch < cfg.epochs and state.stop_reason is None:
            train_one_epoch(job)
            end_epoch(job, validate(job, "valid"))
        result = export_best(job, preprocess)
        return result
    except BaseException as e:
        state.error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if isinstance(e, TrainingInterrupted):
            state.stop_reason = state.stop_reason or signal.Signals(e.signum).name
        raise
    finally:
        restore_signals()
        job.progress.close()
        _finish(job, result)


# --------------------------------------------------------------------------------------------
# Phases, in the order train() calls them


def _open_run(
    run: RunDir, cfg: TrainConfig, resume: bool, group: dist.Group
) -> tuple[TrainConfig, dict[str, Any] | None, bool]:
    """May this run start (or resume)? Returns the config, the checkpoint to resume from and
    whether it resumes.

    A group that torchrun restarted after a rank failed runs the same command again: it
    resumes its own run from the last good checkpoint (or starts it over when none was
    written yet), recognised by the job id recorded when the run started.
    """
    if group.restart_count and not resume and run.started_by(dist.job_id()):
        resume = run.has_checkpoint()
        if not resume:
            run.clear()  # this job's own run, stopped before its first checkpoint
    if not resume:
        check_output_outside_data(cfg.output, cfg.data)
    run.check_can_start(resume)
    checkpoint = None
    if resume:
        cfg = _check_resume_changes(run, cfg)
        checkpoint = run.load_checkpoint()  # a damaged one fails (or falls back) right away
    return cfg, checkpoint, resume


def check_output_outside_data(output: str, data: str) -> None:
    """Refuse a run directory inside the dataset (or the dataset itself).

    Nothing is ever written inside a dataset: there the run's folders (``checkpoints/``,
    ``model/``, or the run folder itself in a root of class folders) read as classes without
    images, and every later run on the data fails until they are removed.

    Raises:
        UserError: ``output`` is ``data`` or inside it (local paths, or ``s3://`` prefixes).
    """
    from visiontune.uri import is_remote, scheme_of

    if is_remote(data) or is_remote(output):
        if scheme_of(data) != "s3" or scheme_of(output) != "s3":
            return  # an http(s) archive is extracted into the cache; nothing lands beside it
        inside = (output.rstrip("/") + "/").startswith(data.rstrip("/") + "/")
    else:
        root = Path(data.removeprefix("file://"))
        if not root.is_dir():
            return  # a dataset name: fetched into the cache, not a folder the run could be in
        out = Path(output.removeprefix("file://")).resolve()
        root = root.resolve()
        inside = out == root or root in out.parents
    if inside:
        raise UserError(
            f"--output {output} is inside the dataset {data}: the run's folders would read as "
            "classes there; choose an --output outside the dataset"
        )


def _check_resume_changes(run: RunDir, cfg: TrainConfig) -> TrainConfig:
    """A resumed run keeps its hyperparameters: a changed one is refused, never ignored."""
    from visiontune.config import load_saved_config

    if not run.config_path.is_file():
        raise UserError(f"nothing to resume: {run.config_path} does not exist")
    saved = load_saved_config(run.config_path).model_dump(mode="json")
    # Options this call leaves at default are the run's own (small data may have changed them
    # when it started); only what the call sets can differ, and is checked below.
    chosen = cfg.model_fields_set
    asked = {
        k: v if k in chosen else saved.get(k, v) for k, v in cfg.model_dump(mode="json").items()
    }
    cfg = TrainConfig.model_validate(asked)
    if run.is_finished() and cfg.epochs <= saved["epochs"]:
        raise UserError(
            f"{run} is finished (its model is in {run.model_dir}); nothing to resume. "
            "Give more --epochs to train on, or start a new run with another --output"
        )
    if cfg.epochs != saved["epochs"]:
        if cfg.epochs < saved["epochs"]:
            raise UserError(
                f"--resume cannot shorten a run: it has {saved['epochs']} epochs, asked "
                f"{cfg.epochs}; start a new run (--output) instead"
            )
        print(
            f"extending {run} from {saved['epochs']} to {cfg.epochs} epochs (the learning-rate "
            "schedule is recomputed over the new length)",
            file=sys.stderr,
        )
    changed = [
        k for k in asked if k not in RESUMABLE_CHANGES | {"epochs"} and asked[k] != saved.get(k)
    ]
    if changed:
        k = changed[0]
        raise UserError(
            f"--resume keeps the run's hyperparameters: {k} is {asked[k]!r} here but "
            f"{saved.get(k)!r} in {run.config_path}; start a new run (--output) to change it"
        )
    return cfg


def _resolve_runtime(cfg: TrainConfig) -> tuple[Runtime, dist.Group]:
    """Device, precision and loader workers; under torchrun, the process group too (each rank
    on its own GPU, the CPU cores shared out between the ranks of a machine)."""
    device = resolve_device(cfg.device)
    group = dist.setup(device, cfg.collective_timeout)
    device = dist.rank_device(group, device)
    if cfg.workers is not None:
        workers = cfg.workers
    else:
        workers = max(1, default_workers() // group.local_world_size)
    return Runtime(device, autocast_dtype(device, cfg.precision), workers), group


def load_data(cfg: TrainConfig, run: RunDir, resume: bool) -> Data:
    """Discover the dataset and the splits this run uses (recorded in the run directory)."""
    from visiontune.data.folder import discover
    from visiontune.data.splits import check_recorded_settings, pooled_splits, resolve_splits

    check_recorded_settings(run.path, cfg.split_ratios, cfg.split_seed)
    index = discover(
        cfg.data,
        endpoint_url=cfg.endpoint_url,
        split_ratios=cfg.split_ratios,
        split_seed=cfg.split_seed,
        record_dir=run.path,
        limit_per_class=cfg.limit_per_class,
    )
    num_classes = len(index.class_ids)
    if num_classes < 2:
        raise UserError(f"{cfg.data} has {num_classes} class; a classifier needs at least 2")
    pooled = cfg.cv_folds is not None or cfg.refit
    splits = resolve_splits(index, cfg.split_seed, announce=not pooled)
    pool_rows = None
    if pooled:  # cross-validation or refit: folds of train+valid, test untouched
        splits, pool_rows = pooled_splits(
            splits, cfg.split_seed, cfg.cv_folds, cfg.cv_fold, index.class_names
        )
    return Data(index, splits, pool_rows)


def check_same_data(data: Data, checkpoint: dict[str, Any], run: RunDir) -> None:
    """A resumed run trains on the data it started with.

    ``--resume`` refuses another ``--data``; this refuses the same folder with other contents
    (a class folder added, images added or removed), which would otherwise fail on the head's
    shape with a traceback or quietly resume over other images. Checkpoints written before the
    data was recorded are not checked.

    Raises:
        UserError: the classes or the images of a split differ from the checkpoint's.
    """
    then = checkpoint.get("data")
    if not isinstance(then, dict):
        return
    now = data.fingerprint
    problem = None
    if then.get("classes") != now["classes"]:
        problem = (
            f"its classes were {', '.join(map(str, then.get('classes') or []))}, "
            f"now {', '.join(now['classes'])}"
        )
    else:
        before = then.get("splits") or {}
        for name in sorted(set(before) | set(now["splits"])):
            old, new = before.get(name) or {}, now["splits"].get(name) or {}
            if old.get("sha256") == new.get("sha256"):
                continue
            n_old, n_new = old.get("count", 0), new.get("count", 0)
            problem = (
                f"its {name} split had {n_old} images, now {n_new}"
                if n_old != n_new
                else f"the images of its {name} split are not the ones it started with"
            )
            break
    if problem:
        raise UserError(
            f"{run} was training on other data: {problem}; a resumed run keeps its data, so "
            "restore it or start a new run (--output)"
        )


def _small_data_defaults(job: Job) -> TrainConfig:
    """On a small data set, the options the user left at default that small data changes
    (``visiontune.smalldata``), said in one line; then the batch must fit the training split."""
    from visiontune import smalldata

    n_train = len(job.data.splits["train"])
    cfg, line = smalldata.apply(job.cfg, n_train, job.data.num_classes)
    if line:
        _say(job, line)
        job.cfg = job.state.config = cfg
    if cfg.batch_size > n_train:
        raise UserError(
            f"batch_size {cfg.batch_size} is larger than the training split ({n_train} images)"
        )
    return cfg


def setup_model(job: Job) -> None:
    """The registry's backbone with a fresh head, seeded; trainable layers set."""
    from visiontune.models.registry import build_model, set_trainable

    cfg, device = job.cfg, job.runtime.device
    torch.manual_seed(cfg.seed)  # a fresh head (or random backbone) is the same per seed
    model, _ = build_model(
        cfg.model,
        job.data.num_classes,
        weights=cfg.weights,
        dropout=cfg.dropout,
        head=cfg.head,
        head_hidden=cfg.head_hidden,
    )
    set_trainable(model, cfg.trainable)
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    job.model = model
    s = job.state
    s.model, s.num_classes, s.class_names = model, job.data.num_classes, job.data.class_names


def setup_data(job: Job, preprocess) -> None:
    """Loaders over cached backbone features (frozen, no augmentation) or over images."""
    from visiontune.data.folder import ImageDataset, collate_skip_bad
    from visiontune.data.transforms import eval_transform, train_transform

    cfg, data, model, rt, group = job.cfg, job.data, job.model, job.runtime, job.dist
    torch.manual_seed(cfg.seed)
    batch = dist.per_rank_batch(cfg.batch_size, group.world_size)
    eval_batch = max(cfg.batch_size, 64)

    def image_loader(
        split: str, transform, batch: int | None, sampler=None, seeded=False, views=None
    ):
        ds = ImageDataset(
            data.view(), split, transform, decode_size=preprocess.resize_size,
            s3_cache=cfg.s3_cache,
        )  # fmt: skip
        if views is not None:  # augmented views for the feature cache, each seeded on its own
            ds = feature_cache.AugmentedViews(ds, cfg.seed, views)
        if batch is None:  # evaluation: the same batches as one process, dealt to the ranks
            sampler = dist.ShardedBatches(len(ds), eval_batch, group.rank, group.world_size)
        return DataLoader(
            SeededSamples(ds) if seeded else ds,
            **({"batch_size": batch, "sampler": sampler} if batch else {"batch_sampler": sampler}),
            num_workers=rt.workers,
            collate_fn=collate_skip_bad,
            pin_memory=rt.device.type == "cuda",
            persistent_workers=rt.workers > 0 and seeded,
            prefetch_factor=4 if rt.workers > 0 else None,
            # Its own generator: starting an iterator must not draw from the global RNG,
            # or a resumed run's dropout stream would shift.
            generator=torch.Generator().manual_seed(cfg.seed),
        )

    shard = {"rank": group.rank, "world_size": group.world_size}
    if not cfg.uses_feature_cache:
        sampler = EpochSampler(len(data.splits["train"]), cfg.seed, **shard)
        train_loader = image_loader(
            "train", train_transform(preprocess, cfg.augment), batch, sampler, True
        )
        job.loaders = Loaders(
            train_loader,
            sampler,
            lambda split: image_loader(split, eval_transform(preprocess), None),
            model,
            False,
        )
    else:
        tensors = {}
        if data.pool_rows is not None:
            pool_loader = image_loader(POOL, eval_transform(preprocess), None)
            tensors = _pooled_features(job, pool_loader, preprocess)
        for split in ("train", "valid", "test"):
            if data.splits.get(split) and split not in tensors:
                loader = image_loader(split, eval_transform(preprocess), None)
                tensors[split] = _cached_features(job, split, loader, preprocess)
        train_set: Dataset = SeededSamples(tensors["train"], seeded=False)
        if cfg.uses_feature_views:
            augment = train_transform(preprocess, cfg.augment)
            # Under cross-validation the views are the pool's (once for every fold), indexed.
            where = POOL if data.pool_rows is not None else "train"
            train_set = _cached_views(
                job, where, preprocess,
                lambda views: image_loader(where, augment, None, views=views),
            )  # fmt: skip
            if data.pool_rows is not None:
                train_set = train_set.rows(data.pool_rows["train"])
        sampler = EpochSampler(len(train_set), cfg.seed, **shard)
        train_loader = DataLoader(
            train_set,
            batch_size=batch,
            sampler=sampler,
            collate_fn=_tensor_collate,
            generator=torch.Generator().manual_seed(cfg.seed),
        )

        def feature_loader(split: str) -> DataLoader:
            batches = dist.ShardedBatches(len(tensors[split]), 4096, **shard)
            return DataLoader(tensors[split], batch_sampler=batches, collate_fn=_tensor_collate)

        job.loaders = Loaders(train_loader, sampler, feature_loader, model.head, True)
        job.loaders.train_tensors = tensors["train"]
        if isinstance(train_set, feature_cache.ViewFeatures):  # a probe fits on every view
            views = train_set.views
            job.loaders.train_tensors = TensorDataset(
                views.reshape(-1, views.shape[-1]), train_set.labels.repeat(views.shape[0])
            )
    s = job.state
    s.step_model, s.uses_feature_cache = job.loaders.step_model, job.loaders.uses_feature_cache


def _feature_key(job: Job, split: str, preprocess, **extra: Any) -> str:
    """The cache key of ``split``'s features: everything that decides them (plus ``extra``)."""
    cfg = job.cfg
    return feature_cache.feature_key(
        model=cfg.model,
        weights=feature_cache.weights_key(cfg.weights),
        seed=cfg.seed if cfg.weights == "none" else None,  # a random backbone differs per seed
        preprocess=preprocess.to_dict(),
        precision=str(job.runtime.amp_dtype),
        data=job.data.view().fingerprint(split),
        **extra,
    )


def _cached_features(job: Job, split: str, loader: DataLoader, preprocess) -> TensorDataset:
    """Backbone features of ``split``, from the cache or computed now (with a progress bar)."""
    key = _feature_key(job, split, preprocess)
    found = feature_cache.load(key)
    # Any rank without them (another machine's cache): all compute their shard, then share.
    if job.dist.any(found is None):
        f, y, bad = _compute_features(job, split, f"features {split}", loader)
        if job.dist.local_rank == 0:  # one writer per machine's cache
            feature_cache.save(key, f, y, bad)
    else:
        f, y, bad = found
    if split == "train":
        job.state.bad_images += bad
    return TensorDataset(f, y)


def _compute_features(
    job: Job, split: str, label: str, loader: DataLoader
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The backbone over ``loader`` (a ``dist.ShardedBatches`` loader): each rank computes its
    batches, every rank gets all rows in order, and the bad-image count of all."""
    cfg, state, rt = job.cfg, job.state, job.runtime
    state.phase = "features"
    job.cbs.fire("on_features_start", state, split, job.model.backbone)
    batches = dist.BatchSizes(loader)
    with job.progress.task(label, loader.batch_sampler.num_samples) as advance:
        f, y, bad = feature_cache.compute(
            job.model.backbone, batches, rt.device, rt.amp_dtype, cfg.channels_last, advance
        )
    f, y = job.dist.gather_batches([f, y], batches.sizes, loader.batch_sampler.num_batches)
    bad = sum(job.dist.all_gather(bad))
    job.cbs.fire("on_features_end", state, split)
    state.phase = "init"
    return f, y, bad


def _cached_views(
    job: Job, split: str, preprocess, views_loader: Callable[[list[int]], DataLoader]
) -> feature_cache.ViewFeatures:
    """Backbone features of ``augment_views`` augmented views of every image of ``split``
    (train, or the train+valid pool under cross-validation): those in the cache are read, the
    missing ones computed in one sharded pass and stored, one entry per view (so a later run
    with more views reuses these)."""
    cfg = job.cfg
    keys = [
        _feature_key(job, split, preprocess, augment=cfg.augment, view=v, view_seed=cfg.seed)
        for v in range(cfg.augment_views)
    ]
    found = [feature_cache.load(k) for k in keys]
    # A view any rank lacks is computed by all (each their shard), as for the plain features.
    missing = [v for v, got in enumerate(found) if job.dist.any(got is None)]
    if missing:
        loader = views_loader(missing)
        images = len(loader.dataset) // len(missing)
        refused: UserError | None = None
        try:
            feature_cache.check_views_fit(
                cfg.augment_views,
                images,
                job.model.feature_dim,
                processes=job.dist.local_world_size,
            )
        except UserError as e:
            refused = e
        # Every rank stops, or none: one rank short of memory must not leave the others
        # waiting in the views pass's collectives.
        if job.dist.any(refused is not None):
            raise refused or UserError(
                f"augment_views {cfg.augment_views}: another rank lacks the memory for the "
                "views' features: use fewer views"
            )
        span = f"{missing[0] + 1}-{missing[-1] + 1}" if len(missing) > 1 else f"{missing[0] + 1}"
        f, y, bad = _compute_features(job, "train_views", f"features train views {span}", loader)
        # View-major rows; a bad image is bad in every view, so each view has the same rows.
        f, y = f.chunk(len(missing)), y.chunk(len(missing))
        for j, v in enumerate(missing):
            found[v] = (f[j], y[j], bad // len(missing))
            if job.dist.local_rank == 0:
                feature_cache.save(keys[v], *found[v])
    labels = found[0][1]
    return feature_cache.ViewFeatures(torch.stack([f for f, _, _ in found]), labels)


def _pooled_features(job: Job, loader: DataLoader, preprocess) -> dict[str, TensorDataset]:
    """Cross-validation and refit: the features of train+valid pooled, computed once under the
    pool's content (every fold of every trial reads the same entry), and each split its rows."""
    pool = _cached_features(job, POOL, loader, preprocess)
    n = len(job.data.splits[POOL])
    if len(pool) != n:
        raise UserError(
            f"{n - len(pool)} image(s) of train+valid could not be decoded, so the folds cannot "
            f"index the pool's features; run `visiontune data check {job.cfg.data}` and remove them"
        )
    features, labels = pool.tensors
    return {
        split: TensorDataset(features[rows], labels[rows])
        for split, rows in job.data.pool_rows.items()
        if rows
    }


def _record_config(job: Job) -> None:
    """Say in one line what auto became, and record it in config.yaml (and later model.json)."""
    cfg, rt, world = job.cfg, job.runtime, job.dist.world_size
    cfg.resolved = Resolved(
        device=str(rt.device),
        precision=rt.precision,
        workers=rt.workers,
        batch_size=cfg.batch_size,
        uses_feature_cache=job.loaders.uses_feature_cache,
    )
    job.run.save_config(cfg)
    what = "cached backbone features" if job.loaders.uses_feature_cache else "images"
    if job.loaders.uses_feature_cache and cfg.uses_feature_views:
        what += f", {cfg.augment_views} augmented views ({cfg.augment}) per training image"
    where = f"{rt.device}" if world == 1 else f"{world} processes ({rt.device.type}, torchrun)"
    batch = "" if world == 1 else f" ({cfg.batch_size // world} per process; lr not rescaled)"
    _say(
        job,
        f"training {cfg.model} ({cfg.trainable}) on {where} in {rt.precision}, "
        f"{rt.workers} loader workers, batch size {cfg.batch_size}{batch}, from {what}",
    )


def _say(job: Job, line: str) -> None:
    """One line on stderr, from rank 0 only (the others would repeat it)."""
    if job.dist.is_main:
        print(line, file=sys.stderr)


def setup_optimization(job: Job) -> None:
    cfg = job.cfg
    steps_per_epoch = math.ceil(len(job.loaders.sampler) / job.loaders.train.batch_size)
    if cfg.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)
    if cfg.head == "probe":
        steps_per_epoch = 1  # one full-batch L-BFGS fit (see _probe_epoch)
    optimizer = build_optimizer(cfg, job.model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_multiplier(cfg, steps_per_epoch * cfg.epochs, steps_per_epoch)
    )
    device = job.runtime.device
    scaler = torch.amp.GradScaler(device.type, enabled=job.runtime.amp_dtype == torch.float16)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    better = (lambda a, b: a < b) if cfg.monitor_mode == "min" else (lambda a, b: a > b)
    job.opt = Optimization(optimizer, scheduler, scaler, loss_fn, better)
    job.state.optimizer, job.state.steps_per_epoch = optimizer, steps_per_epoch
    if cfg.weight_averaging != "none":
        # The trainable part: the head over cached features, else the whole model (its frozen
        # layers average to themselves).
        job.averager = WeightAverager(
            job.loaders.step_model, cfg.weight_averaging, cfg.ema_decay, cfg.swa_start, cfg.epochs
        )


def distribute(job: Job) -> None:
    """Under torchrun: DistributedDataParallel on the step module (the head alone over cached
    features; a frozen backbone's parameters are not reduced), and each rank its own dropout
    stream. With one process the step module runs as it is."""
    cfg, group, loaders = job.cfg, job.dist, job.loaders
    loaders.trainer = dist.wrap(
        loaders.step_model,
        group,
        job.runtime.device,
        sync_bn=cfg.sync_batchnorm,
        # A frozen backbone's batch-norm statistics never change: nothing to broadcast.
        broadcast_buffers=not cfg.frozen_backbone,
    )
    if group.rank:
        torch.manual_seed(cfg.seed + group.rank)


def _kept_weights(job: Job, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What a checkpoint or the best epoch keeps of the model's ``weights``: all of them, or
    the head alone when the backbone only ever ran to make cached features and the config
    rebuilds the same one (ImageNet or seeded random weights, not a file that could change).
    A frozen backbone is most of a small model's checkpoint: writing it every epoch was most
    of a cached-feature run's time (a cross-validated trial writes one per fold and epoch)."""
    if _keeps_head_only(job):
        return {k: v for k, v in weights.items() if k.startswith("head.")}
    return weights


def _keeps_head_only(job: Job) -> bool:
    return job.loaders.uses_feature_cache and job.cfg.weights in ("imagenet", "none")


def _load_weights(job: Job, weights: dict[str, torch.Tensor]) -> None:
    """Load what :func:`_kept_weights` kept: a head alone leaves the rebuilt backbone as is."""
    device = next(job.model.parameters()).device
    missing, unexpected = job.model.load_state_dict(
        {k: v.to(device) for k, v in weights.items()}, strict=False
    )
    if unexpected or (missing and not _keeps_head_only(job)):
        raise UserError(
            f"the saved weights do not fit {job.cfg.model}: "
            f"{(unexpected or missing)[0]} is {'unexpected' if unexpected else 'missing'}"
        )


def restore_checkpoint(job: Job, ck: dict[str, Any]) -> None:
    _load_weights(job, ck["model"])
    if job.averager is not None:
        if "averaged" not in ck:
            raise UserError(
                "the checkpoint holds no averaged weights; it predates weight_averaging"
            )
        job.averager.load_state_dict(ck["averaged"])
    job.opt.optimizer.load_state_dict(ck["optimizer"])
    job.opt.scheduler.load_state_dict(ck["scheduler"])
    job.opt.scaler.load_state_dict(ck["scaler"])
    group = job.dist
    # Every rank's RNG state is in the checkpoint (rank 0's alone for a one-process run).
    rngs = ck.get("rank_rng") or [ck["rng"]]
    _set_rng_state(rngs[group.rank % len(rngs)])
    if len(rngs) != group.world_size:
        if group.rank >= len(rngs):
            torch.manual_seed(job.cfg.seed + group.rank)
        _say(
            job,
            f"warning: resuming a {len(rngs)}-process run on {group.world_size}: the data order "
            "is exact, dropout's random stream is not",
        )
    job.state.load_state_dict(ck)
    job.run.truncate_metrics(job.state.step)
    _say(
        job, f"resuming {job.run} at epoch {job.state.epoch + 1}, batch {job.state.batch_in_epoch}"
    )


def save_checkpoint(job: Job) -> None:
    """Everything exact resume needs, written so a kill mid-write leaves the previous one."""
    state = job.state
    state.phase = "checkpoint"
    job.cbs.fire("on_checkpoint_start", state)
    rngs = job.dist.all_gather(_rng_state())  # every rank's, so resume is exact on each
    path = job.run.save_checkpoint(
        {
            "model": _kept_weights(job, job.model.state_dict()),
            "optimizer": job.opt.optimizer.state_dict(),
            "scheduler": job.opt.scheduler.state_dict(),
            "scaler": job.opt.scaler.state_dict(),
            **({"averaged": job.averager.state_dict()} if job.averager else {}),
            "rng": rngs[0],
            **({"rank_rng": rngs} if len(rngs) > 1 else {}),
            "data": job.data.fingerprint,
            **state.state_dict(),
        }
    )
    job.cbs.fire("on_checkpoint", state, str(path))
    job.run.sync()
    job.dist.barrier()  # no rank moves on before the checkpoint is on disk
    state.phase = "train"


def train_one_epoch(job: Job) -> None:
    """One pass over the epoch's permutation (from where a resumed run stopped)."""
    if job.cfg.head == "probe":
        _probe_epoch(job)
        return
    cfg, state, cbs, rt, opt = job.cfg, job.state, job.cbs, job.runtime, job.opt
    device, model, step_model = rt.device, job.model, job.loaders.step_model
    fire_batch, fire_start = cbs.listens("on_batch_start"), cbs.listens("on_step_start")
    fire_before = cbs.listens("on_before_backward")
    fire_after, fire_end = cbs.listens("on_after_backward"), cbs.listens("on_step_end")
    trainer, group = job.loaders.trainer or step_model, job.dist
    params = [p for g in opt.optimizer.param_groups for p in g["params"]]
    batch = job.loaders.train.batch_size  # this rank's share of the global batch
    job.loaders.sampler.set_epoch(state.epoch, state.batch_in_epoch * batch)
    state.phase = "train"
    cbs.fire("on_epoch_start", state)
    trainer.train()
    t0 = time.perf_counter()
    seen_at_start = state.sums["count"]
    # Running sums stay on the device: no host sync per step.
    loss_sum = torch.zeros((), device=device)
    correct_sum = torch.zeros((), device=device, dtype=torch.long)
    count = bad_here = 0  # bad_here: this rank's skipped images since the last fold
    task = job.progress.start(state.epoch, cfg.epochs, state.steps_per_epoch, state.batch_in_epoch)
    data_iter = iter(job.loaders.train)
    while state.batch_in_epoch < state.steps_per_epoch:
        if fire_batch:
            cbs.fire("on_batch_start", state)
        try:
            inputs, targets, bad = next(data_iter)
        except StopIteration:
            break
        state.bad_images += bad
        bad_here += bad
        # Ranks step together: a batch with nothing decodable on any rank is skipped by all.
        if group.any(targets.numel() == 0):
            state.batch_in_epoch += 1
            continue
        inputs = inputs.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if cfg.channels_last and inputs.dim() == 4:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        if fire_start:
            cbs.fire("on_step_start", state, (inputs, targets))
        with autocast(device, rt.amp_dtype):
            outputs = trainer(inputs)
            loss = opt.loss_fn(outputs.float(), targets)
        if fire_before:
            cbs.fire("on_before_backward", state, outputs, loss)
        opt.optimizer.zero_grad(set_to_none=True)
        opt.scaler.scale(loss).backward()
        if opt.scaler.is_enabled() and (fire_after or cfg.grad_clip):
            opt.scaler.unscale_(opt.optimizer)  # callbacks and clipping see true gradients
        if fire_after:
            cbs.fire("on_after_backward", state, model)
        if cfg.grad_clip:
            nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.scaler.step(opt.optimizer)
        opt.scaler.update()
        opt.scheduler.step()
        if job.averager is not None:
            job.averager.after_step(state.epoch)
        state.step += 1
        state.batch_in_epoch += 1
        n = targets.shape[0]
        count += n
        loss_sum += loss.detach() * n
        correct_sum += (outputs.detach().argmax(1) == targets).sum()
        if fire_end:
            cbs.fire("on_step_end", state, (inputs, targets), outputs, loss)
        job.progress.advance(task, n, loss_sum, count, state.sums)
        signum = _agreed_signal(job)  # all ranks stop at the same step
        if signum or (cfg.checkpoint_every_steps and state.step % cfg.checkpoint_every_steps == 0):
            _fold(job, loss_sum, correct_sum, count, bad_here)
            loss_sum.zero_()
            correct_sum.zero_()
            count = bad_here = 0
            save_checkpoint(job)
            if signum:
                raise TrainingInterrupted(job.run, signum)
    _fold(job, loss_sum, correct_sum, count, bad_here)
    job.progress.stop(task)
    _close_epoch(job, t0, seen_at_start)


def _close_epoch(job: Job, t0: float, seen_at_start: float) -> None:
    """End of an epoch's training pass: the average takes its epoch, the speed is recorded."""
    state = job.state
    if job.averager is not None:
        job.averager.after_epoch(state.epoch)
    epoch_time = time.perf_counter() - t0
    seen = state.sums["count"] - seen_at_start
    state.last_metrics = {
        "images_per_sec": seen / epoch_time if epoch_time > 0 else 0.0,
        "epoch_time": epoch_time,
    }


def _probe_epoch(job: Job) -> None:
    """An epoch of ``head: probe``: one full-batch L-BFGS fit of the linear head on every
    cached training feature (``visiontune.heads.fit_probe``), as the epoch's one step.

    Each epoch warm-starts from the previous epoch's weights rather than fixing epochs to 1:
    the objective is strictly convex, so a converged fit stops after one gradient evaluation,
    a fit that ran out of iterations goes on where it stopped, and ``epochs``, checkpoints,
    metrics, callbacks and resume mean what they mean for any other head.
    """
    from visiontune.heads import fit_probe

    cfg, state, cbs = job.cfg, job.state, job.cbs
    state.phase = "train"
    cbs.fire("on_epoch_start", state)
    t0 = time.perf_counter()
    seen_at_start = state.sums["count"]
    if state.batch_in_epoch < state.steps_per_epoch:
        features, labels = job.loaders.train_tensors.tensors
        batch = (features, labels)
        cbs.fire("on_batch_start", state)
        cbs.fire("on_step_start", state, batch)
        job.loaders.step_model.train()
        fit = fit_probe(
            job.model.head[-1],
            features,
            labels,
            cfg.weight_decay,
            label_smoothing=cfg.label_smoothing,
        )
        labels = labels.to(fit.logits.device)
        loss = nn.functional.cross_entropy(fit.logits, labels)
        if not fit.converged:
            _say(
                job,
                f"warning: the probe did not converge in {fit.iterations} L-BFGS iterations "
                f"(largest gradient {fit.grad_max:.1e}); the next epoch continues the fit",
            )
        if job.averager is not None:
            job.averager.after_step(state.epoch)
        state.step += 1
        state.batch_in_epoch += 1
        n = labels.numel()
        state.sums = {
            "loss": state.sums["loss"] + float(loss) * n,
            "correct": state.sums["correct"] + float((fit.logits.argmax(1) == labels).sum()),
            "count": state.sums["count"] + n,
        }
        cbs.fire("on_step_end", state, batch, fit.logits, loss)
        signum = _agreed_signal(job)
        if signum:
            save_checkpoint(job)
            raise TrainingInterrupted(job.run, signum)
    _close_epoch(job, t0, seen_at_start)


def validate(job: Job, split: str) -> dict[str, Any]:
    """Metrics of the model on ``split`` (evaluation events fire around it); once weight
    averaging has started, of the averaged weights."""
    if not job.data.splits.get(split):
        return {}  # a refit holds nothing out: no validation metrics
    state, rt, previous = job.state, job.runtime, job.state.phase
    state.phase, state.eval_split = "eval", split
    job.cbs.fire("on_evaluation_start", state, split)
    loader = job.loaders.make_eval(split)
    batches = dist.BatchSizes(loader)  # this rank's share of the batches, gathered in order
    evaluated = job.loaders.step_model
    if job.averager is not None and job.averager.active(state.epoch):
        evaluated = job.averager.averaged_module
    logits, labels, _ = collect_logits(
        evaluated, batches, rt.device, rt.amp_dtype, job.cfg.channels_last
    )
    logits, labels = job.dist.gather_batches(
        [logits, labels], batches.sizes, loader.batch_sampler.num_batches
    )
    metrics = classification_metrics(logits, labels, job.data.class_names)
    job.last_eval = (logits, labels)
    job.cbs.fire("on_evaluation_end", state, split, metrics)
    state.phase, state.eval_split = previous, None
    return metrics


def _misclassified(job: Job, split: str, logits, labels, limit: int = 24) -> list[dict]:
    """The most confident mistakes on ``split``: image, true and predicted class (the run
    report shows them as thumbnails)."""
    items = job.data.splits[split]
    if len(items) != len(labels):
        return []  # undecodable images were skipped: paths no longer line up with rows
    conf, pred = logits.float().softmax(1).max(1)
    wrong = (pred != labels).nonzero().flatten()
    worst = wrong[conf[wrong].argsort(descending=True)][:limit].tolist()
    names = job.data.class_names
    return [
        {
            "image": str(items[i][0]),
            "true": names[int(labels[i])],
            "predicted": names[int(pred[i])],
            "probability": round(float(conf[i]), 4),
        }
        for i in worst
    ]


def end_epoch(job: Job, valid: dict[str, Any]) -> None:
    """Log the epoch, keep the best weights, apply early stopping, checkpoint."""
    cfg, state = job.cfg, job.state
    sums = state.sums
    metrics = {
        "epoch": state.epoch + 1,
        "train_loss": sums["loss"] / max(1, sums["count"]),
        "train_accuracy": sums["correct"] / max(1, sums["count"]),
        "valid_loss": valid.get("loss", float("nan")),
        "valid_accuracy": valid.get("accuracy", float("nan")),
        "valid_top5": valid.get("top5", float("nan")),
        "lr": job.opt.optimizer.param_groups[-1]["lr"],
        **state.last_metrics,
        "bad_images": state.bad_images,
    }
    if cfg.monitor not in metrics:
        raise UserError(
            f"monitor {cfg.monitor!r} is not a logged metric "
            f"(one of: {', '.join(k for k in metrics if k != 'epoch')})"
        )
    _log_epoch(job.run, state.step, metrics, logged_valid=bool(valid))
    state.history.append(metrics)
    state.last_metrics = metrics
    value = metrics[cfg.monitor]
    averager = job.averager
    # With weight averaging, only averaged epochs may be exported: earlier ones are logged but
    # are not candidates for the best epoch (nor count towards early stopping).
    candidate = averager is None or averager.active(state.epoch)
    # A non-finite training loss or weights (too high a learning rate; a finite loss can come
    # with a BatchNorm's running statistics blown up): these weights are no model, and
    # every further epoch would only compute NaNs. The run stops; export_best keeps the best
    # finite epoch, or says there is none.
    diverged = not math.isfinite(metrics["train_loss"]) or not _weights_finite(job.model)
    if diverged:
        state.stop_reason = state.stop_reason or "diverged"
    elif cfg.refit:
        # Nothing held out to choose by: the model is the last epoch (CV chose the epoch count).
        state.best_value, state.best_epoch, state.stale_epochs = None, state.epoch + 1, 0
    elif (
        candidate
        # a NaN would stay "best" for good: no later value compares better than it
        and math.isfinite(value)
        and (state.best_value is None or job.opt.better(value, state.best_value))
    ):
        state.best_value, state.best_epoch, state.stale_epochs = value, state.epoch + 1, 0
        if averager is None:
            job.run.save_best(_kept_weights(job, job.model.state_dict()))
        else:
            weights = merged_state_dict(job.model, averager.module, averager.averaged_module)
            job.run.save_best(_kept_weights(job, weights))
    elif candidate:
        state.stale_epochs += 1
    job.progress.epoch_line(metrics, cfg.epochs, state.best_epoch)
    job.cbs.fire("on_epoch_end", state, metrics)
    if cfg.early_stopping and state.stale_epochs >= cfg.early_stopping:
        state.stop_reason = state.stop_reason or "early_stopping"
    # A callback on one rank (the tuner's, a debugger rule on rank 0) may stop the job.
    state.stop_reason = job.dist.first(state.stop_reason)
    state.epoch += 1
    state.batch_in_epoch = 0
    state.sums = {"loss": 0.0, "correct": 0.0, "count": 0.0}
    save_checkpoint(job)
    signum = _agreed_signal(job)
    if signum:
        raise TrainingInterrupted(job.run, signum)


def _weights_finite(model: torch.nn.Module) -> bool:
    """Whether every floating-point parameter and buffer is finite (one host sync)."""
    tensors = [t for t in model.state_dict().values() if t.is_floating_point()]
    if not tensors:
        return True
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def _check_divergence_left_a_model(job: Job) -> None:
    """A diverged run exports its best finite epoch, saying so; with none (it diverged in its
    first epoch, or a refit, which keeps its last epoch) there is no model to write.

    Raises:
        UserError: no epoch before the divergence can be exported.
    """
    cfg, state = job.cfg, job.state
    last = state.history[-1]
    loss = last["train_loss"]
    why = f"train loss {loss}" if not math.isfinite(loss) else "weights not finite"
    where = f"training diverged in epoch {last['epoch']} ({why})"
    if cfg.refit or state.best_epoch is None:
        raise UserError(f"{where}; no model was written: lower the learning rate (--lr {cfg.lr:g})")
    _say(
        job,
        f"warning: {where} and stopped; the model is epoch {state.best_epoch}'s, the best "
        f"before it: a lower learning rate (--lr {cfg.lr:g}) may train further",
    )


def export_best(job: Job, preprocess) -> TrainResult:
    """Evaluate the best epoch on the test split (valid when there is none); write RUN/model."""
    cfg, state, run, model = job.cfg, job.state, job.run, job.model
    state.phase = "export"
    if state.stop_reason == "diverged":
        _check_divergence_left_a_model(job)
    job.cbs.fire("on_export_start", state)
    # A refit keeps its last epoch (nothing held out to choose by); only rank 0 has the file.
    best = None if cfg.refit else job.dist.on_main(run.load_best)
    if best is not None:
        _load_weights(job, best)
    elif cfg.refit and job.averager is not None and job.averager.active(state.epoch - 1):
        # a refit exports its last epoch's averaged weights
        model.load_state_dict(
            merged_state_dict(model, job.averager.module, job.averager.averaged_module)
        )
    # The best weights (averaged ones under weight averaging) are now the model's: evaluate and
    # export them, not the running average.
    job.averager = None
    # test; else valid; else (a refit with no test split) train, and the file name says so
    split = next(s for s in ("test", "valid", "train") if job.data.splits.get(s))
    test_metrics = validate(job, split)
    test_metrics["split"] = split
    test_metrics["misclassified"] = _misclassified(job, split, *job.last_eval)
    run.write_evaluation(split, test_metrics)
    best_metrics = next((h for h in state.history if h["epoch"] == state.best_epoch), {})
    summary = {
        "best_epoch": state.best_epoch,
        cfg.monitor: state.best_value,
        **{f"{split}_{k}": test_metrics.get(k) for k in ("accuracy", "top5", "loss")},
        "valid_accuracy": best_metrics.get("valid_accuracy"),
        "bad_images": state.bad_images,
        "train_images": len(job.data.splits["train"]),
    }
    if cfg.cv_folds is not None:
        summary.update(cv_folds=cfg.cv_folds, cv_fold=cfg.cv_fold)
    if cfg.refit:
        summary.update(refit=True, valid_accuracy=None)
        summary["model_epoch"] = (
            "last: trained on train+valid with nothing held out, for the epoch count chosen by "
            "cross-validation"
        )
    model.to("cpu").to(memory_format=torch.contiguous_format)
    model_dir = run.save_model(
        model,
        architecture=cfg.model,
        class_ids=list(job.data.index.class_ids),
        class_names=job.data.class_names,
        preprocess=preprocess,
        metrics=summary,
        config=cfg.model_dump(mode="json"),
    )
    if cfg.tta:
        test_metrics["tta"] = job.dist.on_main(lambda: _tta_evaluation(job, model_dir, split))
        run.write_evaluation(split, test_metrics)
    job.cbs.fire("on_export_end", state, model_dir)
    if state.bad_images:
        _say(
            job,
            f"warning: {state.bad_images} training image(s) could not be decoded and were "
            f"skipped (run `visiontune data check {cfg.data}` for the list)",
        )
    return TrainResult(
        run_dir=run.path,
        model_dir=model_dir,
        best_epoch=state.best_epoch,
        best_metrics=best_metrics,
        history=state.history,
        test_metrics=test_metrics,
        stop_reason=state.stop_reason,
        bad_images=state.bad_images,
        used_feature_cache=job.loaders is not None and job.loaders.uses_feature_cache,
    )


def _tta_evaluation(job: Job, model_dir, split: str) -> dict[str, Any]:
    """``split`` evaluated from the written model with test-time augmentation (``cfg.tta``
    views): the views' metrics beside the plain ones already in the evaluation."""
    from visiontune.evaluate import evaluate

    cfg = job.cfg
    m = evaluate(
        model_dir,
        cfg.data,
        split,
        endpoint_url=cfg.endpoint_url,
        device=cfg.device,
        precision=cfg.precision,
        workers=cfg.workers,
        progress=False,
        tta=cfg.tta,
    )
    _say(
        job,
        f"test-time augmentation ({cfg.tta} views): {split} accuracy {m['accuracy']:.4f}, "
        f"loss {m['loss']:.4f} (plain image: {m['tta']['single_view']['accuracy']:.4f})",
    )
    keep = ("count", "accuracy", "top5", "loss", "macro_f1")
    return {"views": cfg.tta, "names": m["tta"]["names"], **{k: m[k] for k in keep}}


def _finish(job: Job, result: TrainResult | None) -> None:
    """Every exit: callbacks release what they hold (the report callback writes
    RUN/report.html after the profiler and debugger have flushed, before trackers upload),
    then S3 is synced."""
    job.state.phase = "done"
    job.cbs.fire("on_train_end", job.state, result)
    if result is not None:
        job.run.sync()
        job.dist.barrier()  # the run is complete on disk when any rank returns
        job.dist.close()


# --------------------------------------------------------------------------------------------
# Helpers of the phases


def _fold(job: Job, loss_sum, correct_sum, count: int, bad_here: int) -> None:
    """Add the device-side running sums of every rank into the host totals (one sync), so
    the logged numbers are the whole job's."""
    state = job.state
    loss, correct, total, bad = job.dist.sum_values(loss_sum, correct_sum, count, bad_here)
    s = state.sums
    state.sums = {
        "loss": s["loss"] + loss,
        "correct": s["correct"] + correct,
        "count": s["count"] + total,
    }
    state.bad_images += round(bad) - bad_here  # this rank's own were counted as they came


def _agreed_signal(job: Job) -> int:
    """The signal (SIGTERM/SIGINT) any rank received, 0 for none: every rank stops together."""
    return job.dist.agree_max(job.signals[0] if job.signals else 0)


def _log_epoch(run: RunDir, step: int, m: dict[str, float], logged_valid: bool = True) -> None:
    epoch = m["epoch"]
    run.append_metrics(
        {
            "step": step,
            "epoch": epoch,
            "split": "train",
            "loss": m["train_loss"],
            "accuracy": m["train_accuracy"],
            "lr": m["lr"],
            "images_per_sec": m["images_per_sec"],
            "epoch_time": m["epoch_time"],
        }
    )
    if not logged_valid:  # a refit has no valid split: no row of NaNs
        return
    run.append_metrics(
        {
            "step": step,
            "epoch": epoch,
            "split": "valid",
            "loss": m["valid_loss"],
            "accuracy": m["valid_accuracy"],
            "top5": m["valid_top5"],
        }
    )


def pull_remote_run(output: str, endpoint_url: str | None = None) -> Path:
    """For ``--resume s3://...``: copy the remote run directory into its local staging place."""
    return RunDir.pull(output, endpoint_url).path


# --------------------------------------------------------------------------------------------
# Data order and seeding that survive a restart


class EpochSampler(Sampler):
    """A permutation drawn from (seed, epoch), started ``start`` samples in (for resume).

    Yields ``(index, sample_seed)`` so a sample's augmentation does not depend on which worker
    process loads it or on how far the run got before a restart. Under torchrun each rank
    takes its share of the permutation (``dist.shard``: padded like DistributedSampler, and
    dealt so every global batch is the one a single process would draw); ``start`` counts in
    this rank's share.
    """

    def __init__(self, n: int, seed: int, shuffle: bool = True, rank: int = 0, world_size: int = 1):
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        order = dist.shard(order, self.rank, self.world_size)
        base = (self.seed * 1_000_003 + self.epoch) * 10_000_019
        for i in order[self.start :]:
            yield i, (base + i) % (2**63)

    def __len__(self) -> int:
        return math.ceil(self.n / self.world_size) - self.start


class SeededSamples(Dataset):
    """Wraps a dataset so item ``(i, seed)`` is produced with the CPU generator seeded by
    ``seed``.

    The CPU generator is forked around each item, and only it is seeded (``torch.manual_seed``
    would reseed the GPU's too, and fork_rng(devices=[]) would not restore it), so seeding a
    sample in the main process (no workers) does not disturb the stream dropout draws from, on
    the CPU or a GPU. Found on an H100: a CUDA run over cached augmented views resumed with
    other dropout masks than the uninterrupted run, whose view pass had reseeded the GPU.
    """

    def __init__(self, base: Dataset, seeded: bool = True):
        self.base, self.seeded = base, seeded

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        if not self.seeded:
            return self.base[index]
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            return self.base[index]


def _tensor_collate(batch):
    xs, ys = zip(*batch, strict=True)
    return torch.stack(xs), torch.stack(ys), 0


# --------------------------------------------------------------------------------------------
# Schedule: one per-step multiplier for every preset, so resuming restores it exactly


def lr_multiplier(cfg: TrainConfig, total_steps: int, steps_per_epoch: int):
    warmup = round(cfg.warmup_epochs * steps_per_epoch)

    def f(step: int) -> float:
        if cfg.schedule == "onecycle":
            peak = max(1, int(0.3 * total_steps))
            if step < peak:
                return 1 / 25 + (1 - 1 / 25) * step / peak
            t = (step - peak) / max(1, total_steps - peak)
            return 1e-4 + (1 - 1e-4) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
        if step < warmup:
            return (step + 1) / warmup
        if cfg.schedule == "cosine":
            t = (step - warmup) / max(1, total_steps - warmup)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
        if cfg.schedule == "step":
            return cfg.step_gamma ** ((step // max(1, steps_per_epoch)) // cfg.step_size)
        return 1.0

    return f


def build_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """Head at ``lr``, trainable backbone layers at ``lr * backbone_lr_scale``; no weight decay
    on biases and normalisation weights."""
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_head = name.startswith("head.")
        decay = p.ndim > 1
        groups.setdefault((is_head, decay), []).append(p)
    param_groups = [
        {
            "params": ps,
            "lr": cfg.lr * (1.0 if is_head else cfg.backbone_lr_scale),
            "weight_decay": cfg.weight_decay if decay else 0.0,
        }
        for (is_head, decay), ps in sorted(groups.items())
    ]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(param_groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
    return torch.optim.AdamW(param_groups, lr=cfg.lr)


# --------------------------------------------------------------------------------------------
# RNG and signals


def _rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        # Plain values and tensors only, so the checkpoint loads with weights_only=True.
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        # The current device's only: asking for every device's would open a context on each
        # GPU from every rank of a torchrun job.
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if isinstance(cuda, list | tuple):  # older checkpoints: one state per device
            torch.cuda.set_rng_state_all(cuda)
        else:
            torch.cuda.set_rng_state(cuda)


def _signal_guard():
    """Turn SIGTERM/SIGINT into a flag the loop checks after every step (spot instances)."""
    received: list[int] = []

    def handler(signum, _frame):
        received.append(signum)

    previous = {}
    if threading_main():
        for s in (signal.SIGTERM, signal.SIGINT):
            previous[s] = signal.signal(s, handler)

    def restore():
        for s, h in previous.items():
            signal.signal(s, h)

    return received, restore


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


class _SplitView:
    """The dataset index with the (possibly re-carved) splits the run uses."""

    def __init__(self, index, splits):
        self._index, self.splits = index, splits

    def __getattr__(self, name):
        return getattr(self._index, name)

    def fingerprint(self, split=None):
        import hashlib

        base = self._index.fingerprint(None)
        if split is None:
            return base
        items = "\n".join(f"{p}\t{y}" for p, y in self.splits[split])
        return hashlib.sha256(f"{base}\n{split}\n{items}".encode()).hexdigest()


class _Progress:
    """A Rich progress bar with throughput and ETA, and one console line per epoch."""

    def __init__(self, enabled: bool):
        self.enabled = (enabled and sys.stderr.isatty()) or os.environ.get(
            "VISIONTUNE_PROGRESS"
        ) == "1"
        self.console = None
        self.bar = None
        if enabled:
            from rich.console import Console

            self.console = Console(stderr=True)
        if self.enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            self.bar = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[ips]:.1f} img/s  loss {task.fields[loss]}"),
                TimeRemainingColumn(),
                console=self.console,
                transient=True,
            )
            self.bar.start()
        self._t0 = 0.0
        self._n = 0
        self._last_refresh = 0.0

    def start(self, epoch: int, epochs: int, steps: int, done: int):
        self._t0, self._n = time.perf_counter(), 0
        if self.bar is None:
            return None
        return self.bar.add_task(
            f"epoch {epoch + 1}/{epochs}", total=steps, completed=done, ips=0.0, loss="-"
        )

    @contextlib.contextmanager
    def task(self, label: str, total: int) -> Iterator[Callable[[int], None] | None]:
        """A bar for a one-off pass (the feature pass); yields ``advance(n_images)``."""
        if self.bar is None:
            yield None
            return
        bar = self.bar
        t0 = time.perf_counter()
        task = bar.add_task(label, total=total, ips=0.0, loss="-")
        done = [0]

        def advance(n: int) -> None:
            done[0] += n
            bar.update(task, advance=n, ips=done[0] / max(1e-9, time.perf_counter() - t0))

        try:
            yield advance
        finally:
            bar.remove_task(task)

    def advance(self, task, n, loss_sum, count, sums) -> None:
        if self.bar is None:
            return
        self._n += n
        now = time.perf_counter()
        fields = {}
        # Read the loss (a host sync) at most twice a second, not every step.
        if now - self._last_refresh > 0.5:
            self._last_refresh = now
            total = sums["loss"] + float(loss_sum.item())
            fields = {"loss": f"{total / max(1, sums['count'] + count):.4f}"}
        self.bar.update(task, advance=1, ips=self._n / max(1e-9, now - self._t0), **fields)

    def stop(self, task) -> None:
        if self.bar is not None and task is not None:
            self.bar.remove_task(task)

    def epoch_line(self, m: dict[str, float], epochs: int, best_epoch: int | None) -> None:
        if self.console is None:
            return
        star = " *" if best_epoch == m["epoch"] else ""
        valid = (
            f"valid loss {m['valid_loss']:.4f} acc {m['valid_accuracy']:.3f} "
            f"top5 {m['valid_top5']:.3f}"
            if not math.isnan(m["valid_accuracy"])  # accuracy is NaN only with no valid split
            else "no valid split (refit)"
        )
        self.console.print(
            f"epoch {m['epoch']}/{epochs}  train loss {m['train_loss']:.4f} "
            f"acc {m['train_accuracy']:.3f}  {valid}  "
            f"lr {m['lr']:.2e}  {m['images_per_sec']:.1f} img/s  {m['epoch_time']:.1f}s{star}",
            highlight=False,
            soft_wrap=True,  # one line per epoch in logs, whatever the terminal width
        )

    def close(self) -> None:
        if self.bar is not None:
            with contextlib.suppress(Exception):
                self.bar.stop()
