"""Test-time augmentation: test accuracy with and without it, and what it costs in latency.

Claim: ``--tta`` (the image and its mirror, averaged probabilities) changes test accuracy by the
figure printed here, and costs about ``views`` times the model time per image. Accuracy with and
without TTA comes from one ``evaluate`` pass (its ``tta.single_view`` is the plain image of the
same pass); latencies are measured side by side in one process, interleaved over rounds.

Set up (frozen efficientnet_lite0 head, a few epochs, hymenoptera's val folder kept as test):

    mkdir -p /tmp/hym && cp -r ../shared/data/hymenoptera/train /tmp/hym/train \\
        && cp -r ../shared/data/hymenoptera/val /tmp/hym/test
    visiontune train --data /tmp/hym --output runs/hym-tta --epochs 5

Run: .venv/bin/python benchmarks/tta.py --model runs/hym-tta/model --data /tmp/hym
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

from _timing import cpu_name


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="runs/hym-tta/model")
    parser.add_argument("--data", default="/tmp/hym")
    parser.add_argument("--split", default="test")
    parser.add_argument("--views", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--images", type=int, default=16, help="images timed one by one")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--precision", default="auto", help="auto (bf16 where the CPU has it) or fp32"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--skip-accuracy", action="store_true")
    args = parser.parse_args()
    if not Path(args.model).is_dir() or not Path(args.data).is_dir():
        print(f"skip: {args.model} or {args.data} is missing (see the set-up in this docstring)")
        return 0

    import torch

    from visiontune.evaluate import Predictor, evaluate, evaluation_split
    from visiontune.models.artifact import read_meta

    if args.threads:
        torch.set_num_threads(args.threads)

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(
        f"CPU: {cpu_name()} ({cores} cores available, torch threads {torch.get_num_threads()}); "
        f"model {args.model}\n"
    )

    print(f"accuracy on {args.split} of {args.data} (torch, CPU):")
    print("views  accuracy  plain image  loss    plain loss")
    for views in [] if args.skip_accuracy else args.views:
        m = evaluate(args.model, args.data, args.split, device="cpu", tta=views, progress=False)
        single = m["tta"]["single_view"]
        print(
            f"{views:>5}  {m['accuracy']:.4f}    {single['accuracy']:.4f}       "
            f"{m['loss']:.4f}  {single['loss']:.4f}   ({m['count']} images)"
        )

    chosen = evaluation_split(read_meta(args.model), args.model, args.data, args.split)
    paths = [path for path, _ in chosen.items[: args.images]]
    predictors = {
        views: Predictor(args.model, device="cpu", precision=args.precision, tta=views)
        for views in [0, *args.views]
    }
    for predictor in predictors.values():
        predictor.predict_proba(paths[:1])  # warm-up: first-call allocations, kernel choice
    times: dict[int, list[float]] = {views: [] for views in predictors}
    for _ in range(args.rounds):  # interleaved so drift in machine load hits every variant alike
        for views, predictor in predictors.items():
            for path in paths:
                start = time.perf_counter()
                predictor.predict_proba([path])
                times[views].append(time.perf_counter() - start)
    base = statistics.median(times[0])
    print(
        f"\npredict latency ({args.precision}), one image per call (decode + model), "
        f"median of {len(times[0])}:"
    )
    for views, samples in times.items():
        ms = statistics.median(samples) * 1000
        label = "no TTA" if not views else f"--tta-views {views}"
        print(f"{label:>14}: {ms:7.1f} ms  ({statistics.median(samples) / base:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
