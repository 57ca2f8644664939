"""One way to open a dataset wherever it lives: a local folder, ``s3://`` or an http(s) archive.

Everything goes through fsspec (s3fs for S3, fsspec's HTTP filesystem for downloads); there is no
hand-written S3 or HTTP client here. S3 endpoint, region and credentials come from the standard
AWS environment variables and config files, plus an explicit ``endpoint_url`` for S3-compatible
stores such as MinIO. Errors the user can fix (a missing bucket, wrong credentials, an unreachable
server) become one-line :class:`~visiontune.errors.UserError` messages.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from visiontune.errors import UserError

if TYPE_CHECKING:
    import fsspec

ARCHIVE_SUFFIXES = (".zip", ".tar.gz", ".tgz", ".tar")
_COMPLETE_MARKER = ".visiontune-complete.json"  # hidden, so dataset discovery never sees it


def visiontune_home() -> Path:
    """Root of everything visiontune caches: ``$VISIONTUNE_HOME`` or ``~/.cache/visiontune``."""
    env = os.environ.get("VISIONTUNE_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "visiontune"


def scheme_of(uri: str) -> str:
    """The URI scheme in lower case; ``""`` for a plain local path (``C:\\`` counts as local)."""
    parsed = urlparse(str(uri))
    return parsed.scheme.lower() if len(parsed.scheme) > 1 else ""


def is_remote(uri: str) -> bool:
    """True for URIs that are not on the local disk (``s3://``, ``http(s)://``)."""
    return scheme_of(uri) not in ("", "file")


def join(base: str, *parts: str) -> str:
    """Join path parts with ``/`` for URIs and the OS separator for local paths."""
    if is_remote(base):
        return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(base, *parts))


def storage_options(uri: str, endpoint_url: str | None = None) -> dict[str, Any]:
    """What fsspec needs to open ``uri`` again in another process (never credentials)."""
    if scheme_of(uri) == "s3" and endpoint_url:
        return {"endpoint_url": endpoint_url}
    return {}


def filesystem(protocol: str, options: dict[str, Any] | None = None) -> fsspec.AbstractFileSystem:
    """An fsspec filesystem for ``protocol`` (``file`` or ``s3``) with ``options``.

    fsspec caches instances per process, so DataLoader workers each get their own after fork.
    """
    import fsspec

    options = dict(options or {})
    if protocol == "s3":
        # Fail in seconds, not minutes, when the endpoint is wrong; credentials, region and
        # retries still come from the user's AWS environment and config files.
        options.setdefault("config_kwargs", {"connect_timeout": 5})
    return fsspec.filesystem(protocol, **options)


def _open_local(uri: str, endpoint_url: str | None) -> tuple[fsspec.AbstractFileSystem, str]:
    path = uri[len("file://") :] if uri.lower().startswith("file://") else uri
    return filesystem("file"), os.path.abspath(os.path.expanduser(path))


def _open_s3(uri: str, endpoint_url: str | None) -> tuple[fsspec.AbstractFileSystem, str]:
    path = uri[len("s3://") :].strip("/")
    if not path:
        raise UserError(f"{uri!r} names no bucket; use s3://BUCKET/PREFIX")
    return filesystem("s3", storage_options(uri, endpoint_url)), path


def _open_http(uri: str, endpoint_url: str | None) -> tuple[fsspec.AbstractFileSystem, str]:
    return filesystem("file"), str(dataset_from_archive_url(uri))


# Scheme -> opener. A new storage is one entry here, not another branch.
OPENERS: dict[str, Callable[[str, str | None], tuple[Any, str]]] = {
    "": _open_local,
    "file": _open_local,
    "s3": _open_s3,
    "http": _open_http,
    "https": _open_http,
}


