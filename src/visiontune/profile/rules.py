"""SageMaker's profiler rules, with SageMaker's names and default parameters, over RUN/profile/.

Each rule is a function ``(data, **parameters) -> RuleResult`` in :data:`RULES`, the table of
names to (function, defaults). GPU rules report ``applicable=False`` when no GPU was sampled and
never fire then. Rules look only at samples taken after the first training step (initialisation
is judged by MaxInitializationTime alone); ``patience`` samples more are skipped when at least
one ``window`` remains after them, so a short run is judged on everything it has.

Beyond SageMaker's set, DataWaitShare reports what a CPU user needs most: the share of step
time the loop spent waiting for the next batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from visiontune.profile.data import ProfileData, load_profile
from visiontune.rules import RuleResult

RuleFn = Callable[..., RuleResult]
RULES: dict[str, tuple[RuleFn, dict[str, Any]]] = {}


def rule(name: str, **defaults: Any) -> Callable[[RuleFn], RuleFn]:
    """Register a profiler rule under SageMaker's ``name`` with its default parameters."""

    def deco(fn: RuleFn) -> RuleFn:
        RULES[name] = (fn, defaults)
        return fn

    return deco


def evaluate_rules(
    run_dir: str | Path | None = None,
    data: ProfileData | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
) -> list[RuleResult]:
    """Run every profiler rule over a run's profile (or over ``data`` given directly).

    Args:
        run_dir: the run directory; its ``profile/`` is read.
        data: an already loaded profile (tests pass recorded fixtures here).
        overrides: per-rule parameters replacing the defaults, ``{"StepOutlier": {"stddev": 4}}``.
    """
    if data is None:
        data = load_profile(run_dir) if run_dir is not None else ProfileData()
    out = []
    for name, (fn, defaults) in RULES.items():
        params = {**defaults, **(overrides or {}).get(name, {})}
        try:
            r = fn(data, **params)
        except Exception as e:  # one broken rule must not hide the others
            r = RuleResult(name, False, f"rule failed: {type(e).__name__}: {e}", applicable=False)
        r.rule, r.parameters = name, params
        out.append(r)
    return out


# -------------------------------------------------------------------------------- helpers


def _training_mask(data: ProfileData) -> np.ndarray:
    """Samples taken once the loop ran (after the first step), else all of them."""
    t = data.col("system", "time")
    first = data.meta.get("first_step")
    if first is None or not len(t):
        return np.ones(len(t), dtype=bool)
    mask = t >= first
    end = data.meta.get("end")
    if end is not None:
        mask &= t <= end
    return mask if mask.any() else np.ones(len(t), dtype=bool)


def _series(data: ProfileData, name: str, patience: int = 0, window: int = 0) -> np.ndarray:
    values = data.col("system", name)
    if not len(values):
        return values
    values = values[_training_mask(data)]
    if patience and len(values) >= patience + max(window, 1):
        values = values[patience:]
    return values[~np.isnan(values)]


def _windows(values: np.ndarray, window: int) -> list[np.ndarray]:
    if len(values) <= window:
        return [values] if len(values) else []
    return [values[i : i + window] for i in range(0, len(values) - window + 1, window)]


def _no_gpu(name: str) -> RuleResult:
    return RuleResult(
        name, False, "not applicable: no GPU was sampled in this run", applicable=False
    )


