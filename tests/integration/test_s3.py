"""S3 paths against a real S3-compatible server (moto, its own process) through s3fs."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from helpers import make_image, write_dataset
from PIL import Image

from visiontune.data.check import check_dataset
from visiontune.data.folder import ImageDataset, collate_skip_bad, discover
from visiontune.errors import UserError

pytestmark = pytest.mark.integration


def s3(server):
    import s3fs

    return s3fs.S3FileSystem(
        endpoint_url=server.endpoint_url,
        key=server.access_key,
        secret=server.secret_key,
        skip_instance_cache=True,
    )


def problem_dataset(root: Path) -> Path:
    """Small dataset with one of each problem check must find."""
    write_dataset(root, classes=("cat", "dog"), per_class=3, size=32)
    good = (root / "train" / "cat" / "cat_0000.jpg").read_bytes()
    (root / "train" / "cat" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "train" / "dog" / "empty.jpg").write_bytes(b"")
    buf = io.BytesIO()
    make_image(1, 99, 32).save(buf, "JPEG")
    (root / "valid" / "dog" / "really_a_jpeg.png").write_bytes(buf.getvalue())
    (root / "test" / "cat" / "leaked.jpg").write_bytes(good)  # same bytes as a train image
    return root


@pytest.fixture(scope="module")
def bucket(s3_server, tmp_path_factory) -> str:
    local = problem_dataset(tmp_path_factory.mktemp("s3src") / "pets")
    fs = s3(s3_server)
    fs.mkdir("vt-data")
    fs.put(str(local), "vt-data/pets", recursive=True)
    return str(local)


def test_check_on_s3_gives_the_same_report_as_local(cli, s3_env, bucket, monkeypatch, capsys):
    local = check_dataset(bucket)
    remote = check_dataset("s3://vt-data/pets", endpoint_url=s3_env.endpoint_url)
    local_d, remote_d = local.to_dict(), remote.to_dict()
    assert remote_d.pop("root") == "s3://vt-data/pets"
    local_d.pop("root")
    assert remote_d == local_d
    kinds = remote_d["problem_counts"]
    assert kinds == {"unreadable": 2, "extension_mismatch": 1, "leakage": 1}

    code, out, _ = cli("data", "check", "s3://vt-data/pets",
        "--endpoint-url", s3_env.endpoint_url, "--json", "--strict",
    )  # fmt: skip
    assert code == 1  # --strict: problems found
    assert json.loads(out)["counts"]["train"] == {"cat": 4, "dog": 4}


def test_s3_dataset_caches_objects_and_streams_on_request(s3_env, s3_server, tmp_path):
    fs = s3(s3_server)
    src = write_dataset(tmp_path / "src", classes=("a", "b"), per_class=2, splits=("train",))
    fs.mkdir("vt-cache")
    fs.put(str(src), "vt-cache/ds", recursive=True)
    index = discover("s3://vt-cache/ds", endpoint_url=s3_env.endpoint_url)
    assert index.storage_options == {"endpoint_url": s3_env.endpoint_url}
    assert all(p.startswith("s3://vt-cache/ds/train/") for p, _ in index.splits["train"])

    cached = ImageDataset(index, "train", None, cache_dir=tmp_path / "cache")
    streamed = ImageDataset(index, "train", None, s3_cache="stream", cache_dir=tmp_path / "c2")
    assert all(cached[i] is not None for i in range(len(cached)))
    assert len(list((tmp_path / "cache").rglob("*.jpg"))) == 4

    # With the objects gone, the cached dataset still reads (from local disk); streaming can't.
    fs.rm("vt-cache/ds", recursive=True)
    assert all(cached[i] is not None for i in range(len(cached)))
    assert streamed[0] is None
    assert not list((tmp_path / "c2").rglob("*.jpg"))

    # A changed object (new ETag) is read again, not served stale from the cache.
    fs.put(str(src), "vt-cache/ds", recursive=True)
    buf = io.BytesIO()
    make_image(0, 500, 48).save(buf, "JPEG")
    path = index.splits["train"][0][0]
    fs.pipe(path[len("s3://") :], buf.getvalue())
    fresh = discover("s3://vt-cache/ds", endpoint_url=s3_env.endpoint_url)
    image, _ = ImageDataset(fresh, "train", None, cache_dir=tmp_path / "cache")[0]
    assert image.size == (48, 48)


def test_s3_dataset_in_forked_dataloader_workers(s3_env, bucket):
    import torch
    from torchvision.transforms import v2 as T

    index = discover("s3://vt-data/pets", endpoint_url=s3_env.endpoint_url)
    transform = T.Compose([T.PILToTensor(), T.Resize((32, 32)), T.ToDtype(torch.float32)])
    ds = ImageDataset(index, "train", transform, s3_cache="stream")
    ds[0]  # open a filesystem in the parent first: workers must not reuse it after fork
    loader = torch.utils.data.DataLoader(
        ds, batch_size=4, num_workers=2, collate_fn=collate_skip_bad,
        multiprocessing_context="fork",
    )  # fmt: skip
    images = bad = 0
    for x, _y, dropped in loader:
        images += len(x)
        bad += dropped
    assert (images, bad) == (6, 2)  # the truncated and the empty file are dropped, counted


def test_prefix_with_more_than_1000_objects(s3_env, s3_server):
    fs = s3(s3_server)
    fs.mkdir("vt-many")
    png = io.BytesIO()
    Image.new("RGB", (4, 4), (9, 9, 9)).save(png, "PNG")
    objects = {f"vt-many/big/train/a/{i:05d}.png": png.getvalue() for i in range(1003)}
    objects |= {f"vt-many/big/train/b/{i:05d}.png": png.getvalue() for i in range(2)}
    fs.pipe(objects)
    index = discover("s3://vt-many/big", endpoint_url=s3_env.endpoint_url)
    assert index.counts()["train"] == [1003, 2]


def test_missing_bucket_is_one_clear_line(cli, s3_env, monkeypatch, capsys):
    with pytest.raises(UserError, match="bucket 'no-such-bucket' does not exist"):
        discover("s3://no-such-bucket/data", endpoint_url=s3_env.endpoint_url)
    code, _, err = cli("data", "check", "s3://no-such-bucket/data",
        "--endpoint-url", s3_env.endpoint_url,
    )  # fmt: skip
    assert code == 2
    assert err.strip().splitlines() == [
        f"error: bucket 'no-such-bucket' does not exist at {s3_env.endpoint_url}; "
        "check the name in s3://no-such-bucket/data"
    ]


def test_missing_prefix_is_one_clear_line(s3_env, bucket):
    with pytest.raises(UserError, match="does not exist"):
        discover("s3://vt-data/nothing-here", endpoint_url=s3_env.endpoint_url)


@pytest.mark.parametrize(
    "env",
    [
        {"AWS_SECRET_ACCESS_KEY": "wrong-secret"},
        {"AWS_ACCESS_KEY_ID": "AKIAWRONGWRONGWRONG0"},
    ],
    ids=["wrong-secret", "unknown-key"],
)
def test_wrong_credentials_are_one_clear_line(cli, s3_env, bucket, monkeypatch, capsys, env):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    code, _out, err = cli("data", "check", "s3://vt-data/pets",
        "--endpoint-url", s3_env.endpoint_url,
    )  # fmt: skip
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err
    assert "S3 rejected the credentials for s3://vt-data/pets" in lines[0]


def test_unreachable_endpoint_is_one_clear_line(s3_env, monkeypatch, free_tcp_port):
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # a user's retry setting; keeps the test fast
    endpoint = f"http://127.0.0.1:{free_tcp_port}"
    with pytest.raises(UserError, match="cannot connect to the storage for s3://vt-data/pets"):
        discover("s3://vt-data/pets", endpoint_url=endpoint)
