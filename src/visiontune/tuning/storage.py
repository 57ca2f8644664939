"""Where a study lives: Optuna storages with a heartbeat, and the lock that claims a trial.

* default: Optuna's ``JournalStorage`` over a ``JournalFileBackend`` at
  ``STUDY_DIR/journal.log``. It takes concurrent writers from several processes (SQLite does
  not: "database is locked"), needs no server, and every finished trial is on disk the moment
  it finishes, so a ``kill -9`` loses at most the running trials.
* ``postgresql://`` (or any SQLAlchemy URL): Optuna's ``RDBStorage``, for many machines.

Both run a heartbeat: a running trial records one every ``heartbeat`` seconds; a trial whose
last heartbeat is older than three intervals (its worker was killed, or its machine died) is
failed by the next worker that looks, and re-queued with the same parameters by Optuna's
``RetryHeartbeatStaleTrialCallback`` (at most ``max_retry`` times). Optuna 5 has heartbeats for
``RDBStorage`` only, so ``HeartbeatJournalStorage`` adds the same protocol to the journal
storage (the heartbeat is a trial system attribute, so it works across processes and NFS).

Claiming a trial (count the budget, create the trial, draw its configuration) happens under
:func:`claim_lock`, one lock per study shared by every worker on every machine: a PostgreSQL
advisory lock, MySQL's ``GET_LOCK``, or an ``O_EXCL`` lock file beside a journal or SQLite file
(Optuna's own ``JournalFileOpenLock``, which works over NFS). Without it two workers can both
see "3 done, 0 running" and both start, so ``--max-trials 4`` runs 5.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from pathlib import Path
from typing import Any, ClassVar, Protocol

from visiontune.errors import UserError
from visiontune.tuning._base import ATTR, quiet_optuna

# A claim holds its lock for milliseconds; a lock file older than this was left by a process
# that died while holding it.
CLAIM_LOCK_GRACE_S = 30


def _journal_storage_class():
    from optuna.storages import JournalStorage
    from optuna.storages._heartbeat import BaseHeartbeat
    from optuna.trial import TrialState

    class HeartbeatJournalStorage(JournalStorage, BaseHeartbeat):
        """``JournalStorage`` with the heartbeat protocol Optuna gives ``RDBStorage``."""

        def __init__(self, backend, path: Path, interval: int, grace: int, callback) -> None:
            super().__init__(backend)
            self.journal_path = path
            self._interval, self._grace, self._callback = interval, grace, callback

        def record_heartbeat(self, trial_id: int) -> None:
            # A heartbeat for a trial another worker already failed must not crash the thread.
            with contextlib.suppress(Exception):
                self.set_trial_system_attr(trial_id, "heartbeat", time.time())

        def _get_stale_trial_ids(self, study_id: int) -> list[int]:
            now = time.time()
            stale = []
            for t in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
                # A retried trial inherits its predecessor's heartbeat attribute; its own start
                # time is the floor.
                started = t.datetime_start.timestamp() if t.datetime_start else now
                beat = max(float(t.system_attrs.get("heartbeat", 0.0)), started)
                if now - beat > self._grace:
                    stale.append(t._trial_id)
            return stale

        def get_heartbeat_interval(self) -> int | None:
            return self._interval

        def get_heartbeat_stale_trial_callback(self):
            return self._callback

    return HeartbeatJournalStorage


RDB_SCHEMES = ("postgresql", "postgres", "mysql", "sqlite")
# Schemes of a journal file path: file:///path, journal:///path.
FILE_SCHEMES = ("file", "journal")


def is_rdb_url(url: str) -> bool:
    """Whether ``url`` names a database (SQLAlchemy URL) rather than a journal file."""
    return url.split(":", 1)[0].split("+", 1)[0] in RDB_SCHEMES


def check_storage_url(url: str) -> None:
    """Refuse a URL of a scheme no storage has (``redis://``, ``postgressql://``, ``s3://``)
    instead of taking it for a journal file path: that ran the study in a local file under
    ``./redis:/``, where no other machine's worker would ever see it.

    Raises:
        UserError: ``url`` has a ``scheme://`` that is neither a database nor a file.
    """
    scheme, sep, _ = url.partition("://")
    if not sep or scheme.split("+", 1)[0] in (*RDB_SCHEMES, *FILE_SCHEMES):
        return
    raise UserError(
        f"storage {redact(url)}: unknown scheme {scheme}://; give postgresql://..., "
        "mysql://..., sqlite:///FILE or a journal file path"
    )


def default_storage(study_dir: Path) -> str:
    """The journal file of a study directory, as an absolute path."""
    return str((study_dir / "journal.log").resolve())


def open_storage(url: str, *, heartbeat: int = 10, max_retry: int = 2):
    """Open an Optuna storage: an SQLAlchemy URL (RDB) or a journal file path.

    Raises:
        UserError: the storage cannot be reached or opened.
    """
    import optuna
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    check_storage_url(url)
    with quiet_optuna():
        retry = RetryHeartbeatStaleTrialCallback(max_retry=max_retry)
        if is_rdb_url(url):
            kwargs: dict[str, Any] = {"pool_pre_ping": True}
            if url.startswith("postgres"):
                kwargs["connect_args"] = {"connect_timeout": 10}
            shown = redact(url)
            if url.startswith("postgres://"):
                url = "postgresql://" + url.removeprefix("postgres://")
            url = _with_installed_driver(url)
            try:
                return optuna.storages.RDBStorage(
                    url,
                    engine_kwargs=kwargs,
                    heartbeat_interval=heartbeat,
                    grace_period=3 * heartbeat,
                    heartbeat_stale_trial_callback=retry,
                )
            except Exception as e:  # sqlalchemy errors, a missing driver: all the user's to fix
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise UserError(f"cannot open storage {shown}: {first}") from e
        path = journal_path(url)
        _check_journal_file(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            backend = optuna.storages.journal.JournalFileBackend(str(path))
        except OSError as e:
            raise UserError(f"cannot open storage {path}: {e.strerror or e}") from e
        return _journal_storage_class()(backend, path, heartbeat, 3 * heartbeat, retry)


def journal_path(url: str) -> Path:
    """The journal file a storage that is no database URL names (a folder: its journal.log)."""
    path = Path(url.removeprefix("journal:").removeprefix("file://"))
    return path / "journal.log" if path.is_dir() else path


def _check_journal_file(path: Path) -> None:
    """Refuse an existing file that is not an Optuna journal before the backend opens it: it
    appends its first entry to whatever file it is given (``--storage notes.txt``, a mistyped
    path) and only then fails to read it, leaving the user's file with a line of JSON at its
    end.

    Raises:
        UserError: ``path`` holds something other than journal entries.
    """
    import json

    try:
        with open(path, "rb") as f:
            first = f.readline(1 << 20)
    except FileNotFoundError:
        return  # a new study's journal
    except OSError as e:
        raise UserError(f"cannot open storage {path}: {e.strerror or e}") from e
    if not first.strip():
        return  # an empty file (nothing written yet), which the backend starts on
    if not first.endswith(b"\n") and first.startswith(b'{"op_code":'):
        return  # a first entry cut short by a kill, which the backend skips
    try:
        entry = json.loads(first)
    except ValueError:  # not UTF-8, or not JSON
        entry = None
    if not isinstance(entry, dict) or "op_code" not in entry:
        raise UserError(
            f"cannot open storage {path}: it is not an Optuna journal (left unchanged); give a "
            "study's journal.log, a path that does not exist yet, or a postgresql:// URL"
        )


def _with_installed_driver(url: str) -> str:
    """SQLAlchemy 2.1 picks psycopg (3) for ``postgresql://``; the ``tune`` extra installs
    psycopg2, so name it when psycopg is absent."""
    import importlib.util

    if url.startswith("postgresql://") and importlib.util.find_spec("psycopg") is None:
        return "postgresql+psycopg2://" + url.removeprefix("postgresql://")
    return url


def redact(url: str) -> str:
    """Hide a password in a storage URL before printing it."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        cred, host = rest.rsplit("@", 1)
        if ":" in cred:
            return f"{scheme}://{cred.split(':', 1)[0]}:***@{host}"
    return url


def load_study(name: str, storage_url: str, *, heartbeat: int = 10, max_retry: int = 2):
    """Load an existing study and its visiontune config.

    Raises:
        UserError: no such study in the storage, or it was not created by visiontune.
    """
    import optuna

    check_storage_url(storage_url)
    if not is_rdb_url(storage_url) and not journal_path(storage_url).is_file():
        # Opening it would create an empty journal (and its folders) for a mistyped path.
        raise UserError(f"no study {name!r}: {journal_path(storage_url)} does not exist")
    storage = open_storage(storage_url, heartbeat=heartbeat, max_retry=max_retry)
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
        hint = f" (studies there: {', '.join(names)})" if names else ""
        raise UserError(f"no study {name!r} in {redact(storage_url)}{hint}") from None
    if ATTR not in study.user_attrs:
        raise UserError(f"study {name!r} was not created by visiontune tune")
    return study


def study_config(study) -> dict[str, Any]:
    """The visiontune config stored in the study (fixed options, space, objective, budget)."""
    return dict(study.user_attrs[ATTR])


# --------------------------------------------------------------------------------------------
# The claim lock


class ClaimLock(Protocol):
    """A lock shared by every worker of one study, on any machine that reaches the storage."""

    def __enter__(self) -> None: ...

    def __exit__(self, *exc: object) -> None: ...


class FileClaimLock:
    """An ``O_EXCL`` lock file (Optuna's ``JournalFileOpenLock``): works across processes and
    over NFS; a file left by a killed holder is broken after ``CLAIM_LOCK_GRACE_S``."""

    def __init__(self, path: Path) -> None:
        from optuna.storages.journal import JournalFileOpenLock

        # Not the journal's own lock file: the backend takes that one for every write we make
        # while holding this.
        self._lock = JournalFileOpenLock(f"{path}.claim", grace_period=CLAIM_LOCK_GRACE_S)

    def __enter__(self) -> None:
        self._lock.acquire()

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


class SqlClaimLock:
    """A database session lock: released by the server when the holder's connection drops."""

    _SQL: ClassVar[dict[str, tuple[str, str]]] = {
        "postgresql": ("SELECT pg_advisory_lock(:key)", "SELECT pg_advisory_unlock(:key)"),
        "mysql": ("SELECT GET_LOCK(:name, -1)", "SELECT RELEASE_LOCK(:name)"),
    }

    def __init__(self, engine, study_name: str) -> None:
        self._engine = engine
        self._lock_sql, self._unlock_sql = self._SQL[engine.dialect.name]
        digest = hashlib.sha256(f"visiontune-claim/{study_name}".encode()).digest()
        # A signed 64-bit key for PostgreSQL, a short name for MySQL.
        self._params = {
            "key": int.from_bytes(digest[:8], "big", signed=True),
            "name": f"vt-claim-{digest[:12].hex()}",
        }
        self._conn = None

    def __enter__(self) -> None:
        from sqlalchemy import text

        self._conn = self._engine.connect()
        self._conn.execute(text(self._lock_sql), self._params)

    def __exit__(self, *exc: object) -> None:
        from sqlalchemy import text

        conn, self._conn = self._conn, None
        try:
            conn.execute(text(self._unlock_sql), self._params)
            conn.commit()
        finally:
            conn.close()


def claim_lock(study) -> ClaimLock:
    """The lock under which a worker counts the budget and claims a trial of ``study``."""
    path = getattr(study._storage, "journal_path", None)
    if path is not None:
        return FileClaimLock(Path(path))
    # Optuna wraps an RDBStorage in a cache; the engine is on the storage it wraps.
    engine = getattr(getattr(study._storage, "_backend", study._storage), "engine", None)
    if engine is not None and engine.dialect.name in SqlClaimLock._SQL:
        return SqlClaimLock(engine, study.study_name)
    sqlite_file = engine is not None and engine.dialect.name == "sqlite" and engine.url.database
    if sqlite_file and engine.url.database != ":memory:":
        return FileClaimLock(Path(engine.url.database))
    # An in-memory storage lives in one process: a process-wide lock covers its threads.
    return _PROCESS_LOCK


class _ProcessLock:
    def __init__(self) -> None:
        import threading

        self._lock = threading.Lock()

    def __enter__(self) -> None:
        self._lock.acquire()

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


_PROCESS_LOCK = _ProcessLock()
