"""A training job from a user's script: SageMaker's script mode, on this machine, unchanged.

:func:`run_job` lays out the training environment in the run directory (see
:mod:`visiontune.script.environment`), runs ``python ENTRY_POINT --name value ...`` from the
source directory in its own process group, streams its stdout and stderr to the terminal and to
``logs/``, extracts the metric definitions into ``metrics.jsonl`` as lines are printed, and on
exit packs ``model/`` into ``model.tar.gz`` and records the outcome in ``job.json``:

``RUN/``
    ``input/config/*.json`` ``model/`` ``output/{data,intermediate}/``  (SageMaker's ``/opt/ml``)
    ``logs/stdout.log`` ``logs/stderr.log`` ``metrics.jsonl`` ``job.json`` ``model.tar.gz``
    ``output/failure``  (the failure reason, where SageMaker writes it, when the script failed)

Statuses are SageMaker's: ``Completed``; ``Failed`` (non-zero exit, with ``failure_reason``
built from the last lines of stderr); ``Stopped`` (``--max-run`` passed: secondary status
``MaxRuntimeExceeded``; or a caller asked, e.g. a tuning pruner). Stopping sends SIGTERM to the
script's whole process group (DataLoader workers included) and SIGKILL after ``stop_grace``
seconds.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from visiontune.errors import UserError
from visiontune.io import atomic_write, atomic_write_json, atomic_write_text
from visiontune.script.channels import resolve_channel
from visiontune.script.environment import TrainingEnvironment
from visiontune.script.metrics import MetricDefinition, MetricExtractor

COMPLETED, FAILED, STOPPED, IN_PROGRESS = "Completed", "Failed", "Stopped", "InProgress"
MAX_RUNTIME_EXCEEDED = "MaxRuntimeExceeded"
TAIL_LINES = 20  # stderr lines kept for the failure reason
EXIT_MAX_RUN = 124  # what `timeout` returns when it stops a command

# Called with (metric name, value, step) for each printed value; a returned string stops the
# job with that reason (a tuning pruner's way in).
MetricHook = Callable[[str, float, int], "str | None"]


@dataclass
class ScriptJob:
    """Everything a script-mode training job needs; the estimator's arguments, in short.

    Args:
        entry_point: the script, relative to ``source_dir`` when one is given.
        output: the run directory (SageMaker's ``/opt/ml``); must not hold an earlier job.
        source_dir: the folder the script runs from (default: the script's folder).
        hyperparameters: passed as ``--name value`` arguments and in ``SM_HPS``.
        channels: channel name -> local folder or ``s3://`` prefix.
        metric_definitions: the metrics to extract from the log.
        extra_args: arguments appended after the hyperparameters.
        python: the interpreter (default: the one running visiontune).
        max_run: seconds before the script is stopped (SageMaker's ``max_run``).
        stop_grace: seconds between SIGTERM and SIGKILL when stopping.
        endpoint_url: S3-compatible endpoint for ``s3://`` channels.
        job_name: the job's name (default: script name + timestamp, as the SDK makes it).
        echo: stream the script's output to this process's stdout/stderr.
        env: extra environment variables for the script.
        profile: sample the machine and the script's process tree every
            ``profile_interval`` seconds into ``RUN/profile/system/`` (the profiler's system
            sampler: the script and its workers are the ``workers`` columns).
        profile_interval: seconds between samples.
    """

    entry_point: str
    output: Path
    source_dir: Path | None = None
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    channels: dict[str, str] = field(default_factory=dict)
    metric_definitions: list[MetricDefinition] = field(default_factory=list)
    extra_args: list[str] = field(default_factory=list)
    python: str | None = None
    max_run: float | None = None
    stop_grace: float = 30.0
    endpoint_url: str | None = None
    job_name: str | None = None
    echo: bool = True
    env: dict[str, str] = field(default_factory=dict)
    profile: bool = False
    profile_interval: float = 0.5


@dataclass
class JobResult:
    """How a script-mode job ended (also written to ``RUN/job.json``)."""

    job_name: str
    status: str
    secondary_status: str
    exit_code: int | None
    failure_reason: str | None
    run_dir: str
    model_dir: str
    model_archive: str | None
    final_metrics: dict[str, float]
    metric_series: dict[str, list[float]]
    duration_s: float
    stderr_tail: list[str]

    @property
    def ok(self) -> bool:
        return self.status == COMPLETED

    def cli_exit_code(self) -> int:
        """The exit code ``visiontune run`` ends with: 0, the script's own, or 124/130."""
        if self.status == COMPLETED:
            return 0
        if self.secondary_status == MAX_RUNTIME_EXCEEDED:
            return EXIT_MAX_RUN
        if self.exit_code is None or self.status == STOPPED:
            return 130
        return self.exit_code if self.exit_code > 0 else 128 - self.exit_code


def default_job_name(entry_point: str) -> str:
    """``train-2026-11-25-20-48-22-123``: the SDK's ``base_job_name`` + timestamp form."""
    stem = re.sub(r"[^A-Za-z0-9-]+", "-", Path(entry_point).stem).strip("-") or "job"
    now = datetime.now(UTC)
    return f"{stem[:40]}-{now:%Y-%m-%d-%H-%M-%S}-{now.microsecond // 1000:03d}"


def checked_max_run(value: Any) -> float | None:
    """``max_run`` (from ``--max-run`` or the notebook YAML) as positive seconds, or ``None``.

    Raises:
        UserError: not a number, or not above 0 (the script would be stopped at once and the
            run directory used up by a job that never ran).
    """
    if value is None:
        return None
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise UserError(f"--max-run (max_run) must be a number of seconds, got {value!r}") from None
    if not seconds > 0 or math.isinf(seconds):
        raise UserError(f"--max-run (max_run) must be more than 0 seconds, got {value!r}")
    return seconds


# SageMaker's TrainingJobName pattern: scripts read the name (TRAINING_JOB_NAME, SM_TRAINING_ENV)
# and it is the default run directory's last part.
_JOB_NAME = re.compile(r"[A-Za-z0-9](-*[A-Za-z0-9]){0,62}")


def check_job_name(name: str) -> None:
    """Refuse a job name SageMaker would refuse.

    Beyond SageMaker's rule, the name is the default run directory ``runs/NAME``: a slash made
    nested folders there, and ``..`` a run directory outside ``runs/``.

    Raises:
        UserError: not 1-63 letters, digits and hyphens starting and ending with a letter or
            digit.
    """
    if not _JOB_NAME.fullmatch(name):
        raise UserError(
            f"--job-name {name!r}: a training job name is 1 to 63 letters, digits and hyphens, "
            "starting and ending with a letter or digit (SageMaker's rule)"
        )


def check_output(output: str | os.PathLike) -> None:
    """Refuse a URL as a job's run directory: the job writes it on this machine.

    ``Path("s3://bucket/run")`` is the local folder ``s3:/bucket/run``; taking it silently
    would leave the model in a folder named ``s3:`` while the user looks for it in the bucket.

    Raises:
        UserError: ``output`` is a URL.
    """
    if _URL_LIKE.match(os.fspath(output)):
        raise UserError(
            f"--output {os.fspath(output).replace(':/', '://', 1)}: a script-mode job's run "
            "directory is a local folder (SageMaker's output_path is not uploaded to); "
            "give a local path"
        )


# ``s3://x`` as typed, or as ``Path`` leaves it (``s3:/x``): a scheme, a colon and a slash.
_URL_LIKE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:/")


def resolve_entry_point(entry_point: str, source_dir: Path | None) -> tuple[Path, str]:
    """``(source_dir, entry point relative to it)``, as the estimator resolves them.

    Raises:
        UserError: the folder or the script does not exist, or the script is outside the folder.
    """
    if source_dir is None:
        script = Path(entry_point).expanduser()
        if not script.is_file():
            raise UserError(f"script not found: {entry_point}")
        return script.absolute().parent, script.name
    folder = Path(source_dir).expanduser().absolute()
    if not folder.is_dir():
        raise UserError(f"--source-dir {source_dir} is not a folder")
    candidates = [folder / entry_point, Path(entry_point).expanduser().absolute()]
    for script in candidates:
        if script.is_file() and script.absolute().is_relative_to(folder):
            return folder, script.absolute().relative_to(folder).as_posix()
    raise UserError(f"script {entry_point} not found in --source-dir {folder}")


_REQUIREMENTS_CHECK = r"""
import json, sys
from importlib import metadata
try:
    from packaging.requirements import Requirement
except ImportError:
    Requirement = None
missing = []
for line in open(sys.argv[1], encoding="utf-8"):
    line = line.split("#", 1)[0].strip()
    if not line or line.startswith("-"):
        continue
    name, spec = line, None
    if Requirement is not None:
        try:
            req = Requirement(line)
        except Exception:
            continue
        if req.marker is not None and not req.marker.evaluate():
            continue
        name, spec = req.name, req.specifier
    try:
        version = metadata.version(name)
    except metadata.PackageNotFoundError:
        missing.append(line)
        continue
    if spec and not spec.contains(version, prereleases=True):
        missing.append(f"{line} (found {version})")
print(json.dumps(missing))
"""


def missing_requirements(python: str, requirements: Path) -> list[str]:
    """The lines of ``requirements`` that ``python`` does not satisfy (SageMaker would install
    them; visiontune only reports them, since this machine may have no network)."""
    try:
        out = subprocess.run(
            [python, "-c", _REQUIREMENTS_CHECK, str(requirements)],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        return list(json.loads(out.strip().splitlines()[-1]))
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return []


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def stop_process_group(proc: subprocess.Popen, grace: float) -> bool:
    """SIGTERM the process group, SIGKILL it after ``grace`` seconds; True if it was killed."""
    _signal_group(proc, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
        return False
    except subprocess.TimeoutExpired:
        _signal_group(proc, signal.SIGKILL)
        proc.wait()
        return True


def _echo_target(stream_name: str) -> Callable[[bytes], None]:
    """A writer of raw lines to this process's stdout or stderr (bytes where it takes them)."""
    target = getattr(sys, stream_name)
    buffer = getattr(target, "buffer", None)

    def write(raw: bytes) -> None:
        target.flush()
        if buffer is not None:
            buffer.write(raw)
            buffer.flush()
        else:
            target.write(raw.decode("utf-8", "replace"))
            target.flush()

    return write


def _pump(
    stream: IO[bytes],
    log_path: Path,
    echo: Callable[[bytes], None] | None,
    extractor: MetricExtractor,
    tail: deque[str],
) -> None:
    """Copy one pipe to its log file and the terminal, line by line, extracting metrics."""
    with open(log_path, "ab") as log:
        for raw in iter(stream.readline, b""):
            log.write(raw)
            log.flush()
            if echo is not None:
                try:
                    echo(raw)
                except (OSError, ValueError, TypeError):
                    echo = None  # the terminal went away; keep logging
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            tail.append(line)
            # A progress bar redraws with \r; each redraw is a line of its own for the regexes.
            for part in line.split("\r"):
                if part:
                    extractor.feed(part)
    stream.close()


def pack_model(model_dir: Path, archive: Path) -> Path:
    """``model.tar.gz`` of ``model_dir``'s contents at the archive's top, as SageMaker packs it."""

    def write(tmp: str) -> None:
        with tarfile.open(tmp, "w:gz") as tar:
            for p in sorted(model_dir.iterdir()):
                tar.add(p, arcname=p.name)

    atomic_write(archive, write)
    return archive


def failure_reason(exit_code: int, stderr_tail: list[str], stdout_tail: list[str]) -> str:
    """SageMaker's ``FailureReason`` shape, with the script's last error lines as the message."""
    lines = [s for s in stderr_tail if s.strip()] or [s for s in stdout_tail if s.strip()]
    if exit_code < 0:
        try:
            code = f"ExitCode {exit_code} (killed by {signal.Signals(-exit_code).name})"
        except ValueError:
            code = f"ExitCode {exit_code}"
    else:
        code = f"ExitCode {exit_code}"
    message = " | ".join(lines[-3:]) if lines else "the script printed nothing"
    return f"AlgorithmError: ExecuteUserScriptError: {code}: {message}"


def prepare(job: ScriptJob) -> tuple[TrainingEnvironment, list[str], dict[str, Any]]:
    """Check the job, resolve its channels and lay out the environment.

    Returns:
        the environment, the command line, and the channel record for ``job.json``.

    Raises:
        UserError: a missing script, folder, channel or interpreter, or a reused run directory.
    """
    source_dir, entry = resolve_entry_point(job.entry_point, job.source_dir)
    python = job.python or sys.executable
    if shutil.which(python) is None and not Path(python).is_file():
        raise UserError(f"--python {python} not found")
    if job.job_name is not None:
        check_job_name(job.job_name)
    check_output(job.output)
    checked_max_run(job.max_run)
    if not job.stop_grace >= 0:
        raise UserError(f"--stop-grace must be 0 or more seconds, got {job.stop_grace!r}")
    output = Path(job.output).expanduser().absolute()
    if (output / "job.json").exists():
        raise UserError(f"{output} already holds a training job; choose another --output")
    channels = {
        name: resolve_channel(name, where, job.endpoint_url) for name, where in job.channels.items()
    }
    _check_output_outside_channels(output, channels)
    env = TrainingEnvironment(
        base_dir=output,
        entry_point=entry,
        source_dir=source_dir,
        hyperparameters=dict(job.hyperparameters),
        channels=channels,
        job_name=job.job_name or default_job_name(entry),
        region=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"),
    )
    env.write()
    command = [python, str(source_dir / entry), *env.cmd_args(), *job.extra_args]
    record = {
        name: {"source": job.channels[name], "path": str(path)} for name, path in channels.items()
    }
    return env, command, record


def _check_output_outside_channels(output: Path, channels: dict[str, Path]) -> None:
    """Refuse a run directory in (or equal to) a channel's folder.

    The job writes model/, logs/ and input/config/ there: the script walking its channel read
    them as training data, and every later job on that folder did too.

    Raises:
        UserError: ``output`` is a channel's folder or inside one.
    """
    out = output.resolve()
    for name, folder in channels.items():
        folder = folder.resolve()
        if out == folder or folder in out.parents:
            raise UserError(
                f"--output {output} is inside channel {name} ({folder}): the job's files "
                "would become part of its data; choose an --output outside it"
            )


def _child_env(env: TrainingEnvironment, job: ScriptJob) -> dict[str, str]:
    child = dict(os.environ)
    child.update(env.env_vars(job.extra_args))
    # Prints must arrive as they happen: metrics drive pruning and the live log.
    child["PYTHONUNBUFFERED"] = "1"
    child["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(env.source_dir), os.environ.get("PYTHONPATH", "")) if p
    )
    child.update(job.env)
    return child


def run_job(job: ScriptJob, on_metric: MetricHook | None = None) -> JobResult:
    """Run the script as a SageMaker training job and record how it went.

    Args:
        job: the job.
        on_metric: called for every metric value as it is printed; a returned string stops
            the script (status ``Stopped``, that string as the reason).

    Returns:
        the outcome; a failing script is a result, not an exception.

    Raises:
        UserError: the job cannot start (see :func:`prepare`).
        KeyboardInterrupt: after the script was stopped and the job recorded as ``Stopped``.
    """
    env, command, channel_record = prepare(job)
    run_dir = env.base_dir
    logs = run_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    missing: list[str] = []
    requirements = env.source_dir / "requirements.txt"
    if requirements.is_file():
        missing = missing_requirements(command[0], requirements)
        if missing:
            print(
                f"warning: {requirements} lists packages {command[0]} lacks: "
                f"{', '.join(missing)}; SageMaker would install them: "
                f"{command[0]} -m pip install -r {requirements}",
                file=sys.stderr,
            )

    started = time.time()
    record: dict[str, Any] = {
        "job_name": env.job_name,
        "status": IN_PROGRESS,
        "entry_point": env.entry_point,
        "source_dir": str(env.source_dir),
        "command": command,
        "hyperparameters": dict(job.hyperparameters),
        "channels": channel_record,
        "metric_definitions": [d.to_dict() for d in job.metric_definitions],
        "max_run": job.max_run,
        "missing_requirements": missing,
        "started": datetime.fromtimestamp(started, UTC).isoformat(),
    }
    atomic_write_json(run_dir / "job.json", record)

    stop = _StopRequest()
    hook_errors: list[str] = []

    def on_value(name: str, value: float, step: int) -> None:
        if on_metric is None or stop.reasons or hook_errors:
            return
        try:
            reason = on_metric(name, value, step)
        except Exception as e:  # the pump must keep draining the pipe whatever the hook does
            hook_errors.append(f"{type(e).__name__}: {e}")
            print(
                f"warning: metric hook failed, no more reports: {hook_errors[0]}", file=sys.stderr
            )
            return
        if reason:
            stop.request(str(reason))

    extractor = MetricExtractor(job.metric_definitions, run_dir / "metrics.jsonl", on_value)
    extractor.start = started
    sampler = _start_sampler(job, run_dir)
    running = _Running(
        command, env.source_dir, _child_env(env, job), logs, job.echo, extractor, stop
    )
    running.sampler = sampler
    terminated: list[int] = []

    def on_sigterm(signum, frame) -> None:
        terminated.append(signum)
        stop.request("the job was terminated (SIGTERM to visiontune)")

    # A worker told to stop (SIGTERM) stops its script first, instead of orphaning it.
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, on_sigterm) if in_main else None
    try:
        running.supervise(job.max_run, job.stop_grace)
    except KeyboardInterrupt:
        stop.request("interrupted by the user")
        running.killed = stop_process_group(running.proc, job.stop_grace)
        _finish(job, env, running, extractor, record, started)
        raise
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)
    result = _finish(job, env, running, extractor, record, started)
    if terminated:
        signal.raise_signal(signal.SIGTERM)  # now the caller's own handling of it
    return result


def _start_sampler(job: ScriptJob, run_dir: Path) -> Any:
    """The profiler's system sampler over this process and its children (the script's tree),
    or ``None`` when not asked for."""
    if not job.profile:
        return None
    from visiontune.profile.sampler import SystemSampler

    sampler = SystemSampler(run_dir / "profile" / "system", interval=job.profile_interval)
    sampler.start()
    return sampler


class _StopRequest:
    """Why the script must stop (the first reason wins), and a wake-up for the supervisor."""

    def __init__(self) -> None:
        self.reasons: list[str] = []
        self.wake = threading.Event()

    def request(self, reason: str) -> None:
        if not self.reasons:
            self.reasons.append(reason)
        self.wake.set()


class _Running:
    """The running script: its process group, the two pumps of its output, why it stops."""

    def __init__(
        self,
        command: list[str],
        cwd: Path,
        env: dict[str, str],
        logs: Path,
        echo: bool,
        extractor: MetricExtractor,
        stop: _StopRequest,
    ) -> None:
        self.stop = stop
        self.sampler: Any = None
        self.stop_reason = stop.reasons
        self.secondary: str | None = None
        self.killed = False
        self.wake = stop.wake
        self.tails = {"stdout": deque(maxlen=TAIL_LINES), "stderr": deque(maxlen=TAIL_LINES)}
        self.proc = subprocess.Popen(
            command,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # its own process group, so a stop reaches its workers too
        )
        self.readers = [
            threading.Thread(
                target=_pump,
                args=(
                    getattr(self.proc, name),
                    logs / f"{name}.log",
                    _echo_target(name) if echo else None,
                    extractor,
                    self.tails[name],
                ),
                name=f"visiontune-{name}",
                daemon=True,
            )
            for name in ("stdout", "stderr")
        ]
        for t in self.readers:
            t.start()
        threading.Thread(target=self._wait_exit, daemon=True).start()

    def _wait_exit(self) -> None:
        self.proc.wait()
        self.wake.set()

    def supervise(self, max_run: float | None, grace: float) -> None:
        """Wait for the exit, a stop request or ``max_run``; stop the script in the latter two."""
        deadline = None if max_run is None else time.monotonic() + max_run
        while self.proc.poll() is None and not self.stop_reason:
            timeout = None if deadline is None else deadline - time.monotonic()
            if timeout is not None and timeout <= 0:
                self.secondary = MAX_RUNTIME_EXCEEDED
                self.stop.request(
                    f"MaxRuntimeExceeded: the script ran longer than max_run {max_run:g} s"
                )
                break
            self.wake.wait(timeout)
        if self.stop_reason and self.proc.poll() is None:
            self.killed = stop_process_group(self.proc, grace)

    def finish(self) -> int:
        """The exit code, once the whole group is gone and both logs are complete."""
        code = self.proc.wait()
        # Anything the script left behind in its group (a stray worker) goes with it, and the
        # pipes it held close, so the pumps finish.
        _signal_group(self.proc, signal.SIGKILL)
        for t in self.readers:
            t.join(timeout=30)
        return code


def _finish(
    job: ScriptJob,
    env: TrainingEnvironment,
    running: _Running,
    extractor: MetricExtractor,
    record: dict[str, Any],
    started: float,
) -> JobResult:
    code = running.finish()
    if running.sampler is not None:
        running.sampler.stop()
    stop_reason, secondary, killed, tails = (
        running.stop_reason,
        running.secondary,
        running.killed,
        running.tails,
    )
    ended = time.time()
    reason: str | None = None
    if stop_reason:
        status, secondary = STOPPED, secondary or STOPPED
        reason = stop_reason[0] + (
            f"; stopped with SIGTERM, then SIGKILL after {job.stop_grace:g} s"
            if killed
            else "; stopped with SIGTERM"
        )
    elif code == 0:
        status, secondary = COMPLETED, COMPLETED
    else:
        status, secondary = FAILED, FAILED
        reason = failure_reason(code, list(tails["stderr"]), list(tails["stdout"]))
        atomic_write_text(env.output_dir / "failure", reason + "\n")

    archive = None
    if status != FAILED and env.model_dir.is_dir() and any(env.model_dir.iterdir()):
        archive = str(pack_model(env.model_dir, env.base_dir / "model.tar.gz"))
    result = JobResult(
        job_name=env.job_name,
        status=status,
        secondary_status=secondary,
        exit_code=code,
        failure_reason=reason,
        run_dir=str(env.base_dir),
        model_dir=str(env.model_dir),
        model_archive=archive,
        final_metrics=extractor.last(),
        metric_series={k: list(v) for k, v in extractor.series.items()},
        duration_s=round(ended - started, 3),
        stderr_tail=list(tails["stderr"]),
    )
    record.update(asdict(result))
    record.pop("metric_series")  # metrics.jsonl holds the series
    record["ended"] = datetime.fromtimestamp(ended, UTC).isoformat()
    atomic_write_json(env.base_dir / "job.json", record)
    return result


def read_job(run_dir: str | Path) -> dict[str, Any]:
    """The ``job.json`` of a script-mode run.

    Raises:
        UserError: the folder holds no job.
    """
    path = Path(run_dir) / "job.json"
    if not path.is_file():
        raise UserError(f"{run_dir} holds no script-mode job (no job.json)")
    return json.loads(path.read_text())
