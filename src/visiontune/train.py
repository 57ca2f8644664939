"""The training job: fine-tune a pretrained backbone on an image dataset.

Read top to bottom: resolve the run directory and config, discover the data, build the model,
the optimizer and the schedule, then the epoch loop, written out here: per step, per epoch
evaluation, checkpointing, early stopping. At the end the best epoch's weights are evaluated on
the test split and written as the self-describing ``RUN/model`` directory.

Callbacks (``visiontune.callbacks``) are the only extension point: the debugger, profiler,
loggers and tuner subscribe to events; the loop never branches on who listens.

Resuming is exact. Each epoch visits a permutation drawn from (seed, epoch); each sample's
augmentation is seeded from (seed, epoch, index); the checkpoint holds model, optimizer,
schedule, scaler, RNG states, the position inside the epoch and the epoch's running sums. A run
killed mid-epoch and resumed ends with the same metrics as one that never stopped.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset

from visiontune import features as feature_cache
from visiontune.callbacks import Callback, CallbackList, TrainState
from visiontune.config import TrainConfig, save_config
from visiontune.device import autocast, autocast_dtype, default_workers, resolve_device
from visiontune.errors import UserError
from visiontune.evaluate import classification_metrics, collect_logits
from visiontune.io import append_jsonl, atomic_write, atomic_write_json, read_jsonl

CHECKPOINT_VERSION = 1


class TrainingInterrupted(Exception):
    """SIGTERM/SIGINT arrived: a checkpoint was saved and the run can be resumed."""

    def __init__(self, run_dir: Path, signum: int):
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


# --------------------------------------------------------------------------------------------
# Data order and seeding that survive a restart


class EpochSampler(Sampler):
    """A permutation drawn from (seed, epoch), started ``start`` samples in (for resume).

    Yields ``(index, sample_seed)`` so a sample's augmentation does not depend on which worker
    process loads it or on how far the run got before a restart.
    """

    def __init__(self, n: int, seed: int, shuffle: bool = True):
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        base = (self.seed * 1_000_003 + self.epoch) * 10_000_019
        for i in order[self.start :]:
            yield i, (base + i) % (2**63)

    def __len__(self) -> int:
        return self.n - self.start


class SeededSamples(Dataset):
    """Wraps a dataset so item ``(i, seed)`` is produced under ``torch.manual_seed(seed)``.

    The global RNG is forked around each item, so seeding a sample in the main process (no
    workers) does not disturb the RNG stream that dropout draws from.
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
            torch.manual_seed(seed)
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
# Run directory and checkpoints


