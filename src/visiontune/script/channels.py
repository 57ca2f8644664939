"""Input channels: a local folder is used in place; an ``s3://`` prefix is copied once.

SageMaker's File mode copies each channel's S3 prefix to ``/opt/ml/input/data/<channel>``
before the script starts. Here the copy goes to the cache
(``$VISIONTUNE_HOME/channels/<hash of the URI>``) and is reused by the next job, a tuning job's
trials included, as long as the prefix still lists the same objects (keys, sizes and ETags,
one LIST per job); when it changed, it is copied again.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from visiontune.errors import UserError
from visiontune.io import atomic_write_json


def _listing_signature(uri: str, endpoint_url: str | None) -> str:
    from visiontune.uri import open_fs, storage_errors

    with storage_errors(uri, endpoint_url):
        fs, root = open_fs(uri, endpoint_url)
        if not fs.exists(root) or not fs.isdir(root):
            raise UserError(f"channel {uri} does not exist or is not a folder")
        found = fs.find(root, detail=True)
    entries = sorted(
        (name, info.get("size"), str(info.get("ETag") or info.get("etag") or ""))
        for name, info in found.items()
    )
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()


def cached_copy(uri: str, endpoint_url: str | None = None) -> Path:
    """A local copy of the remote prefix ``uri``, downloaded only when it is new or changed.

    Raises:
        UserError: the prefix does not exist, or the storage refuses us.
    """
    from visiontune.uri import download_tree, visiontune_home

    key = hashlib.sha1(f"{uri}|{endpoint_url or ''}".encode()).hexdigest()[:16]
    dest = visiontune_home() / "channels" / key
    # The record sits beside the copy, not in it: the script must see only the channel's files.
    record = dest.with_name(dest.name + ".json")
    signature = _listing_signature(uri, endpoint_url)
    if dest.is_dir() and record.is_file():
        try:
            if json.loads(record.read_text()).get("signature") == signature:
                return dest
        except ValueError:
            pass  # a damaged record: copy again
    record.unlink(missing_ok=True)
    download_tree(uri, dest, endpoint_url)
    atomic_write_json(record, {"uri": uri, "signature": signature})
    return dest


def resolve_channel(name: str, where: str, endpoint_url: str | None = None) -> Path:
    """The local folder the script reads channel ``name`` from.

    Raises:
        UserError: a local path that is not a folder, or an unreachable remote prefix.
    """
    from visiontune.uri import is_remote, scheme_of

    if is_remote(where):
        if scheme_of(where) != "s3":
            raise UserError(f"channel {name}: {where} must be a local folder or an s3:// prefix")
        return cached_copy(where, endpoint_url)
    path = Path(where[len("file://") :] if where.startswith("file://") else where).expanduser()
    if not path.is_dir():
        raise UserError(f"channel {name}: {where} is not a folder")
    return path.absolute()


def parse_channel_options(specs: list[str]) -> dict[str, str]:
    """``["training=data/", "test=s3://b/t"]`` -> ``{"training": "data/", "test": "s3://b/t"}``.

    A value without ``NAME=`` is the ``training`` channel, SageMaker's default name.

    Raises:
        UserError: a channel named twice.
    """
    out: dict[str, str] = {}
    for spec in specs:
        name, sep, where = spec.partition("=")
        if not sep or not name or any(c in name for c in "/:\\"):
            name, where = "training", spec
        name = name.strip()
        if name in out:
            raise UserError(f"channel {name!r} given twice")
        out[name] = where.strip()
    return out
