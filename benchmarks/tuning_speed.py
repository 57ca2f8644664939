"""Claim: tuning on cached features with early stopping is >= 20x faster than SageMaker-style
tuning (every trial a full training job from images), at equal best valid accuracy.

Same data (../shared/data/hymenoptera), same space, same trial budget, same sampler seed, in one
run, on this machine:

  (a) SageMaker-style: efficientnet_lite0, frozen backbone (trainable head), augment light, so
      every epoch of every trial decodes the images and pushes them through the backbone; no
      feature cache, no pruning.
  (b) visiontune: the same model with augment none, so the backbone features are computed once
      (the cache starts empty: that time is included) and every trial trains the head on them;
      early stopping auto (the median rule).

    .venv/bin/python benchmarks/tuning_speed.py [--trials 12] [--max-epochs 10] [--seed 0]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "hymenoptera"


def run_study(name: str, root: Path, data: Path, args, fixed_extra: dict, early: str) -> dict:
    from visiontune.config import TrainConfig, build_config
    from visiontune.tuning.space import parse_space
    from visiontune.tuning.storage import load_study
    from visiontune.tuning.study import TuneSettings, tune
    from visiontune.tuning.trials import best_trial

    space = parse_space(
        {
            "lr": {"type": "continuous", "min": 0.001, "max": 0.1, "scaling": "log"},
            "batch-size": {"type": "categorical", "values": [16, 32, 64]},
            "epochs": {"type": "integer", "min": 1, "max": args.max_epochs},
        }
    )
    fixed = build_config(
        TrainConfig,
        None,
        {
            "data": str(data),
            "model": "efficientnet_lite0",
            "weights": "imagenet",
            "trainable": "head",
            "seed": args.seed,
            "progress": False,
            "workers": args.workers,
            **fixed_extra,
        },
    )
    settings = TuneSettings(
        study=name,
        study_dir=str(root / name),
        max_trials=args.trials,
        objective=args.objective,
        strategy="bayesian",
        early_stopping=early,
        seed=args.seed,
        report=False,
    )
    t0 = time.perf_counter()
    result = tune(settings, fixed, space)
    wall = time.perf_counter() - t0
    study = load_study(name, result.storage)
    best = best_trial(study)
    trials = study.get_trials()
    accs = [t.user_attrs.get("valid_accuracy") for t in trials if t.state.name == "COMPLETE"]
    return {
        "wall": wall,
        "best_valid_accuracy": best.user_attrs.get("valid_accuracy") if best else float("nan"),
        "max_valid_accuracy": max((a for a in accs if a is not None), default=float("nan")),
        "best_params": best.params if best else None,
        "epochs": sum(t.user_attrs.get("epochs_run", 0) for t in trials),
        "counts": result.counts,
        "cache": any(t.user_attrs.get("used_feature_cache") for t in trials),
        "per_trial": [round(t.user_attrs.get("duration_s", float("nan")), 1) for t in trials],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--trials", type=int, default=12)
    p.add_argument("--max-epochs", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--objective",
        default="valid_accuracy",
        help="what both studies optimise (the claim compares best valid accuracy)",
    )
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers")
    args = p.parse_args()
    if not args.data.is_dir():
        print(f"skipped: {args.data} is absent (only in the project's CI checkout)")
        return 0
    with tempfile.TemporaryDirectory(prefix="vt-tuning-bench-") as tmp:
        root = Path(tmp)
        # An empty feature cache: (b) pays for computing the features inside its wall time.
        os.environ["VISIONTUNE_HOME"] = str(root / "home")
        print(
            f"{args.trials} trials, lr log 0.001-0.1, batch-size [16,32,64], epochs 1-"
            f"{args.max_epochs}, seed {args.seed}, {os.cpu_count()} CPUs",
            flush=True,
        )
        a = run_study(
            "sagemaker_style",
            root,
            args.data,
            args,
            {"augment": "light", "feature_cache": False},
            "off",
        )
        print(f"(a) sagemaker-style: {a}", flush=True)
        b = run_study(
            "visiontune_fast",
            root,
            args.data,
            args,
            {"augment": "none", "feature_cache": True},
            "auto",
        )
        print(f"(b) visiontune fast: {b}", flush=True)
    ratio = a["wall"] / b["wall"]
    gap = 100 * (b["best_valid_accuracy"] - a["best_valid_accuracy"])
    print()
    print(f"{'':24}{'wall s':>10}{'epochs':>8}{'best valid acc':>16}{'max valid acc':>15}")
    for label, r in (("(a) SageMaker-style", a), ("(b) cached + median", b)):
        print(
            f"{label:24}{r['wall']:>10.1f}{r['epochs']:>8}{r['best_valid_accuracy']:>16.4f}"
            f"{r['max_valid_accuracy']:>15.4f}"
        )
    print(
        f"speed-up: {ratio:.1f}x less wall time (target >= 20x); "
        f"best valid accuracy difference {gap:+.1f} points (target within 1)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