def _rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        # Plain values and tensors only, so the checkpoint loads with weights_only=True.
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write ``last.pt`` atomically: a kill during the write leaves the previous one."""
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint without unpickling arbitrary objects (``weights_only=True``)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"cannot read checkpoint {path}: {str(e).splitlines()[0]}") from e


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
        callbacks: listeners for loop events (debugger, profiler, loggers, tuner).
        resume: continue the run in ``cfg.output`` from ``checkpoints/last.pt``.

    Raises:
        UserError: bad data, bad options, or an existing run directory without ``resume``.
        TrainingInterrupted: SIGTERM/SIGINT; a checkpoint was saved first.
    """
    from visiontune.data.folder import ImageDataset, collate_skip_bad, discover
    from visiontune.data.transforms import eval_transform, train_transform
    from visiontune.models.artifact import save_model_dir
    from visiontune.models.registry import build_model, get_spec, set_trainable

    run_dir, remote = _local_run_dir(cfg.output)
    ckpt_path = run_dir / "checkpoints" / "last.pt"
    if resume:
        if not ckpt_path.is_file():
            raise UserError(f"nothing to resume: {ckpt_path} does not exist")
    elif ckpt_path.is_file() or (run_dir / "model").exists():
        raise UserError(
            f"{run_dir} already holds a training run; resume it with "
            f"`visiontune train --resume {run_dir}` or choose another --output"
        )

    # ---- validate everything cheap before spending compute
    spec = get_spec(cfg.model)
    preprocess = spec.preprocess.with_size(cfg.image_size)
    if preprocess.input_size < spec.preprocess.min_size:
        raise UserError(
            f"image_size {preprocess.input_size} is too small for {cfg.model} "
            f"(at least {spec.preprocess.min_size})"
        )
    if cfg.model == "vit_b_16" and preprocess.input_size != 224:
        raise UserError("vit_b_16 takes 224 px input only; drop --image-size")
    device = resolve_device(cfg.device)
    amp_dtype = autocast_dtype(device, cfg.precision)
    run_dir.mkdir(parents=True, exist_ok=True)

    index = discover(
        cfg.data,
        endpoint_url=cfg.endpoint_url,
        split_ratios=cfg.split_ratios,
        split_seed=cfg.split_seed,
        record_dir=run_dir,
        limit_per_class=cfg.limit_per_class,
    )
    num_classes = len(index.class_ids)
    if num_classes < 2:
        raise UserError(f"{cfg.data} has {num_classes} class; a classifier needs at least 2")
    if not index.splits.get("train"):
        raise UserError(f"{cfg.data} has no training images (expected a train/ split)")
    splits = dict(index.splits)
    if not splits.get("valid"):
        splits["train"], splits["valid"] = _carve_valid(splits["train"], cfg.split_seed)
    n_train = len(splits["train"])
    if cfg.batch_size > n_train:
        raise UserError(
            f"batch_size {cfg.batch_size} is larger than the training split ({n_train} images)"
        )
    save_config(cfg, run_dir / "config.yaml")

    # ---- model (seeded: a fresh head, or a random backbone, is the same for the same seed)
    torch.manual_seed(cfg.seed)
    model, _ = build_model(cfg.model, num_classes, weights=cfg.weights, dropout=cfg.dropout)
    set_trainable(model, cfg.trainable)
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)

    # ---- data: cached backbone features (frozen, no augmentation) or images
    torch.manual_seed(cfg.seed)
    workers = default_workers() if cfg.workers is None else cfg.workers
    fast = cfg.frozen_backbone and cfg.augment == "none" and cfg.feature_cache
    decode = preprocess.resize_size

    def image_loader(split: str, transform, batch: int, sampler=None, shuffle_wrap=False):
        ds = ImageDataset(
            _SplitView(index, splits), split, transform, decode_size=decode, s3_cache=cfg.s3_cache
        )
        return DataLoader(
            SeededSamples(ds) if shuffle_wrap else ds,
            batch_size=batch,
            sampler=sampler,
            num_workers=workers,
            collate_fn=collate_skip_bad,
            pin_memory=device.type == "cuda",
            persistent_workers=workers > 0 and shuffle_wrap,
            prefetch_factor=4 if workers > 0 else None,
            # Its own generator: starting an iterator must not draw from the global RNG,
            # or a resumed run's dropout stream would shift.
            generator=torch.Generator().manual_seed(cfg.seed),
        )

    eval_batch = max(cfg.batch_size, 64)
    bad_images = 0
    if fast:
        key_parts = {
            "model": cfg.model,
            "weights": feature_cache.weights_key(cfg.weights),
            # A randomly initialised backbone differs per seed.
            "seed": cfg.seed if cfg.weights == "none" else None,
            "preprocess": preprocess.to_dict(),
            "precision": str(amp_dtype),
        }
        tensors = {}
        for split in ("train", "valid", "test"):
            if not splits.get(split):
                continue
            key = feature_cache.feature_key(
                **key_parts, data=_SplitView(index, splits).fingerprint(split)
            )
            loader = image_loader(split, eval_transform(preprocess), eval_batch)
            f, y, bad = feature_cache.load_or_compute(
                key, model.backbone, loader, device, amp_dtype, cfg.channels_last
            )
            bad_images += bad if split == "train" else 0
            tensors[split] = TensorDataset(f, y)
        head_model: nn.Module = model.head
        train_ds = tensors["train"]

        def make_eval(split):
            return DataLoader(tensors[split], batch_size=4096, collate_fn=_tensor_collate)

        sampler = EpochSampler(len(train_ds), cfg.seed)
        train_loader = DataLoader(
            SeededSamples(train_ds, seeded=False),
            batch_size=cfg.batch_size,
            sampler=sampler,
            collate_fn=_tensor_collate,
            generator=torch.Generator().manual_seed(cfg.seed),
        )
    else:
        head_model = model
        sampler = EpochSampler(n_train, cfg.seed)
        train_loader = image_loader(
            "train", train_transform(preprocess, cfg.augment), cfg.batch_size, sampler, True
        )

        def make_eval(split):
            return image_loader(split, eval_transform(preprocess), eval_batch)

    steps_per_epoch = math.ceil(n_train / cfg.batch_size)
    if cfg.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)
    total_steps = steps_per_epoch * cfg.epochs
    optimizer = build_optimizer(cfg, model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_multiplier(cfg, total_steps, steps_per_epoch)
    )
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    better = (lambda a, b: a < b) if cfg.monitor_mode == "min" else (lambda a, b: a > b)

    # ---- state, from scratch or from the checkpoint
    state = TrainState(
        config=cfg,
        run_dir=run_dir,
        model=model,
        optimizer=optimizer,
        device=device,
        num_classes=num_classes,
        class_names=list(index.class_names),
        steps_per_epoch=steps_per_epoch,
    )
    best_value: float | None = None
    best_epoch: int | None = None
    stale_epochs = 0
    sums = _zero_sums()
    if resume:
        ck = load_checkpoint(ckpt_path)
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        scheduler.load_state_dict(ck["scheduler"])
        scaler.load_state_dict(ck["scaler"])
        _set_rng_state(ck["rng"])
        state.epoch, state.step = ck["epoch"], ck["step"]
        state.batch_in_epoch = ck["batch_in_epoch"]
        state.history = list(ck["history"])
        best_value, best_epoch = ck["best_value"], ck["best_epoch"]
        stale_epochs = ck["stale_epochs"]
        sums = {k: float(v) for k, v in ck["sums"].items()}
        bad_images = ck.get("bad_images", bad_images)
        _truncate_metrics(run_dir / "metrics.jsonl", state.step)
        print(
            f"resuming {run_dir} at epoch {state.epoch + 1}, batch {state.batch_in_epoch}",
            file=sys.stderr,
        )
    elif (run_dir / "metrics.jsonl").exists():
        (run_dir / "metrics.jsonl").unlink()

    def checkpoint() -> None:
        payload = {
            "version": CHECKPOINT_VERSION,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "rng": _rng_state(),
            "epoch": state.epoch,
            "step": state.step,
            "batch_in_epoch": state.batch_in_epoch,
            "sums": sums,
            "history": state.history,
            "best_value": best_value,
            "best_epoch": best_epoch,
            "stale_epochs": stale_epochs,
            "bad_images": bad_images,
        }
        save_checkpoint(ckpt_path, payload)
        cbs.fire("on_checkpoint", state, str(ckpt_path))
        if remote:
            _sync_up(run_dir, remote, cfg.endpoint_url)

    cbs = CallbackList(list(callbacks))
    fire_batch = cbs.listens("on_batch_start")
    fire_step_start = cbs.listens("on_step_start")
    fire_backward = cbs.listens("on_after_backward")
    fire_step_end = cbs.listens("on_step_end")
    received, restore_signals = _signal_guard()
    progress = _Progress(enabled=cfg.progress)
    cbs.fire("on_train_start", state)
    try:
        while state.epoch < cfg.epochs and state.stop_reason is None:
            epoch = state.epoch
            sampler.set_epoch(epoch, state.batch_in_epoch * cfg.batch_size)
            cbs.fire("on_epoch_start", state)
            head_model.train()
            t0 = time.perf_counter()
            seen_at_start = sums["count"]
            # Running sums stay on the device: no host sync per step.
            loss_sum = torch.zeros((), device=device)
            correct_sum = torch.zeros((), device=device, dtype=torch.long)
            count = 0
            task = progress.start(epoch, cfg.epochs, steps_per_epoch, state.batch_in_epoch)
            data_iter = iter(train_loader)
            while state.batch_in_epoch < steps_per_epoch:
                if fire_batch:
                    cbs.fire("on_batch_start", state)
                try:
                    inputs, targets, bad = next(data_iter)
                except StopIteration:
                    break
                bad_images += bad
                if targets.numel() == 0:
                    state.batch_in_epoch += 1
                    continue
                inputs = inputs.to(device, non_blocking=True)
                targets = targets.to(device, non_blocking=True)
                if cfg.channels_last and inputs.dim() == 4:
                    inputs = inputs.contiguous(memory_format=torch.channels_last)
                if fire_step_start:
                    cbs.fire("on_step_start", state, (inputs, targets))
                with autocast(device, amp_dtype):
                    outputs = head_model(inputs)
                    loss = loss_fn(outputs.float(), targets)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if fire_backward:
                    cbs.fire("on_after_backward", state, model)
                if cfg.grad_clip:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(
                        [p for g in optimizer.param_groups for p in g["params"]], cfg.grad_clip
                    )
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                state.step += 1
                state.batch_in_epoch += 1
                n = targets.shape[0]
                count += n
                loss_sum += loss.detach() * n
                correct_sum += (outputs.detach().argmax(1) == targets).sum()
                if fire_step_end:
                    cbs.fire("on_step_end", state, (inputs, targets), outputs, loss)
                progress.advance(task, n, loss_sum, count, sums)
                if received:
                    sums = _fold(sums, loss_sum, correct_sum, count)
                    checkpoint()
                    raise TrainingInterrupted(run_dir, received[0])
                if cfg.checkpoint_every_steps and state.step % cfg.checkpoint_every_steps == 0:
                    sums = _fold(sums, loss_sum, correct_sum, count)
                    loss_sum.zero_()
                    correct_sum.zero_()
                    count = 0
                    checkpoint()
            sums = _fold(sums, loss_sum, correct_sum, count)
            progress.stop(task)
            epoch_time = time.perf_counter() - t0
            seen = sums["count"] - seen_at_start

            # ---- evaluate on the valid split
            logits, labels, _ = collect_logits(
                head_model, make_eval("valid"), device, amp_dtype, cfg.channels_last
            )
            valid = classification_metrics(logits, labels, index.class_names)
            cbs.fire("on_evaluation_end", state, "valid", valid)
            metrics = {
                "epoch": epoch + 1,
                "train_loss": sums["loss"] / max(1, sums["count"]),
                "train_accuracy": sums["correct"] / max(1, sums["count"]),
                "valid_loss": valid.get("loss", float("nan")),
                "valid_accuracy": valid.get("accuracy", float("nan")),
                "valid_top5": valid.get("top5", float("nan")),
                "lr": optimizer.param_groups[-1]["lr"],
                "images_per_sec": seen / epoch_time if epoch_time > 0 else 0.0,
                "epoch_time": epoch_time,
                "bad_images": bad_images,
            }
            _log_epoch(run_dir, state.step, metrics)
            state.history.append(metrics)
            state.last_metrics = metrics
            if cfg.monitor not in metrics:
                raise UserError(
                    f"monitor {cfg.monitor!r} is not a logged metric "
                    f"(one of: {', '.join(k for k in metrics if k != 'epoch')})"
                )
            value = metrics[cfg.monitor]
            if best_value is None or better(value, best_value):
                best_value, best_epoch, stale_epochs = value, epoch + 1, 0
                _save_best(run_dir, model)
            else:
                stale_epochs += 1
            progress.epoch_line(metrics, cfg.epochs, best_epoch)
            cbs.fire("on_epoch_end", state, metrics)
            if cfg.early_stopping and stale_epochs >= cfg.early_stopping:
                state.stop_reason = state.stop_reason or "early_stopping"
            state.epoch += 1
            state.batch_in_epoch = 0
            sums = _zero_sums()
            checkpoint()
            if received:
                raise TrainingInterrupted(run_dir, received[0])
    finally:
        restore_signals()
        progress.close()

    # ---- the best epoch becomes the model
    _load_best(run_dir, model)
    test_split = "test" if splits.get("test") else "valid"
    logits, labels, _ = collect_logits(
        head_model, make_eval(test_split), device, amp_dtype, cfg.channels_last
    )
    test_metrics = classification_metrics(logits, labels, index.class_names)
    test_metrics["split"] = test_split
    atomic_write_json(run_dir / "evaluation.json", test_metrics)
    best_metrics = next((h for h in state.history if h["epoch"] == best_epoch), {})
    summary = {
        "best_epoch": best_epoch,
        cfg.monitor: best_value,
        **{f"{test_split}_{k}": test_metrics.get(k) for k in ("accuracy", "top5", "loss")},
        "valid_accuracy": best_metrics.get("valid_accuracy"),
        "bad_images": bad_images,
    }
    model.to("cpu").to(memory_format=torch.contiguous_format)
    model_dir = save_model_dir(
        run_dir / "model",
        model,
        architecture=cfg.model,
        class_ids=list(index.class_ids),
        class_names=list(index.class_names),
        preprocess=preprocess,
        metrics=summary,
        config=cfg.model_dump(mode="json"),
        name=run_dir.name,
    )
    result = TrainResult(
        run_dir=run_dir,
        model_dir=model_dir,
        best_epoch=best_epoch,
        best_metrics=best_metrics,
        history=state.history,
        test_metrics=test_metrics,
        stop_reason=state.stop_reason,
        bad_images=bad_images,
        used_feature_cache=fast,
    )
    if bad_images:
        print(
            f"warning: {bad_images} training image(s) could not be decoded and were skipped "
            f"(run `visiontune data check {cfg.data}` for the list)",
            file=sys.stderr,
        )
    cbs.fire("on_train_end", state, result)
    if remote:
        _sync_up(run_dir, remote, cfg.endpoint_url)
    return result


