"""Data-parallel scaling on this machine's CPU: one process against N under torchrun.

Claim measured (not assumed): how much faster `visiontune train --nproc-per-node N` trains than
one process on the same cores, with the same global batch. On a CPU the processes share the
cores (the launcher gives each OMP_NUM_THREADS = cores / N), so the gain comes from running
data loading, Python overhead and gradient all-reduce side by side, and can be below 1.

Both variants run through the real CLI, interleaved over several rounds so drift in the
machine's load hits both alike; throughput is the job-wide images/s training logged for its
epochs after the first (the first one pays for start-up). Scaling efficiency is
(images/s with N) / (N x images/s with 1).

Run: .venv/bin/python benchmarks/distributed_scaling.py [--nproc 2] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _timing import machine, side_by_side

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def run(data: Path, out: Path, nproc: int, threads: int, args) -> float:
    cmd = [sys.executable, "-m", "visiontune", "train", "--data", str(data), "--output", str(out),
           "--model", args.model, "--weights", "none", "--trainable", "all", "--augment", "light",
           "--batch-size", str(args.batch_size), "--epochs", str(args.epochs), "--workers", "1",
           "--precision", "fp32", "--set", "progress=false", "--set", "report=false"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if nproc > 1:
        cmd += ["--nproc-per-node", str(nproc)]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stderr}")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    ips = [r["images_per_sec"] for r in rows if r["split"] == "train" and r["epoch"] > 1]
    return statistics.mean(ips)


def main() -> int:
    from helpers import write_dataset

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--images-per-class", type=int, default=64)
    parser.add_argument("--model", default="tiny_cnn")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        os.environ.setdefault("VISIONTUNE_HOME", str(tmp_path / "home"))
        data = write_dataset(
            tmp_path / "data", classes=("a", "b", "c", "d"), size=128,
            per_class={"train": args.images_per_class, "valid": 8, "test": 8},
        )  # fmt: skip
        print(machine())
        print(f"{args.model}, all layers trainable, {4 * args.images_per_class} training images "
              f"of 128 px, global batch {args.batch_size}, {args.epochs} epochs\n")  # fmt: skip
        cores = os.cpu_count() or 1
        share = max(1, cores // args.nproc)
        # One process with every core, one with an N-th of them, N processes with an N-th each:
        # the fair baseline is the faster single process.
        variants = [(1, cores), (1, share), (args.nproc, share)]

        def measure(nproc: int, threads: int):
            return lambda r: run(data, tmp_path / f"run{r}-{nproc}x{threads}", nproc, threads, args)

        ips = side_by_side({v: measure(*v) for v in variants}, args.rounds)
        print(f"{'processes':>10} {'threads each':>13} {'images/s':>10}")
        for (nproc, threads), values in ips.items():
            print(f"{nproc:>10} {threads:>13} {max(values):>10.1f}")
        single = max(max(ips[variants[0]]), max(ips[variants[1]]))
        many = max(ips[variants[2]])
        print(
            f"\nspeed-up over the faster single process x{many / single:.2f}, "
            f"scaling efficiency {many / (args.nproc * single):.0%}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
