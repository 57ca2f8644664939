"""What script mode adds to a user's script: by hand vs ``visiontune run`` vs one tuning trial.

Claim: a trial's wall time is within 1 s of running the script by hand. The same small script
(it sleeps, prints a metric per "epoch" and saves model.pth) runs, interleaved over several
rounds in one process: by hand (``python train.py --lr ...`` with the SM_* variables it needs),
through the ``visiontune run`` console command (a new process: CLI start-up included), through
:func:`visiontune.script.job.run_job` (what a tuning worker calls per trial) and as one trial of
an in-memory Optuna study (:func:`visiontune.script.objective.run_script_trial`). It prints the
median of each and the difference to by hand.

Run: .venv/bin/python benchmarks/script_overhead.py [--rounds 5] [--epochs 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _timing import machine, side_by_side, wall_time

SCRIPT = """\
import argparse, os, time
p = argparse.ArgumentParser()
p.add_argument("--lr", type=float)
p.add_argument("--epochs", type=int)
a = p.parse_args()
data = os.environ["SM_CHANNEL_TRAINING"]
for epoch in range(a.epochs):
    time.sleep(0.2)
    print(f"epoch {epoch}: loss={a.lr / (epoch + 1):.4f}")
open(os.path.join(os.environ["SM_MODEL_DIR"], "model.pth"), "wb").write(b"x" * 1000)
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()

    import optuna

    from visiontune.script.job import ScriptJob, run_job
    from visiontune.script.metrics import parse_metric_options
    from visiontune.script.objective import run_script_trial

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    root = Path(tempfile.mkdtemp(prefix="script-overhead-"))
    (root / "src").mkdir()
    (root / "src" / "train.py").write_text(SCRIPT)
    data = root / "data"
    (data / "a").mkdir(parents=True)
    (data / "a" / "x.txt").write_text("x")
    hps = {"lr": 0.1, "epochs": args.epochs}
    metric = "loss=loss=([0-9.]+)"
    defs = parse_metric_options([metric])
    study = optuna.create_study(direction="minimize")
    counter = iter(range(10**6))

    def by_hand() -> None:
        model = root / f"hand{next(counter)}"
        model.mkdir()
        env = {**os.environ, "SM_CHANNEL_TRAINING": str(data), "SM_MODEL_DIR": str(model)}
        cmd = [sys.executable, "train.py", "--epochs", str(args.epochs), "--lr", "0.1"]
        subprocess.run(cmd, cwd=root / "src", env=env, check=True, capture_output=True)

    def cli() -> None:
        out = root / f"cli{next(counter)}"
        cmd = [
            sys.executable, "-m", "visiontune", "run", str(root / "src" / "train.py"),
            "--channel", f"training={data}", "--hp", "lr=0.1", "--hp", f"epochs={args.epochs}",
            "--metric", metric, "--output", str(out), "--quiet",
        ]  # fmt: skip
        subprocess.run(cmd, check=True, capture_output=True)

    def job() -> None:
        out = root / f"job{next(counter)}"
        result = run_job(
            ScriptJob(
                entry_point=str(root / "src" / "train.py"),
                output=out,
                hyperparameters=hps,
                channels={"training": str(data)},
                metric_definitions=defs,
                echo=False,
            )
        )
        assert result.ok, result.failure_reason

    script = {
        "entry_point": "train.py",
        "source_dir": str(root / "src"),
        "channels": {"training": str(data)},
        "metric_definitions": [d.to_dict() for d in defs],
    }

    def trial() -> None:
        t = study.ask()
        value = run_script_trial(
            t, script, hps, {}, "loss", root / f"trial{next(counter)}", prune=True
        )
        study.tell(t, value)

    variants = {"by hand": by_hand, "visiontune run": cli, "run_job": job, "tuning trial": trial}
    # Warm-up first: page cache, imports.
    timed = {name: wall_time(fn) for name, fn in variants.items()}
    times = side_by_side(timed, args.rounds, warmup=True)

    print(f"script overhead: {args.rounds} rounds, {args.epochs} x 0.2 s epochs; {machine()}")
    hand = statistics.median(times["by hand"])
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"  {name:15s} median {med:6.3f} s   +{med - hand:6.3f} s   x{med / hand:5.2f}")
    trial_extra = statistics.median(times["tuning trial"]) - hand
    print(f"a tuning trial is {trial_extra:.3f} s slower than the script by hand (claim: < 1 s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
