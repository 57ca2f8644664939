"""Training step time with MLflow logging on vs off.

Claim: logging to MLflow costs the training loop under 2% of its step time, because the loop
only puts records on a queue (and reads the loss every ``log_every_steps``); a background
thread batches and sends them.

Both variants train the same tiny run (tiny_cnn, synthetic 64 px images, no feature cache,
workers 0) side by side in one process, interleaved over several rounds. The step time is
the median interval between consecutive ``on_step_end`` events. The store is a SQLite file
(``--tracking sqlite:///...``) unless ``--tracking URI`` names a server. The ratio is
reported per round and as the median over rounds; on a shared, busy machine the rounds
spread, so look at the median.

Run: .venv/bin/python benchmarks/tracking_overhead.py [--rounds 5] [--steps 60]
     [--log-every 1] [--tracking http://127.0.0.1:5000]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from _timing import machine, side_by_side

from visiontune.callbacks import Callback
from visiontune.config import TrainConfig, build_config


class StepClock(Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_step_end(self, state, batch, outputs, loss) -> None:
        self.times.append(time.perf_counter())

    def median_step(self) -> float:
        gaps = [b - a for a, b in zip(self.times, self.times[1:], strict=False)]
        return statistics.median(gaps)


def step_time(data: Path, out: Path, steps: int, tracking: dict | None) -> float:
    from visiontune.train import train

    values = {
        "data": str(data), "output": str(out), "model": "tiny_cnn", "weights": "none",
        "trainable": "all", "batch_size": 8, "workers": 0, "progress": False,
        "report": False, "epochs": 1, "max_steps_per_epoch": steps, "augment": "light",
        "tracking": tracking,
    }  # fmt: skip
    clock = StepClock()
    train(build_config(TrainConfig, None, values), [clock])
    return clock.median_step()


def main() -> int:
    from helpers import write_dataset

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--log-every", type=int, default=1, help="log the loss every N steps")
    parser.add_argument("--tracking", default=None, help="tracking URI (default: a SQLite file)")
    args = parser.parse_args()
    try:
        import mlflow  # noqa: F401
    except ImportError:
        print("skip: mlflow is not installed (pip install 'visiontune[mlflow]')")
        return 0
    print(machine())
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        per_class = {"train": args.steps * 4, "valid": 4, "test": 4}
        data = write_dataset(root / "data", per_class=per_class, size=64)
        uri = args.tracking or f"sqlite:///{root / 'mlflow.db'}"
        tracking = {"uri": uri, "experiment": "overhead", "log_every_steps": args.log_every}
        print(f"{args.steps} steps per run, loss logged every {args.log_every} step(s) to {uri}")
        step_time(data, root / "warmup", args.steps, tracking)  # imports, DB schema
        times = side_by_side(
            {
                "off": lambda r: step_time(data, root / f"off{r}", args.steps, None),
                "on": lambda r: step_time(data, root / f"on{r}", args.steps, tracking),
            },
            args.rounds,
        )
        ratios = []
        for r, (off, on) in enumerate(zip(times["off"], times["on"], strict=True)):
            ratios.append(on / off)
            print(
                f"round {r + 1}: step {off * 1e3:.2f} ms without, {on * 1e3:.2f} ms with "
                f"MLflow: ratio {on / off:.3f}"
            )
        median = statistics.median(ratios)
        print(f"median ratio with/without MLflow: {median:.3f} (claim: <= 1.02)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
