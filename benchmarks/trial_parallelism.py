"""Distributed trials against parallel trials: the same study, two ways to use the same cores.

Claim measured (not assumed): with P cores and a study of P trials, is it faster to run the
trials one after another, each a torchrun job of P processes (`visiontune tune --trial-nproc
P`), or P trials at once, one process each (`--parallel P`)? And both against one trial at a
time in one process (the default).

Every variant runs the same space (a grid of P learning rates, so the same P configurations)
through the real CLI, interleaved over several rounds so drift in the machine's load hits each
alike; the figure is the wall-clock time of the whole `visiontune tune` command (start-up, all
trials, the report), the best of the rounds. Ratios are against the sequential study.

Run: .venv/bin/python benchmarks/trial_parallelism.py [--nproc 2] [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def run(data: Path, where: Path, flags: list[str], args) -> float:
    lrs = ", ".join(str(0.05 / 2**i) for i in range(args.nproc))
    space = where / "space.yaml"
    where.mkdir(parents=True)
    space.write_text(f"lr: {{type: categorical, values: [{lrs}]}}\n")
    cmd = [sys.executable, "-m", "visiontune", "tune", "--data", str(data), "--space", str(space),
           "--study", "b", "--max-trials", str(args.nproc), "--strategy", "grid",
           "--model", args.model, "--weights", "none", "--trainable", args.trainable,
           "--augment", args.augment, "--batch-size", str(args.batch_size),
           "--epochs", str(args.epochs), "--workers", "0", "--set", "precision=fp32",
           *flags]  # fmt: skip
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=where)
    took = time.perf_counter() - t0
    if p.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stderr}")
    return took


def main() -> int:
    from _timing import cpu_name
    from helpers import write_dataset

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--images-per-class", type=int, default=64)
    parser.add_argument("--model", default="tiny_cnn")
    parser.add_argument("--trainable", default="all")
    parser.add_argument("--augment", default="light")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        os.environ.setdefault("VISIONTUNE_HOME", str(tmp_path / "home"))
        os.environ.pop("OMP_NUM_THREADS", None)  # each variant shares the cores out itself
        data = write_dataset(
            tmp_path / "data", classes=("a", "b", "c", "d"), size=128,
            per_class={"train": args.images_per_class, "valid": 8, "test": 8},
        )  # fmt: skip
        n = args.nproc
        print(f"CPU: {cpu_name()} ({os.cpu_count()} logical cores)")
        print(f"{n} trials of {args.model} ({args.trainable} trainable, augment {args.augment}), "
              f"{4 * args.images_per_class} training images of 128 px, batch {args.batch_size}, "
              f"{args.epochs} epochs\n")  # fmt: skip
        variants = {
            "sequential (1 process, 1 trial at a time)": [],
            f"--trial-nproc {n} (1 trial at a time, {n} processes)": ["--trial-nproc", str(n)],
            f"--parallel {n} ({n} trials at once, 1 process each)": ["--parallel", str(n)],
        }
        took: dict[str, list[float]] = {v: [] for v in variants}
        for r in range(args.rounds):
            for i, (name, flags) in enumerate(variants.items()):
                took[name].append(run(data, tmp_path / f"r{r}v{i}", flags, args))
        base = min(took[next(iter(variants))])
        print(f"{'variant':<52} {'seconds':>8} {'speed-up':>9}")
        for name, values in took.items():
            print(f"{name:<52} {min(values):>8.1f} {base / min(values):>8.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
