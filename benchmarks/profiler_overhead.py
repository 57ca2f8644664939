"""What the profiler costs a training step, and how fast the report of a long run is written.

Claims (issue 11): a profiled run's step time is within 2% of an unprofiled one, and the report
of a 10,000-step run is written in under 5 s and weighs under 10 MB.

Three measurements, each side by side in this one process:

1. per-step cost of the profiler's hooks: the loop's step events fired through a
   CallbackList with and without the profiler around the same tiny step, interleaved;
2. whole runs: the same tiny training job with the profiler on and off, interleaved over
   rounds, compared by median training-epoch time (first epoch excluded: warm-up);
3. report generation for a synthetic 10,000-step run directory (20,000 system samples,
   100 classes): seconds and megabytes.

Run: .venv/bin/python benchmarks/profiler_overhead.py [--rounds 3] [--steps 20000]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from _timing import machine, side_by_side

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # write_dataset
sys.path.insert(0, str(ROOT / "tests" / "report"))  # synthetic_long_run

from visiontune.callbacks import Callback, CallbackList, TrainState  # noqa: E402
from visiontune.config import TrainConfig, build_config  # noqa: E402


def hook_cost(tmp: Path, steps: int, rounds: int) -> None:
    from visiontune.profile.callback import from_config

    cfg = build_config(TrainConfig, None, {"data": "x", "output": str(tmp)})
    model = torch.nn.Linear(64, 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))

    def run(cbs: CallbackList, state: TrainState, n: int, work: bool = True) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            cbs.fire("on_batch_start", state)
            cbs.fire("on_step_start", state, (x, y))
            if work:
                out = model(x)
                loss = torch.nn.functional.cross_entropy(out, y)
            else:
                out, loss = x, x[0, 0]
            cbs.fire("on_before_backward", state, out, loss)
            if work:
                opt.zero_grad()
                loss.backward()
            cbs.fire("on_after_backward", state, model)
            if work:
                opt.step()
            state.step += 1
            cbs.fire("on_step_end", state, (x, y), out, loss)
        return (time.perf_counter() - t0) / n

    state = TrainState(
        config=cfg, run_dir=tmp / "hooks", model=model, optimizer=opt, device=torch.device("cpu")
    )
    plain_cbs = CallbackList([Callback()])  # listens to nothing: the loop skips every event
    prof_cbs = CallbackList([from_config(cfg)])
    prof_cbs.fire("on_train_start", state)
    # Pure hook cost: the events alone, no model work around them.
    hooks = min(run(prof_cbs, state, steps, work=False) for _ in range(rounds))
    # The same tiny step with and without, in short interleaved blocks (load drifts alike).
    blocks = side_by_side(
        {
            "plain": lambda r: run(plain_cbs, state, steps // 50),
            "profiled": lambda r: run(prof_cbs, state, steps // 50),
        },
        20 * rounds,
    )
    prof_cbs.fire("on_train_end", state, None)
    p, q = statistics.median(blocks["plain"]), statistics.median(blocks["profiled"])
    print(
        f"1. hooks: the profiler's 5 step events cost {hooks * 1e6:.1f} us per step (best of {rounds})"
    )
    print(f"   on a 10 ms step that is {hooks / 0.01:.2%}; on a 100 ms step {hooks / 0.1:.3%}")
    print(
        f"   a tiny {p * 1e3:.2f} ms step (Linear 64->10, batch 32), median of interleaved blocks:"
    )
    print(f"   without profiler {p * 1e6:.0f} us, with {q * 1e6:.0f} us -> ratio {q / p:.3f}\n")


def whole_runs(tmp: Path, rounds: int) -> None:
    from helpers import write_dataset

    from visiontune.io import read_jsonl
    from visiontune.train import train

    data = write_dataset(tmp / "data", per_class={"train": 96, "valid": 8, "test": 8})
    base = {
        "model": "tiny_cnn",
        "weights": "none",
        "trainable": "all",
        "batch_size": 16,
        "epochs": 4,
        "progress": False,
        "data": str(data),
        "workers": 0,
    }

    def median_epoch(enabled: bool, r: int) -> float:
        out = tmp / f"run-{r}-{enabled}"
        cfg = build_config(
            TrainConfig, None, {**base, "output": str(out), "profiler": {"enabled": enabled}}
        )
        train(cfg)
        epochs = [
            m["epoch_time"] for m in read_jsonl(out / "metrics.jsonl") if m.get("split") == "train"
        ][1:]
        return statistics.median(epochs)

    times = side_by_side(
        {enabled: functools.partial(median_epoch, enabled) for enabled in (False, True)}, rounds
    )
    off, on = statistics.median(times[False]), statistics.median(times[True])
    print(f"2. whole runs (tiny_cnn, 192 images, batch 16, 0 workers), {rounds} rounds:")
    print(f"   median epoch without profiler {off:.3f} s, with {on:.3f} s -> ratio {on / off:.3f}")
    print("   (on a shared machine the round-to-round spread is larger than the hook cost above)\n")


def report_speed(tmp: Path) -> None:
    from test_report import synthetic_long_run

    from visiontune.report import write_report

    run = synthetic_long_run(tmp / "long")
    t0 = time.perf_counter()
    path = write_report(run)
    dt = time.perf_counter() - t0
    print("3. report of a 10,000-step run (20,000 system samples, 100 classes):")
    print(f"   written in {dt:.2f} s, {path.stat().st_size / 1e6:.2f} MB (targets: < 5 s, < 10 MB)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--skip-runs", action="store_true", help="skip the whole-run comparison")
    args = parser.parse_args()
    print(f"{machine()}; torch {torch.__version__}\n")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        hook_cost(tmp, args.steps, args.rounds)
        if not args.skip_runs:
            whole_runs(tmp, args.rounds)
        report_speed(tmp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
