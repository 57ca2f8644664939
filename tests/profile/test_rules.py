"""Profiler rules on series shaped like real GPU and CPU runs (CI has no GPU to record them).

Each fixture is a utilisation series of the shape its situation produces on a real machine:
the seed's job (GPU idle, p50 0%, because its loader had 0 workers), a healthy busy GPU, a GPU
swinging between busy and idle, a CPU-bound feeder, a leak, and two unequally loaded GPUs.
"""

from __future__ import annotations

import numpy as np
import pytest

from visiontune.profile.data import ProfileData
from visiontune.profile.rules import RULES, evaluate_rules

N = 1200  # 10 minutes at 500 ms
rng = np.random.default_rng(0)


def profile(
    gpus: list[dict[str, np.ndarray]] | None = None, cpu=None, iowait=None, **meta
) -> ProfileData:
    t = 1000.0 + 0.5 * np.arange(N)
    system = {
        "time": t,
        "cpu": np.asarray(cpu if cpu is not None else rng.uniform(20, 40, N), dtype=float),
        "iowait": np.asarray(iowait if iowait is not None else rng.uniform(0, 2, N), dtype=float),
        "memory": np.full(N, 30.0),
        "workers": np.full(N, float(meta.get("workers", 4))),
    }
    for i, g in enumerate(gpus or []):
        system[f"gpu{i}_util"] = np.asarray(g["util"], dtype=float)
        system[f"gpu{i}_memory"] = np.asarray(g.get("memory", np.full(N, 40.0)), dtype=float)
    m = {
        "start": 990.0,
        "first_step": 1000.0,
        "end": t[-1],
        "workers": 4,
        "cores": 16,
        "batch_size": 32,
    }
    m.update(meta)
    return ProfileData(system=system, meta=m)