def open_fs(uri: str, endpoint_url: str | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """Open ``uri`` and return ``(filesystem, path inside it)``.

    Local paths and ``file://`` give the local filesystem and an absolute path; ``s3://b/p``
    gives an s3fs filesystem and ``b/p``; an ``http(s)://`` archive (.zip, .tar.gz) is
    downloaded once into the cache, extracted, and opened as a local folder.

    Args:
        uri: where the data is.
        endpoint_url: S3-compatible endpoint (MinIO, moto...); default from the AWS config.

    Raises:
        UserError: unknown scheme, no bucket, or a download that fails.
    """
    scheme = scheme_of(uri)
    opener = OPENERS.get(scheme)
    if opener is None:
        known = ", ".join(f"{s}://" for s in OPENERS if s)
        raise UserError(f"unknown URI scheme {scheme!r} in {uri!r}; use a local path or {known}")
    return opener(uri, endpoint_url)


# ---------------------------------------------------------------------------- error mapping


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]


def _error_code(exc: BaseException) -> str | None:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return response.get("Error", {}).get("Code")
    return None


def storage_error(
    exc: BaseException, uri: str, endpoint_url: str | None = None
) -> UserError | None:
    """Translate an s3fs/botocore/aiohttp/OS error into a one-line :class:`UserError`.

    Returns ``None`` for errors that are not the user's to fix (those stay bugs).
    """
    where = f" at {endpoint_url}" if endpoint_url else ""
    bucket = uri[len("s3://") :].split("/", 1)[0] if scheme_of(uri) == "s3" else ""
    for e in _chain(exc):
        name = type(e).__name__
        code = _error_code(e) or ""
        text = str(e)
        if name in ("NoCredentialsError", "PartialCredentialsError"):
            return UserError(
                f"no AWS credentials found for {uri}: set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or run `aws configure`"
            )
        if (
            code in ("InvalidAccessKeyId", "SignatureDoesNotMatch")
            or any(
                s in text for s in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "Access Key Id")
            )
            or "signature we calculated does not match" in text
        ):
            return UserError(
                f"S3 rejected the credentials for {uri}{where} (wrong access key or secret): "
                "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or your AWS profile"
            )
        if code in ("AccessDenied", "AllAccessDisabled", "ExpiredToken") or (
            isinstance(e, PermissionError) and scheme_of(uri) == "s3"
        ):
            return UserError(f"access denied to {uri}{where}: {text.strip() or code}")
        if code == "NoSuchBucket" or "bucket does not exist" in text:
            return UserError(f"bucket {bucket!r} does not exist{where}; check the name in {uri}")
        if name in ("EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError") or (
            isinstance(e, ConnectionError | TimeoutError) and is_remote(uri)
        ):
            hint = " (is the server running and --endpoint-url right?)" if endpoint_url else ""
            return UserError(f"cannot connect to the storage for {uri}{where}{hint}: {text}")
    if isinstance(exc, PermissionError):
        return UserError(f"permission denied reading {exc.filename or uri}; check its permissions")
    if isinstance(exc, FileNotFoundError):
        return UserError(f"{uri} does not exist")
    if isinstance(exc, NotADirectoryError):
        return UserError(f"{uri} is a file; expected a folder")
    return None


@contextlib.contextmanager
def storage_errors(uri: str, endpoint_url: str | None = None) -> Iterator[None]:
    """Turn the storage errors a user can fix into :class:`UserError` inside this block."""
    try:
        yield
    except UserError:
        raise
    except Exception as e:
        mapped = storage_error(e, uri, endpoint_url)
        if mapped is None:
            raise
        raise mapped from None


# ---------------------------------------------------------------------------- downloads