# --------------------------------------------------------------------------------------------
# Helpers of the job


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


def _carve_valid(train: list, seed: int, ratio: float = 0.1) -> tuple[list, list]:
    """Hold out ``ratio`` of each class of train as valid when the dataset has no valid split."""
    rng = random.Random(seed)
    by_class: dict[int, list] = {}
    for item in train:
        by_class.setdefault(item[1], []).append(item)
    keep, held = [], []
    for label in sorted(by_class):
        items = sorted(by_class[label])
        rng.shuffle(items)
        k = max(1, round(len(items) * ratio)) if len(items) > 1 else 0
        held += items[:k]
        keep += items[k:]
    print(
        f"note: no valid split; holding out {len(held)} training images for validation",
        file=sys.stderr,
    )
    return keep, held


def _zero_sums() -> dict[str, float]:
    return {"loss": 0.0, "correct": 0.0, "count": 0.0}


def _fold(sums, loss_sum, correct_sum, count) -> dict[str, float]:
    """Add the device-side running sums into the host totals (one sync)."""
    return {
        "loss": sums["loss"] + float(loss_sum.item()),
        "correct": sums["correct"] + float(correct_sum.item()),
        "count": sums["count"] + count,
    }


def _log_epoch(run_dir: Path, step: int, m: dict[str, float]) -> None:
    epoch = m["epoch"]
    append_jsonl(
        run_dir / "metrics.jsonl",
        {
            "step": step,
            "epoch": epoch,
            "split": "train",
            "loss": m["train_loss"],
            "accuracy": m["train_accuracy"],
            "lr": m["lr"],
            "images_per_sec": m["images_per_sec"],
            "epoch_time": m["epoch_time"],
        },
    )
    append_jsonl(
        run_dir / "metrics.jsonl",
        {
            "step": step,
            "epoch": epoch,
            "split": "valid",
            "loss": m["valid_loss"],
            "accuracy": m["valid_accuracy"],
            "top5": m["valid_top5"],
        },
    )


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop lines logged after the checkpoint (they will be logged again)."""
    if not path.exists():
        return
    keep = [r for r in read_jsonl(path) if r.get("step", 0) <= step]
    import json

    atomic_write(
        path, lambda tmp: Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in keep))
    )


def _save_best(run_dir: Path, model: nn.Module) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(run_dir / "checkpoints" / "best.safetensors", lambda tmp: save_file(state, tmp))


def _load_best(run_dir: Path, model: nn.Module) -> None:
    from safetensors.torch import load_file

    path = run_dir / "checkpoints" / "best.safetensors"
    if path.is_file():
        device = next(model.parameters()).device
        model.load_state_dict({k: v.to(device) for k, v in load_file(str(path)).items()})


def _local_run_dir(output: str) -> tuple[Path, str | None]:
    """A local directory to write into, and the remote URI to mirror it to (``s3://``)."""
    if "://" not in output or output.startswith("file://"):
        return Path(output.removeprefix("file://")), None
    import hashlib

    staging = feature_cache.cache_root() / "runs" / hashlib.sha256(output.encode()).hexdigest()[:16]
    return staging, output.rstrip("/")


def pull_remote_run(output: str, endpoint_url: str | None = None) -> Path:
    """For ``--resume s3://...``: copy the remote run directory into its local staging place."""
    from visiontune.uri import download_tree

    run_dir, remote = _local_run_dir(output)
    if remote is not None:
        download_tree(remote, run_dir, endpoint_url)
    return run_dir


def _sync_up(run_dir: Path, remote: str, endpoint_url: str | None) -> None:
    """Mirror the local run directory to its remote home (S3)."""
    from visiontune.uri import upload_tree

    upload_tree(run_dir, remote, endpoint_url)


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
                TextColumn("[bold]epoch {task.fields[epoch]}"),
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
            "train", total=steps, completed=done, epoch=f"{epoch + 1}/{epochs}", ips=0.0, loss="-"
        )

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
        self.console.print(
            f"epoch {m['epoch']}/{epochs}  train loss {m['train_loss']:.4f} "
            f"acc {m['train_accuracy']:.3f}  valid loss {m['valid_loss']:.4f} "
            f"acc {m['valid_accuracy']:.3f} top5 {m['valid_top5']:.3f}  "
            f"lr {m['lr']:.2e}  {m['images_per_sec']:.1f} img/s  {m['epoch_time']:.1f}s{star}",
            highlight=False,
            soft_wrap=True,  # one line per epoch in logs, whatever the terminal width
        )

    def close(self) -> None:
        if self.bar is not None:
            with contextlib.suppress(Exception):
                self.bar.stop()