def _pct(values: np.ndarray, q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else math.nan


# -------------------------------------------------------------------------------- GPU rules


@rule("LowGPUUtilization", threshold_p95=70, threshold_p5=10, window=500, patience=1000)
def low_gpu_utilization(
    data: ProfileData, threshold_p95: float, threshold_p5: float, window: int, patience: int
) -> RuleResult:
    if not data.gpu_ids:
        return _no_gpu("LowGPUUtilization")
    low = fluct = total = 0
    worst = ""
    for g in data.gpu_ids:
        for w in _windows(_series(data, f"gpu{g}_util", patience, window), window):
            total += 1
            p95, p5 = _pct(w, 95), _pct(w, 5)
            if p95 < threshold_p95:
                low += 1
                worst = worst or f"GPU {g}: p95 utilisation {p95:.0f}% (< {threshold_p95}%)"
            elif p5 < threshold_p5:
                fluct += 1
                worst = worst or f"GPU {g}: p95 {p95:.0f}% but p5 {p5:.0f}% (< {threshold_p5}%)"
    if not total:
        return RuleResult("LowGPUUtilization", False, "no GPU samples during training yet")
    fired = low + fluct > 0
    if not fired:
        return RuleResult(
            "LowGPUUtilization", False, "GPU utilisation stayed high", datapoints=total
        )
    workers = data.meta.get("workers")
    if low and workers == 0:
        rec = (
            f"the GPU waited on a loader with 0 workers: set --workers "
            f"{_suggest_workers(data.meta.get('cores') or 1)}"
        )
    elif low:
        rec = "raise --batch-size, or look at data wait in the report: the GPU was often idle"
    else:
        rec = "utilisation swings between busy and idle: look for a data or CPU bottleneck"
    return RuleResult(
        "LowGPUUtilization", True, worst, rec, violations=low + fluct, datapoints=total
    )


@rule("CPUBottleneck", threshold=50, gpu_threshold=10, cpu_threshold=90, patience=1000)
def cpu_bottleneck(
    data: ProfileData, threshold: float, gpu_threshold: float, cpu_threshold: float, patience: int
) -> RuleResult:
    if not data.gpu_ids:
        return _no_gpu("CPUBottleneck")
    cpu = _series(data, "cpu", patience)
    gpu = np.nanmean([_series(data, f"gpu{g}_util", patience) for g in data.gpu_ids], axis=0)
    n = min(len(cpu), len(gpu))
    if not n:
        return RuleResult("CPUBottleneck", False, "no samples during training yet")
    bad = int(np.sum((gpu[:n] < gpu_threshold) & (cpu[:n] > cpu_threshold)))
    share = 100 * bad / n
    fired = share > threshold
    msg = f"GPU < {gpu_threshold}% while CPU > {cpu_threshold}% in {share:.0f}% of samples"
    rec = (
        "the CPU cannot feed the GPU: add --workers, decode smaller images, or cache features"
        if fired
        else ""
    )
    return RuleResult("CPUBottleneck", fired, msg, rec, violations=bad, datapoints=n)


@rule("IOBottleneck", threshold=50, gpu_threshold=10, io_threshold=50, patience=1000)
def io_bottleneck(
    data: ProfileData, threshold: float, gpu_threshold: float, io_threshold: float, patience: int
) -> RuleResult:
    # SageMaker's version asks for an idle GPU too; on a CPU run high I/O wait alone counts.
    iowait = _series(data, "iowait", patience)
    if not len(iowait):
        return RuleResult("IOBottleneck", False, "no samples during training yet")
    bad_mask = iowait > io_threshold
    if data.gpu_ids:
        gpu = np.nanmean([_series(data, f"gpu{g}_util", patience) for g in data.gpu_ids], axis=0)
        n = min(len(gpu), len(iowait))
        bad_mask = bad_mask[:n] & (gpu[:n] < gpu_threshold)
    n = len(bad_mask)
    bad = int(bad_mask.sum())
    share = 100 * bad / max(1, n)
    fired = share > threshold
    msg = f"I/O wait > {io_threshold}% in {share:.0f}% of samples"
    rec = (
        "the run waits on storage: copy the dataset to a local disk or keep s3_cache=cache"
        if fired
        else ""
    )
    return RuleResult("IOBottleneck", fired, msg, rec, violations=bad, datapoints=n)


@rule(
    "BatchSize",
    cpu_threshold_p95=70,
    gpu_threshold_p95=70,
    gpu_memory_threshold_p95=70,
    patience=1000,
    window=500,
)
def batch_size(
    data: ProfileData,
    cpu_threshold_p95: float,
    gpu_threshold_p95: float,
    gpu_memory_threshold_p95: float,
    patience: int,
    window: int,
) -> RuleResult:
    if not data.gpu_ids:
        return _no_gpu("BatchSize")
    cpu = _series(data, "cpu", patience, window)
    if not len(cpu):
        return RuleResult("BatchSize", False, "no samples during training yet")
    bad = total = 0
    for g in data.gpu_ids:
        util = _series(data, f"gpu{g}_util", patience, window)
        mem = _series(data, f"gpu{g}_memory", patience, window)
        for c, u, m in zip(
            _windows(cpu, window), _windows(util, window), _windows(mem, window), strict=False
        ):
            total += 1
            if (
                _pct(c, 95) < cpu_threshold_p95
                and _pct(u, 95) < gpu_threshold_p95
                and _pct(m, 95) < gpu_memory_threshold_p95
            ):
                bad += 1
    fired = bad > 0
    msg = (
        f"CPU, GPU and GPU memory p95 all under 70% in {bad} of {total} windows"
        if fired
        else "the machine is busy enough for this batch size"
    )
    bs = data.meta.get("batch_size")
    rec = f"the machine is underused: try --batch-size {bs * 2}" if fired and bs else ""
    if fired and not bs:
        rec = "the machine is underused: try a larger --batch-size"
    return RuleResult("BatchSize", fired, msg, rec, violations=bad, datapoints=total)


@rule("GPUMemoryIncrease", increase=5, patience=1000, window=10)
def gpu_memory_increase(
    data: ProfileData, increase: float, patience: int, window: int
) -> RuleResult:
    if not data.gpu_ids:
        return _no_gpu("GPUMemoryIncrease")
    bad = total = 0
    worst = 0.0
    for g in data.gpu_ids:
        mem = _series(data, f"gpu{g}_memory", patience, window)
        if len(mem) < 2 * window:
            continue
        avg = np.convolve(mem, np.ones(window) / window, mode="valid")
        rise = avg - avg[0]
        total += len(avg)
        bad += int(np.sum(rise > increase))
        worst = max(worst, float(rise.max()))
    if not total:
        return RuleResult("GPUMemoryIncrease", False, "too few GPU memory samples to judge a trend")
    fired = bad > 0
    msg = f"GPU memory rose by up to {worst:.1f} percentage points (threshold {increase})"
    rec = (
        "memory keeps growing: look for tensors kept across steps (e.g. losses not detached)"
        if fired
        else ""
    )
    return RuleResult("GPUMemoryIncrease", fired, msg, rec, violations=bad, datapoints=total)


@rule("LoadBalancing", threshold=0.5, patience=1000)
def load_balancing(data: ProfileData, threshold: float, patience: int) -> RuleResult:
    if not data.gpu_ids:
        return _no_gpu("LoadBalancing")
    if len(data.gpu_ids) < 2:
        return RuleResult(
            "LoadBalancing", False, "not applicable: one GPU, nothing to balance", applicable=False
        )
    med = {g: _pct(_series(data, f"gpu{g}_util", patience), 50) for g in data.gpu_ids}
    busiest = max(med.values())
    spread = (busiest - min(med.values())) / busiest if busiest > 0 else 0.0
    fired = spread > threshold
    msg = "median utilisation per GPU: " + ", ".join(f"{g}: {v:.0f}%" for g, v in med.items())
    rec = (
        "the GPUs carry unequal work: check that every GPU gets the same batch size"
        if fired
        else ""
    )
    return RuleResult(
        "LoadBalancing", fired, msg, rec, violations=int(fired), datapoints=len(data.gpu_ids)
    )


# -------------------------------------------------------------------------------- framework rules


@rule("StepOutlier", stddev=3, mode=None, n_outliers=10)
def step_outlier(data: ProfileData, stddev: float, mode: Any, n_outliers: int) -> RuleResult:
    times = data.col("steps", "step_time")
    steps = data.col("steps", "step")
    ok = ~np.isnan(times)
    times, steps = times[ok], steps[ok]
    if len(times) < 3:
        return RuleResult("StepOutlier", False, "too few steps to judge")
    limit = float(times.mean() + stddev * times.std())
    out = times > limit
    count = int(out.sum())
    fired = count > n_outliers
    msg = (
        f"{count} steps over mean + {stddev} std ({limit * 1000:.1f} ms); "
        f"slowest {times.max() * 1000:.1f} ms"
    )
    rec = (
        "some steps are far slower: see the step-duration histogram for when (evaluation, "
        "checkpoints, loader restarts each epoch)"
        if fired
        else ""
    )
    return RuleResult(
        "StepOutlier",
        fired,
        msg,
        rec,
        violations=count,
        datapoints=len(times),
        steps=[int(s) for s in steps[out][:50]],
    )


@rule("MaxInitializationTime", threshold=20)
def max_initialization_time(data: ProfileData, threshold: float) -> RuleResult:
    start = data.meta.get("start")
    if start is None:
        return RuleResult("MaxInitializationTime", False, "no profile metadata", applicable=False)
    first = data.meta.get("first_step")
    if first is None:
        t = data.col("system", "time")
        last = data.meta.get("end") or (float(t[-1]) if len(t) else start)
        minutes = (last - start) / 60
        fired = minutes > threshold
        msg = f"no training step after {minutes:.1f} min"
    else:
        minutes = (first - start) / 60
        fired = minutes > threshold
        msg = f"initialisation took {minutes:.2f} min until the first step"
    rec = (
        "start-up is slow: cache the dataset locally (s3_cache=cache) or precompute features"
        if fired
        else ""
    )
    return RuleResult("MaxInitializationTime", fired, msg, rec, violations=int(fired), datapoints=1)


def _suggest_workers(cores: int) -> int:
    return max(1, min(cores, math.ceil(0.7 * cores)))


@rule("Dataloader", min_threshold=70, max_threshold=200)
def dataloader(data: ProfileData, min_threshold: float, max_threshold: float) -> RuleResult:
    meta = data.meta
    workers, cores = meta.get("workers"), meta.get("cores")
    if workers is None or not cores:
        return RuleResult("Dataloader", False, "no profile metadata", applicable=False)
    if meta.get("uses_feature_cache"):
        return RuleResult(
            "Dataloader",
            False,
            "not applicable: training steps read cached backbone features, not images",
            applicable=False,
        )
    share = 100 * workers / cores
    observed = data.col("system", "workers")
    seen = int(np.nanmax(observed)) if len(observed) else workers
    if workers == 0 and cores <= 1:
        return RuleResult("Dataloader", False, "one core: loading in the main process is right")
    low, high = share < min_threshold, share > max_threshold
    msg = (
        f"the loader used {workers} worker processes on {cores} cores ({share:.0f}%; "
        f"up to {seen} child processes seen)"
    )
    if low:
        rec = f"the loader used {workers} workers on {cores} cores: set --workers {_suggest_workers(cores)}"
    elif high:
        rec = f"more loader workers than cores thrash the CPU: set --workers {cores}"
    else:
        rec = ""
    return RuleResult(
        "Dataloader", low or high, msg, rec, violations=int(low or high), datapoints=1
    )


@rule("DataWaitShare", threshold=20, skip_first_step_of_epoch=True)
def data_wait_share(
    data: ProfileData, threshold: float, skip_first_step_of_epoch: bool
) -> RuleResult:
    wait, total = data.col("steps", "data_wait"), data.col("steps", "step_time")
    epoch = data.col("steps", "epoch")
    ok = ~(np.isnan(wait) | np.isnan(total))
    if skip_first_step_of_epoch and len(epoch):
        # An epoch's first batch also waits for the loader's workers to start.
        first = np.concatenate([[True], epoch[1:] != epoch[:-1]])
        if (ok & ~first).any():
            ok &= ~first
    wait, total = wait[ok], total[ok]
    if not len(total) or total.sum() <= 0:
        return RuleResult("DataWaitShare", False, "no timed steps yet")
    share = 100 * float(wait.sum() / total.sum())
    slow = int(np.sum(wait > total * threshold / 100))
    fired = share > threshold
    msg = f"{share:.0f}% of step time waiting for data (threshold {threshold}%)"
    workers, cores = data.meta.get("workers"), data.meta.get("cores") or 1
    if not fired:
        rec = ""
    elif workers == 0 and cores > 1:
        rec = f"images are decoded in the training process: set --workers {_suggest_workers(cores)}"
    else:
        rec = (
            "decoding cannot keep up: add --workers, lower the image size, use --augment none "
            "with a frozen backbone to cache features, or keep the data on local disk"
        )
    return RuleResult("DataWaitShare", fired, msg, rec, violations=slow, datapoints=len(total))


# -------------------------------------------------------------------------------- summaries

SYSTEM_SUMMARY = ("cpu", "iowait", "memory", "proc_cpu", "workers_cpu")


def percentiles(values: np.ndarray) -> dict[str, float]:
    """p50, p95, p99 and max of a series (NaN ignored)."""
    v = values[~np.isnan(values)] if len(values) else values
    if not len(v):
        return {}
    p50, p95, p99 = np.percentile(v, [50, 95, 99])
    return {"p50": float(p50), "p95": float(p95), "p99": float(p99), "max": float(v.max())}


@rule("OverallSystemUsage")
def overall_system_usage(data: ProfileData) -> RuleResult:
    names = [*SYSTEM_SUMMARY, *(f"gpu{g}_{m}" for g in data.gpu_ids for m in ("util", "memory"))]
    stats = {n: percentiles(_series(data, n)) for n in names}
    stats = {n: s for n, s in stats.items() if s}
    if not stats:
        return RuleResult("OverallSystemUsage", False, "no system samples")
    parts = [
        f"{n} p50 {s['p50']:.0f}% p95 {s['p95']:.0f}%"
        for n, s in stats.items()
        if n in ("cpu",) or n.endswith("_util")
    ]
    n = len(_series(data, "cpu"))
    return RuleResult("OverallSystemUsage", False, "; ".join(parts), datapoints=n)


@rule("OverallFrameworkMetrics")
def overall_framework_metrics(data: ProfileData) -> RuleResult:
    total = data.col("steps", "step_time")
    if not len(total):
        return RuleResult("OverallFrameworkMetrics", False, "no timed steps")
    shares = {}
    whole = np.nansum(total)
    for name in ("data_wait", "forward", "backward", "forward_backward", "optimizer"):
        v = data.col("steps", name)
        if len(v) and not np.isnan(v).all() and whole > 0:
            shares[name] = 100 * float(np.nansum(v) / whole)
    msg = f"{len(total)} steps, median {np.nanmedian(total) * 1000:.1f} ms; " + ", ".join(
        f"{k} {v:.0f}%" for k, v in shares.items()
    )
    return RuleResult("OverallFrameworkMetrics", False, msg, datapoints=len(total))
