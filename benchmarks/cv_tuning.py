"""Claim: on a small data set, a cross-validated study (``--cv``, then ``--train-best`` refits on
train+valid) reaches a better test accuracy than a study tuned against the tiny validation
split, and no worse than the untuned default.

Data: per seed, a small subset of ../shared/data/hymenoptera (``--train`` and ``--valid``
images per class drawn from its train split, a seeded sample), tested on all of its val split
(153 photos, never pooled). efficientnet_lite0, frozen, on cached features. In one run, per
seed, side by side:

  (a) default: ``visiontune train`` with the study's fixed options and default hyperparameters;
  (b) plain:   a study against the validation split (``--cv 0``), then ``--train-best``;
  (c) cv:      the same study with ``--cv auto`` (K folds of train+valid), then the refit.

    .venv/bin/python benchmarks/cv_tuning.py [--seeds 0 1 2] [--trials 10] [--max-epochs 25]
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import tempfile
from pathlib import Path

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "hymenoptera"
FIXED = {
    "model": "efficientnet_lite0",
    "trainable": "head",
    "augment": "none",
    "batch_size": 8,
    "progress": False,
    "report": False,
}


def space(max_epochs: int) -> dict:
    return {
        "lr": {"type": "continuous", "min": 0.001, "max": 0.3, "scaling": "log"},
        "epochs": {"type": "integer", "min": 3, "max": max_epochs},
        "weight_decay": {"type": "continuous", "min": 1e-5, "max": 0.3, "scaling": "log"},
    }


def subset(root: Path, seed: int, n_train: int, n_valid: int) -> Path:
    """Symlinks: n_train + n_valid images per class from train/, all of val/ as test/."""
    rng = random.Random(seed)
    for cls in sorted(p.name for p in (DATA / "train").iterdir()):
        files = sorted((DATA / "train" / cls).iterdir())
        rng.shuffle(files)
        for split, chosen in (
            ("train", files[:n_train]),
            ("valid", files[n_train : n_train + n_valid]),
            ("test", sorted((DATA / "val" / cls).iterdir())),
        ):
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for f in chosen:
                (root / split / cls / f.name).symlink_to(f)
    return root


def test_accuracy(run_dir: Path) -> float:
    import json

    return json.loads((run_dir / "evaluation.json").read_text())["accuracy"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--train", type=int, default=6, help="training images per class")
    parser.add_argument("--valid", type=int, default=2, help="validation images per class")
    parser.add_argument("--objective", default="valid_loss")
    parser.add_argument("--max-epochs", type=int, default=25)
    args = parser.parse_args()
    if not DATA.is_dir():
        sys.exit(f"needs {DATA}")
    from visiontune.config import TrainConfig, build_config
    from visiontune.train import train
    from visiontune.tuning.space import parse_space
    from visiontune.tuning.study import TuneSettings, tune

    print(f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores", flush=True)
    rows: dict[str, list[float]] = {"default": [], "plain": [], "cv": []}
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("VISIONTUNE_HOME", str(Path(tmp) / "home"))
        for seed in args.seeds:
            work = Path(tmp) / f"seed{seed}"
            data = subset(work / "data", seed, args.train, args.valid)
            fixed = build_config(
                TrainConfig, None, {**FIXED, "data": str(data), "seed": seed, "output": "x"}
            )
            default = train(fixed.model_copy(update={"output": str(work / "default")}))
            rows["default"].append(test_accuracy(default.run_dir))
            for name, cv in (("plain", 0), ("cv", "auto")):
                settings = TuneSettings(
                    study=name,
                    study_dir=str(work / name),
                    objective=args.objective,
                    max_trials=args.trials,
                    cv=cv,
                    train_best=True,
                    report=False,
                    seed=seed,
                )
                result = tune(settings, fixed, parse_space(space(args.max_epochs)))
                rows[name].append(test_accuracy(result.best_run))
            print(
                f"seed {seed}: test accuracy default {rows['default'][-1]:.3f}  "
                f"plain {rows['plain'][-1]:.3f}  cv {rows['cv'][-1]:.3f}",
                flush=True,
            )
    print(
        f"\nhymenoptera, {args.train}+{args.valid} images per class, efficientnet_lite0 frozen, "
        f"{args.trials} trials, objective {args.objective}, seeds {args.seeds}"
    )
    print("| method | test accuracy (mean ± sd over seeds) |\n|---|---|")
    for name, values in rows.items():
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"| {name} | {statistics.fmean(values):.3f} ± {sd:.3f} |")


if __name__ == "__main__":
    main()
