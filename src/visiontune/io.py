"""Small file helpers shared by every stage: writes that never leave a half-written file."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` then rename the temporary file onto ``path``.

    The rename is atomic on POSIX, so readers see either the old file or the complete new one,
    and a crash mid-write leaves the old file intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    # mkstemp makes 0600 files; a run's files get the mode any other file would (umask).
    os.fchmod(fd, 0o666 & ~_UMASK)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_umask() -> int:
    # Read once at import: os.umask() sets it to read it, which would race with other threads.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


# What every HTML page visiontune writes (run report, tuning report, debug plots) starts with.
PAGE_MARKER = b"<title>visiontune "


def check_page_output(path: str | os.PathLike) -> None:
    """Refuse to write a generated HTML page over anything but an earlier such page.

    Writing the page again (the same command re-run) replaces it; a directory, or a file the
    page did not come from (``-o config.yaml``, ``-o notes.html``), is the user's and is left
    alone.

    Raises:
        UserError: ``path`` is a directory, or an existing file that is not a visiontune page.
    """
    from visiontune.errors import UserError

    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a directory; give the path of the .html file to write")
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except FileNotFoundError:
        return
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from e
    if PAGE_MARKER not in head:
        raise UserError(
            f"{path} exists and is not a page visiontune wrote; it is left unchanged: "
            "remove it or choose another output path"
        )


@contextlib.contextmanager
def held_lock(lock: str | os.PathLike, busy: str) -> Iterator[None]:
    """Hold an exclusive lock on the file ``lock`` (created if need be) while the block runs.

    The lock file stays (removing it would race with a process opening it); the lock goes with
    the process, however it ends.

    Raises:
        UserError: another process holds it; ``busy`` is the message.
    """
    import fcntl

    from visiontune.errors import UserError

    Path(lock).parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(busy) from None
        yield


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def append_jsonl(path: str | os.PathLike, record: dict[str, Any]) -> None:
    """Append one JSON object as a line and flush it to disk (a crash loses at most that line)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a JSON-lines file, ignoring a torn last line left by a crash (or any line that is
    not JSON text: a crash can leave garbage bytes, which must not cost the other lines)."""
    out = []
    p = Path(path)
    if not p.exists():
        return out
    for line in p.read_bytes().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            out.append(json.loads(line))
        except ValueError:  # JSONDecodeError, or bytes that are not UTF-8
            continue
    return out


def write_safetensors(path: str | os.PathLike, tensors: dict[str, Any]) -> None:
    """Write tensors as safetensors atomically; a full disk is the user's to fix, in one line.

    Raises:
        UserError: the file cannot be written (disk full, file too large, permission denied).
    """
    from safetensors.torch import save_file

    from visiontune.errors import UserError

    try:
        atomic_write(path, lambda tmp: save_file(tensors, tmp))
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from e
    except Exception as e:
        # safetensors reports I/O failures as its own SafetensorError("... I/O error: ...").
        if "I/O error" not in str(e):
            raise
        raise UserError(f"cannot write {path}: {str(e).split('I/O error: ')[-1]}") from e


def read_parquet(source: Any, schema: Any = None) -> Any:
    """One Parquet file (a path or an open binary file, e.g. fsspec's) as a ``pyarrow.Table``.

    Read synchronously on the calling thread. ``pyarrow.parquet.read_table`` goes through the
    dataset scanner, whose read-ahead buffers over a Python file object are freed later on an
    Arrow I/O thread; when the process exits at that moment the thread cannot take the GIL and
    the process aborts ("terminate called without an active exception", pyarrow 25). ``schema``
    orders the columns and fills missing ones with nulls.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.ParquetFile(source, pre_buffer=False).read(use_threads=False)
    if schema is None:
        return table
    columns = [
        table[f.name].cast(f.type) if f.name in table.column_names else pa.nulls(len(table), f.type)
        for f in schema
    ]
    return pa.Table.from_arrays(columns, schema=schema)