def seed_idle() -> np.ndarray:
    """The seed's job: idle between short bursts while one process decodes every image."""
    u = np.zeros(N)
    u[rng.choice(N, N // 20, replace=False)] = rng.uniform(30, 60, N // 20)
    return u


def busy() -> np.ndarray:
    return rng.uniform(88, 99, N)


def fluctuating() -> np.ndarray:
    return np.where((np.arange(N) // 20) % 2 == 0, rng.uniform(90, 99, N), rng.uniform(0, 5, N))


def fired(data: ProfileData) -> dict[str, object]:
    return {r.rule: r for r in evaluate_rules(data=data)}


def test_seed_job_fires_low_gpu_utilization_with_a_workers_recommendation():
    r = fired(profile([{"util": seed_idle()}], workers=0))
    low = r["LowGPUUtilization"]
    assert low.applicable and low.triggered
    assert "--workers 12" in low.recommendation  # 70% of 16 cores
    assert low.parameters == {
        "threshold_p95": 70,
        "threshold_p5": 10,
        "window": 500,
        "patience": 1000,
    }
    assert r["Dataloader"].triggered and "0 workers on 16 cores" in r["Dataloader"].recommendation


def test_busy_gpu_is_quiet():
    r = fired(profile([{"util": busy(), "memory": np.full(N, 80.0)}], cpu=rng.uniform(60, 80, N)))
    for name in (
        "LowGPUUtilization",
        "CPUBottleneck",
        "IOBottleneck",
        "BatchSize",
        "GPUMemoryIncrease",
    ):
        assert r[name].applicable and not r[name].triggered, (name, r[name].message)


def test_fluctuating_gpu_fires_low_utilization_as_a_swing():
    low = fired(profile([{"util": fluctuating()}]))["LowGPUUtilization"]
    assert low.triggered and "p5" in low.message and "swings" in low.recommendation


def test_cpu_bound_feeder_fires_cpu_bottleneck_only_beyond_half_the_samples():
    gpu = np.full(N, 3.0)
    r = fired(profile([{"util": gpu}], cpu=np.full(N, 95.0)))
    assert r["CPUBottleneck"].triggered and r["CPUBottleneck"].violations == N - 1000
    half = np.where(np.arange(N) % 10 < 4, 95.0, 50.0)  # 40% of samples: under the 50% default
    assert not fired(profile([{"util": gpu}], cpu=half))["CPUBottleneck"].triggered


def test_io_bottleneck_needs_an_idle_gpu_and_high_iowait():
    r = fired(profile([{"util": np.full(N, 2.0)}], iowait=np.full(N, 70.0)))
    assert r["IOBottleneck"].triggered
    r = fired(profile([{"util": busy()}], iowait=np.full(N, 70.0)))
    assert not r["IOBottleneck"].triggered


def test_batch_size_fires_when_cpu_gpu_and_gpu_memory_are_all_underused():
    r = fired(profile([{"util": rng.uniform(30, 50, N), "memory": np.full(N, 10.0)}]))
    assert r["BatchSize"].triggered and "--batch-size 64" in r["BatchSize"].recommendation


def test_gpu_memory_increase_fires_on_a_leak_not_on_a_plateau():
    leak = np.linspace(20, 60, N)
    assert fired(profile([{"util": busy(), "memory": leak}]))["GPUMemoryIncrease"].triggered
    flat = 50 + rng.normal(0, 0.5, N)
    assert not fired(profile([{"util": busy(), "memory": flat}]))["GPUMemoryIncrease"].triggered


def test_load_balancing_compares_gpus():
    r = fired(profile([{"util": busy()}, {"util": rng.uniform(10, 30, N)}]))
    assert r["LoadBalancing"].triggered
    r = fired(profile([{"util": busy()}, {"util": busy()}]))
    assert not r["LoadBalancing"].triggered
    one = fired(profile([{"util": busy()}]))["LoadBalancing"]
    assert not one.applicable and not one.triggered


def test_on_cpu_gpu_rules_are_not_applicable_and_never_fire():
    r = fired(profile(None, cpu=np.full(N, 99.0), workers=0))
    for name in (
        "LowGPUUtilization",
        "CPUBottleneck",
        "BatchSize",
        "GPUMemoryIncrease",
        "LoadBalancing",
    ):
        assert not r[name].applicable and not r[name].triggered
        assert r[name].message.startswith("not applicable")


def test_step_outlier_counts_steps_over_mean_plus_three_std():
    times = np.full(500, 0.1)
    times[[100, 200, 300]] = 2.0
    data = ProfileData(steps={"step": np.arange(1, 501.0), "step_time": times})
    r = fired(data)["StepOutlier"]
    assert r.violations == 3 and r.steps == [101, 201, 301]
    assert not r.triggered  # SageMaker's n_outliers=10 tolerates a few
    times[::40] = 2.0
    assert fired(data)["StepOutlier"].triggered


def test_max_initialization_time_is_twenty_minutes():
    assert fired(profile(None, start=1000.0 - 21 * 60))["MaxInitializationTime"].triggered
    assert not fired(profile(None, start=1000.0 - 19 * 60))["MaxInitializationTime"].triggered


@pytest.mark.parametrize(
    ("workers", "cores", "fires"),
    [
        (0, 16, True),
        (8, 16, True),
        (12, 16, False),
        (0, 2, True),
        (2, 2, False),
        (0, 1, False),
        (40, 16, True),
    ],
)
def test_dataloader_rule_wants_70_to_200_percent_of_cores(workers, cores, fires):
    assert fired(profile(None, workers=workers, cores=cores))["Dataloader"].triggered is fires


def test_data_wait_share_ignores_each_epochs_loader_startup():
    steps = np.arange(1, 21.0)
    epoch = np.repeat([1.0, 2.0], 10)
    wait = np.full(20, 0.001)
    wait[[0, 10]] = 1.0  # workers starting at each epoch's first batch
    data = ProfileData(
        steps={"step": steps, "epoch": epoch, "data_wait": wait, "step_time": wait + 0.05},
        meta={"workers": 2, "cores": 2},
    )
    assert not fired(data)["DataWaitShare"].triggered
    data.steps["data_wait"] = np.full(20, 0.05)
    data.steps["step_time"] = np.full(20, 0.1)
    r = fired(data)["DataWaitShare"]
    assert r.triggered and "50%" in r.message


def test_every_rule_has_sagemaker_defaults_and_a_recommendation_when_it_fires():
    assert RULES["CPUBottleneck"][1] == {
        "threshold": 50,
        "gpu_threshold": 10,
        "cpu_threshold": 90,
        "patience": 1000,
    }
    assert RULES["Dataloader"][1] == {"min_threshold": 70, "max_threshold": 200}
    assert RULES["MaxInitializationTime"][1] == {"threshold": 20}
    for data in (profile([{"util": seed_idle()}], workers=0), profile([{"util": fluctuating()}])):
        for r in evaluate_rules(data=data):
            if r.triggered:
                assert r.recommendation and r.recommendation.count(".") <= 1, r.rule
