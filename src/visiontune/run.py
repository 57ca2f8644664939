"""The one owner of a run directory.

Every file a training run reads back from its own directory goes through :class:`RunDir`:
where the directory is (local, or a local staging copy mirrored to ``s3://``), the guard
against writing into another run, checkpoints (checksummed, with the previous good one kept),
``metrics.jsonl`` (appended, truncated on resume), the best epoch's weights and the evaluation
file. Stages read a finished run through the same names.

Checkpoints verify themselves: ``checkpoints/digests.json`` lists the SHA-256 of the
checkpoint files written, and a file whose digest is not listed is damaged. Writing rotates
``last.pt`` to ``previous.pt`` first, in an order where at every instant at least one file on
disk matches a listed digest, so a crash or a corrupted file falls back to the previous
checkpoint instead of training on garbage.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from visiontune.errors import UserError
from visiontune.io import (
    append_jsonl,
    atomic_write,
    atomic_write_json,
    read_jsonl,
    write_safetensors,
)

CHECKPOINT_VERSION = 2
# What a checkpoint must hold besides the loop state (visiontune.callbacks.LoopState).
CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "scaler", "rng")
# Files that mark a directory as (part of) a training run.
RUN_MARKERS = ("config.yaml", "metrics.jsonl", "checkpoints", "model")
# What else a run writes at its top level: found in a folder that is no run (a tuning study's
# folder holds its report.html), a new run would replace them.
RUN_OUTPUTS = ("report.html", "evaluation.json", "profile", "debug")


class RunDir:
    """A run directory: ``path`` is local; ``remote`` (``s3://...``) mirrors it when set."""

    writes = True  # False for the view ranks other than 0 of a torchrun job get

    def __init__(self, path: Path, remote: str | None = None, endpoint_url: str | None = None):
        self.path = path
        self.remote = remote
        self.endpoint_url = endpoint_url

    @classmethod
    def open(cls, output: str, endpoint_url: str | None = None) -> RunDir:
        """The run directory for ``output`` (a local path, ``file://`` or ``s3://``)."""
        if "://" not in output or output.startswith("file://"):
            return cls(Path(output.removeprefix("file://")), None, endpoint_url)
        from visiontune.features import cache_root

        digest = hashlib.sha256(output.encode()).hexdigest()[:16]
        return cls(cache_root() / "runs" / digest, output.rstrip("/"), endpoint_url)

    @classmethod
    def pull(cls, output: str, endpoint_url: str | None = None) -> RunDir:
        """Open ``output`` and, when it is remote, copy it into its local staging place."""
        run = cls.open(output, endpoint_url)
        if run.remote is not None:
            from visiontune.uri import download_tree

            download_tree(run.remote, run.path, endpoint_url)
        return run

    def __str__(self) -> str:
        return self.remote or str(self.path)

    @contextlib.contextmanager
    def only_writer(self, enabled: bool = True) -> Iterator[None]:
        """Hold this run directory for this process while the block runs.

        Two ``train`` runs started into the same new ``--output`` (the default ``runs/latest``
        from two terminals) both passed the check for an existing run, which finds one only
        once ``config.yaml`` is written, after the data, the model and any feature cache are
        ready: minutes in which a second run could start and interleave its checkpoints and
        metrics with the first's. The lock lives in visiontune's home (nothing is added to the
        user's folders), keyed by the run's absolute path or ``s3://`` URI; it goes with the
        process, however it ends. ``enabled=False`` (torchrun ranks other than 0, which write
        nothing) holds nothing.

        Raises:
            UserError: another process holds it.
        """
        if not enabled:
            yield
            return
        from visiontune.io import held_lock
        from visiontune.uri import visiontune_home

        key = self.remote or str(self.path.expanduser().absolute())
        lock = visiontune_home() / "locks" / f"run-{hashlib.sha256(key.encode()).hexdigest()[:24]}"
        busy = f"another visiontune process is training in {self}; let it finish, or choose another --output"  # fmt: skip
        with held_lock(lock, busy):
            yield

    def for_rank(self, rank: int) -> RunDir:
        """This run as rank ``rank`` of a torchrun job sees it: rank 0 is the one writer."""
        return self if rank == 0 else FollowerRunDir(self.path, self.remote, self.endpoint_url)

    # ---- names
    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def checkpoint_path(self) -> Path:
        return self.path / "checkpoints" / "last.pt"

    @property
    def previous_checkpoint_path(self) -> Path:
        return self.path / "checkpoints" / "previous.pt"

    @property
    def digests_path(self) -> Path:
        return self.path / "checkpoints" / "digests.json"

    @property
    def best_weights_path(self) -> Path:
        return self.path / "checkpoints" / "best.safetensors"

    @property
    def job_path(self) -> Path:
        return self.path / "checkpoints" / "job.json"

    @property
    def model_dir(self) -> Path:
        return self.path / "model"

    def evaluation_path(self, split: str = "test") -> Path:
        """``evaluation.json`` for the test split; ``evaluation-valid.json`` when a dataset
        has no test split, so the name says which split the numbers come from."""
        return self.path / ("evaluation.json" if split == "test" else f"evaluation-{split}.json")

    # ---- guards
    def is_finished(self) -> bool:
        return (self.model_dir / "model.json").is_file()

    def check_can_start(self, resume: bool) -> None:
        """Refuse to write into another run, or to resume what cannot be resumed."""
        if resume:
            if not self.has_checkpoint():
                raise UserError(
                    f"nothing to resume: {self.checkpoint_path} does not exist (the run stopped "
                    f"before its first checkpoint); delete {self} to start it over"
                )
            return
        if self.path.exists() and not self.path.is_dir():
            raise UserError(f"--output {self} is a file; give a folder for the run directory")
        present = [m for m in RUN_MARKERS if (self.path / m).exists()]
        if not present and self.remote is not None:
            # The local staging copy is this machine's; another machine (or a cleared cache)
            # has none, and its uploads would overwrite the run already at the remote.
            present = self._remote_markers()
            if present:
                raise UserError(
                    f"{self} already holds a training run ({', '.join(present)}); resume it "
                    f"with `visiontune train --resume {self}` or choose another --output"
                )
        if present and not self.has_checkpoint() and not self.is_finished():
            # Pointing at --resume here would only answer "nothing to resume".
            raise UserError(
                f"{self} already holds a training run ({', '.join(present)}) that stopped "
                "before its first checkpoint, so it cannot be resumed; delete it to start over "
                "or choose another --output"
            )
        if present:
            raise UserError(
                f"{self} already holds a training run ({', '.join(present)}); resume it with "
                f"`visiontune train --resume {self}` or choose another --output"
            )
        replaced = [m for m in RUN_OUTPUTS if (self.path / m).exists()]
        if replaced:
            raise UserError(
                f"{self} holds {', '.join(replaced)}, which a training run would replace (is it "
                "a tuning study's folder, or another job's?); choose another --output"
            )

    def _remote_markers(self) -> list[str]:
        """The run markers present at the remote home (names directly under the prefix)."""
        from visiontune.uri import open_fs, storage_errors

        assert self.remote is not None
        with storage_errors(self.remote, self.endpoint_url):
            fs, root = open_fs(self.remote, self.endpoint_url)
            try:
                names = {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)}
            except FileNotFoundError:
                return []
        return [m for m in RUN_MARKERS if m in names]

    @contextlib.contextmanager
    def starting(self) -> Iterator[None]:
        """Create the directory; if the start fails, remove what this start created.

        In a directory that already existed (an empty folder made for the run, a resumed run)
        only the entries this start added are removed: a ``split.json`` left behind would be
        read back by the next start as its own split, whatever split it asks for.
        """
        created = not self.path.exists()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # a file on the way (a/b with a a file), a read-only disk
            raise UserError(f"cannot create the run directory {self}: {e.strerror or e}") from e
        before = set() if created else {p.name for p in self.path.iterdir()}
        try:
            yield
        except BaseException:
            if created:
                shutil.rmtree(self.path, ignore_errors=True)
            else:
                for entry in self.path.iterdir():
                    if entry.name not in before:
                        _remove(entry)
            raise

    # ---- the torchrun job that writes the run (so a restarted group finds its own run)
    def record_job(self, job_id: str | None) -> None:
        if job_id is not None:
            atomic_write_json(self.job_path, {"job": job_id})

    def started_by(self, job_id: str | None) -> bool:
        try:
            return job_id is not None and json.loads(self.job_path.read_text())["job"] == job_id
        except (OSError, ValueError, KeyError):
            return False

    def has_checkpoint(self) -> bool:
        return self.checkpoint_path.is_file() or self.previous_checkpoint_path.is_file()

    def clear(self) -> None:
        """Remove the run (a restarted job's own run that never reached a checkpoint)."""
        shutil.rmtree(self.path, ignore_errors=True)

    # ---- config, evaluation, model
    def save_config(self, config: Any) -> None:
        from visiontune.config import save_config

        save_config(config, self.config_path)

    def write_evaluation(self, split: str, metrics: dict[str, Any]) -> Path:
        path = self.evaluation_path(split)
        atomic_write_json(path, metrics)
        return path

    def save_model(self, model: Any, **meta: Any) -> Path:
        """Write ``RUN/model`` (see ``save_model_dir``) with the run's split record in it."""
        from visiontune.data.splits import export_split_record
        from visiontune.models.artifact import save_model_dir

        try:
            model_dir = save_model_dir(self.model_dir, model, name=self.path.name, **meta)
        except OSError as e:
            raise UserError(f"cannot write the model to {self.model_dir}: {e.strerror or e}") from e
        export_split_record(self.path, model_dir)  # the model alone knows which images it saw
        return model_dir

    # ---- checkpoints
    def save_checkpoint(self, payload: dict[str, Any]) -> Path:
        """Write ``last.pt`` (the previous one becomes ``previous.pt``) with its digest listed."""
        import torch

        buf = io.BytesIO()
        torch.save({"version": CHECKPOINT_VERSION, **payload}, buf)
        data = buf.getvalue()
        digest = hashlib.sha256(data).hexdigest()
        digests = self._digests()
        last, previous = self.checkpoint_path, self.previous_checkpoint_path
        if last.is_file():
            # last.pt's digest stays listed while it moves, so one file always verifies.
            os.replace(last, previous)
        try:
            atomic_write(last, lambda tmp: Path(tmp).write_bytes(data))
        except OSError as e:
            raise UserError(f"cannot write checkpoint {last}: {e.strerror or e}") from e
        atomic_write_json(
            self.digests_path, {"last.pt": digest, "previous.pt": digests.get("last.pt")}
        )
        return last

    def load_checkpoint(self) -> dict[str, Any]:
        """The newest checkpoint that verifies; a damaged ``last.pt`` falls back to
        ``previous.pt`` with a warning.

        Raises:
            UserError: no checkpoint verifies (each reason in one line).
        """
        problems = []
        for path in (self.checkpoint_path, self.previous_checkpoint_path):
            if not path.exists():
                continue
            try:
                ck = self._read_checkpoint(path)
            except ValueError as e:
                problems.append(f"{path} {e}")
                continue
            if problems:
                print(f"warning: {problems[0]}; resuming from {path.name}", file=sys.stderr)
            return ck
        if not problems:
            raise UserError(f"nothing to resume: {self.checkpoint_path} does not exist")
        raise UserError(f"{problems[0]}, and there is no earlier good checkpoint; start a new run")

    def _digests(self) -> dict[str, str | None]:
        try:
            return json.loads(self.digests_path.read_text())
        except (OSError, ValueError):
            return {}

    def _read_checkpoint(self, path: Path) -> dict[str, Any]:
        import torch

        data = path.read_bytes()
        if not data:
            raise ValueError("is empty (0 bytes)")
        # Without digests.json (a crash before the first one was written) the file is only
        # checked for being complete.
        listed = {d for d in self._digests().values() if d}
        if self.digests_path.exists() and hashlib.sha256(data).hexdigest() not in listed:
            raise ValueError("is damaged (its checksum does not match)")
        try:
            ck = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"cannot be read: {str(e).splitlines()[0]}") from e
        from visiontune.callbacks import LoopState

        missing = [k for k in (*CHECKPOINT_KEYS, *LoopState.field_names()) if k not in ck]
        if missing:
            raise ValueError(f"is incomplete (missing {', '.join(missing)})")
        return ck

    # ---- best weights
    def save_best(self, state_dict: dict[str, Any]) -> None:
        tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
        write_safetensors(self.best_weights_path, tensors)

    def load_best(self) -> dict[str, Any] | None:
        from safetensors.torch import load_file

        if not self.best_weights_path.is_file():
            return None
        return load_file(str(self.best_weights_path))

    # ---- metrics
    def append_metrics(self, record: dict[str, Any]) -> None:
        append_jsonl(self.metrics_path, record)

    def reset_metrics(self) -> None:
        self.metrics_path.unlink(missing_ok=True)

    def truncate_metrics(self, step: int) -> None:
        """On resume, drop lines logged after the checkpoint (they will be logged again)."""
        if not self.metrics_path.exists():
            return
        keep = [r for r in read_jsonl(self.metrics_path) if r.get("step", 0) <= step]
        text = "".join(json.dumps(r) + "\n" for r in keep)
        atomic_write(self.metrics_path, lambda tmp: Path(tmp).write_text(text))

    def read_metrics(self) -> list[dict[str, Any]]:
        return read_jsonl(self.metrics_path)

    # ---- remote mirror
    def sync(self) -> None:
        """Mirror the local directory to its remote home (no-op for a local run)."""
        if self.remote is None:
            return
        from visiontune.uri import upload_tree

        upload_tree(self.path, self.remote, self.endpoint_url)


def _remove(path: Path) -> None:
    """Remove a file or a folder, whichever ``path`` is; a failure to is not this run's error."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


class FollowerRunDir(RunDir):
    """The run directory as ranks other than 0 of a torchrun job see it: they write nothing
    (rank 0 is the one writer) and what they need from it comes over the process group."""

    writes = False

    @contextlib.contextmanager
    def starting(self) -> Iterator[None]:
        yield

    def record_job(self, job_id: str | None) -> None:
        pass

    def save_config(self, config: Any) -> None:
        pass

    def write_evaluation(self, split: str, metrics: dict[str, Any]) -> Path:
        return self.evaluation_path(split)

    def save_model(self, model: Any, **meta: Any) -> Path:
        return self.model_dir

    def save_checkpoint(self, payload: dict[str, Any]) -> Path:
        return self.checkpoint_path

    def save_best(self, state_dict: dict[str, Any]) -> None:
        pass

    def append_metrics(self, record: dict[str, Any]) -> None:
        pass

    def reset_metrics(self) -> None:
        pass

    def truncate_metrics(self, step: int) -> None:
        pass

    def sync(self) -> None:
        pass