def download_tree(uri: str, dest: Path, endpoint_url: str | None = None) -> Path:
    """Copy every object under a remote folder or prefix into ``dest``, replacing it whole.

    The copy lands in ``dest.partial`` first and is renamed into place, so a kill midway never
    leaves a half-copied tree under the final name.
    """
    import shutil

    with storage_errors(uri, endpoint_url):
        fs, root = open_fs(uri, endpoint_url)
        if not fs.exists(root) or not fs.isdir(root):
            raise UserError(f"{uri} does not exist or is not a folder")
        tmp = dest.with_name(dest.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for remote in fs.find(root):
            target = tmp / os.path.relpath(remote, root)
            target.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(remote, str(target))
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    return dest


def upload_tree(local: Path, uri: str, endpoint_url: str | None = None) -> None:
    """Mirror the files of a local folder to a remote folder or prefix (hidden files skipped)."""
    with storage_errors(uri, endpoint_url):
        fs, root = open_fs(uri, endpoint_url)
        for p in sorted(local.rglob("*")):
            if p.is_file() and not p.name.startswith("."):
                fs.put_file(str(p), f"{root.rstrip('/')}/{p.relative_to(local).as_posix()}")


def _file_digest(path: Path, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_archive(path: Path) -> None:
    """Read every member of a zip/tar archive; raise :class:`UserError` if any is damaged."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                bad = z.testzip()
            if bad is not None:
                raise UserError(
                    f"archive {path} is damaged (bad CRC in {bad}); delete it and retry"
                )
        else:
            with tarfile.open(path) as t:
                for member in t:
                    if member.isfile():
                        f = t.extractfile(member)
                        while f is not None and f.read(1 << 20):
                            pass
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as e:
        raise UserError(f"archive {path} is damaged ({e}); delete it and retry") from None


def _check_file(
    path: Path, url: str, sha256: str | None, md5: str | None, size: int | None
) -> None:
    """Verify a downloaded (or hand-placed) file; raise UserError on mismatch."""
    actual_size = path.stat().st_size
    if size is not None and actual_size != size:
        raise UserError(
            f"{path} has {actual_size} bytes but {url} has {size}; delete it and download again"
        )
    for algorithm, expected in (("sha256", sha256), ("md5", md5)):
        if expected:
            actual = _file_digest(path, algorithm)
            if actual != expected.lower():
                raise UserError(
                    f"checksum mismatch for {url}: {algorithm} {actual} != expected {expected}; "
                    "the download is corrupt or the file changed upstream"
                )


def download(
    url: str,
    dest: str | Path,
    *,
    sha256: str | None = None,
    md5: str | None = None,
    progress: bool = True,
) -> Path:
    """Download ``url`` to ``dest`` once, verified, with a progress bar.

    The bytes go to a temporary file beside ``dest`` and are renamed onto it only after the
    checksum (``sha256``/``md5`` when known; otherwise the Content-Length, recorded in
    ``dest.meta.json`` and checked again on reuse) matches, so a half-written or corrupt
    download never looks complete. A file already at ``dest`` (for example one put there by
    hand) is verified and reused.

    Raises:
        UserError: the URL cannot be reached (the message names the URL and where to put the
            file by hand), or the checksum or size does not match.
    """
    dest = Path(dest)
    meta_path = dest.with_name(dest.name + ".meta.json")
    if dest.exists():
        recorded = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        _check_file(dest, url, sha256, md5, recorded.get("size"))
        return dest

    from fsspec.implementations.http import HTTPFileSystem

    dest.parent.mkdir(parents=True, exist_ok=True)
    by_hand = f"download it by hand and put it at {dest}"
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        fs = HTTPFileSystem()
        try:
            size = fs.info(url).get("size")
            hasher = hashlib.sha256()
            with os.fdopen(fd, "wb") as out, fs.open(url, "rb", block_size=0) as src:
                with _progress(f"{dest.name}", size, enabled=progress) as advance:
                    for chunk in iter(lambda: src.read(1 << 20), b""):
                        out.write(chunk)
                        hasher.update(chunk)
                        advance(len(chunk))
                out.flush()
                os.fsync(out.fileno())
        except UserError:
            raise
        except Exception as e:  # aiohttp, DNS, timeouts, HTTP 4xx/5xx: all "cannot download"
            raise UserError(f"cannot download {url} ({_download_failure(e)}); {by_hand}") from None
        _check_file(tmp, url, sha256, md5, size)
        from visiontune.io import atomic_write_json

        atomic_write_json(
            meta_path, {"url": url, "size": tmp.stat().st_size, "sha256": hasher.hexdigest()}
        )
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def _download_failure(e: BaseException) -> str:
    """Why a download failed, in a few words. fsspec's HTTP filesystem raises
    FileNotFoundError for an HTTP error and for a host it cannot reach alike; the aiohttp
    error it wraps says which (an offline machine is not told the file is missing)."""
    cause = e.__cause__ or e.__context__
    status = getattr(cause, "status", None)
    if isinstance(status, int):
        return f"HTTP {status}" + (f" {cause.message}" if getattr(cause, "message", "") else "")
    if cause is not None and isinstance(e, FileNotFoundError):
        text = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
        return f"cannot reach the server: {text}"
    return str(e).splitlines()[0] if str(e) else type(e).__name__


@contextlib.contextmanager
def _progress(label: str, total: int | None, enabled: bool) -> Iterator[Callable[[int], None]]:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), disable=not enabled) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.advance(task, n)


def _safe_members_zip(z: zipfile.ZipFile, target: Path) -> list[zipfile.ZipInfo]:
    members = []
    for info in z.infolist():
        resolved = (target / info.filename).resolve()
        if not resolved.is_relative_to(target.resolve()):
            raise UserError(f"refusing to extract {info.filename!r}: it points outside the folder")
        if not info.filename.startswith("__MACOSX/"):
            members.append(info)
    return members


def extract_archive(
    archive: str | Path,
    dest: str | Path,
    keep: Callable[[list[str]], set[str]] | None = None,
) -> Path:
    """Extract a .zip/.tar.gz into ``dest`` atomically and return the dataset root inside it.

    Extraction goes into a temporary folder renamed onto ``dest`` at the end, with a hidden
    completion marker, so an interrupted extraction is never mistaken for a complete one. An
    archive holding one top folder (``hymenoptera_data/``) returns that folder.

    Args:
        archive: the archive file.
        dest: the folder to create.
        keep: optional filter given all member names, returning the ones to extract
            (used to take a limited number of images per class).
    """
    archive, dest = Path(archive), Path(dest)
    marker = dest / _COMPLETE_MARKER
    if marker.exists():
        try:
            return dest / json.loads(marker.read_text()).get("root", "")
        except (OSError, ValueError, AttributeError, TypeError):
            pass  # a damaged marker proves nothing: extract again (dest is visiontune's own)
    if dest.exists():
        shutil.rmtree(dest)  # an earlier, interrupted extraction: never complete, start over
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent))
    try:
        try:
            if zipfile.is_zipfile(archive):
                with zipfile.ZipFile(archive) as z:
                    members = _safe_members_zip(z, tmp)
                    if keep is not None:
                        wanted = keep([m.filename for m in members])
                        members = [m for m in members if m.is_dir() or m.filename in wanted]
                    z.extractall(tmp, members=members)
            else:
                with tarfile.open(archive) as t:
                    members = t.getmembers()
                    if keep is not None:
                        wanted = keep([m.name for m in members if m.isfile()])
                        members = [m for m in members if m.isdir() or m.name in wanted]
                    t.extractall(tmp, members=members, filter="data")
        except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as e:
            raise UserError(f"archive {archive} is damaged ({e}); delete it and retry") from None
        entries = [p for p in tmp.iterdir() if not p.name.startswith((".", "__MACOSX"))]
        root = entries[0].name if len(entries) == 1 and entries[0].is_dir() else ""
        from visiontune.io import atomic_write_json

        atomic_write_json(tmp / _COMPLETE_MARKER, {"archive": str(archive), "root": root})
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest / root


def archive_name(url: str) -> str:
    """The file name of an archive URL, checked to be a kind we can extract."""
    name = Path(urlparse(url).path).name
    if not name.lower().endswith(ARCHIVE_SUFFIXES):
        raise UserError(
            f"{url} is not an archive visiontune can open; http(s) datasets must be "
            f"{', '.join(ARCHIVE_SUFFIXES)} files"
        )
    return name


def dataset_from_archive_url(url: str, *, sha256: str | None = None, progress: bool = True) -> Path:
    """Download an http(s) dataset archive once, extract it once, return the local root."""
    name = archive_name(url)
    key = hashlib.sha1(url.encode()).hexdigest()[:12]
    archive = download(
        url, visiontune_home() / "downloads" / f"{key}-{name}", sha256=sha256, progress=progress
    )
    return extract_archive(archive, visiontune_home() / "datasets" / f"url-{key}")
