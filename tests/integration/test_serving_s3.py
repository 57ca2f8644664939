"""Deployment pieces that read and write S3 (real moto server): model dirs and transform."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import make_image

from visiontune.models.artifact import save_model_dir
from visiontune.models.registry import build_model

pytestmark = pytest.mark.integration


@pytest.fixture
def s3_model(s3_env, tmp_path):
    import s3fs

    torch.manual_seed(0)
    model, spec = build_model("tiny_cnn", 2, weights="none")
    local = save_model_dir(tmp_path / "model", model, architecture="tiny_cnn",
                           class_ids=["cat", "dog"], class_names=["cat", "dog"],
                           preprocess=spec.preprocess)  # fmt: skip
    fs = s3fs.S3FileSystem(endpoint_url=s3_env.endpoint_url)
    if not fs.exists("deploy"):
        fs.mkdir("deploy")
    fs.put(str(local) + "/", "deploy/models/tiny/", recursive=True)
    return fs, local


def test_serve_loads_a_model_dir_from_s3(s3_model, s3_env):
    from visiontune.serving.app import fetch_model_dir
    from visiontune.serving.runtimes import load_runtime

    _, local = s3_model
    copy = fetch_model_dir("s3://deploy/models/tiny", s3_env.endpoint_url)
    runtime = load_runtime("torch", copy)
    assert runtime.info.class_ids == ["cat", "dog"]
    assert runtime.info.version == json.loads((local / "model.json").read_text())["version"]
    assert runtime.predict(torch.randn(3, 3, 64, 64)).shape == (3, 2)
    with pytest.raises(Exception, match="does not exist"):
        fetch_model_dir("s3://deploy/models/missing", s3_env.endpoint_url)


def test_transform_from_s3_to_s3_resumes(s3_model, s3_env, cli):
    fs, local = s3_model
    for i in range(5):
        with fs.open(f"deploy/images/img{i}.jpg", "wb") as f:
            make_image(i % 2, i).save(f, "JPEG")
    fs.pipe("deploy/images/broken.jpg", b"not an image")
    args = ("transform", local, "--input", "s3://deploy/images", "--output", "s3://deploy/out",
            "--endpoint-url", s3_env.endpoint_url)  # fmt: skip
    code, _, err = cli(*args)
    assert code == 0, err
    fs.invalidate_cache()
    lines = [json.loads(x) for x in fs.cat_file("deploy/out/predictions.jsonl").splitlines()]
    assert len(lines) == 6
    assert sum("error" in x for x in lines) == 1
    assert all(len(x["predictions"]) == 2 for x in lines if "error" not in x)
    # Two more images arrive; a second run predicts only those.
    for i in (5, 6):
        with fs.open(f"deploy/images/img{i}.jpg", "wb") as f:
            make_image(i % 2, i).save(f, "JPEG")
    code, _, err = cli(*args)
    assert code == 0, err
    fs.invalidate_cache()
    lines = [json.loads(x) for x in fs.cat_file("deploy/out/predictions.jsonl").splitlines()]
    assert len(lines) == 8 and len({x["image"] for x in lines}) == 8


def test_transform_overwrite_of_an_s3_output_with_no_images_leaves_no_old_lines(
    s3_model, s3_env, cli, tmp_path
):
    fs, local = s3_model
    fs.pipe("deploy/old-out/predictions.jsonl", b'{"image": "a.jpg", "predictions": []}\n')
    empty = tmp_path / "no-images"
    empty.mkdir()

    code, out, err = cli("transform", local, "--input", empty, "--output", "s3://deploy/old-out",
                         "--endpoint-url", s3_env.endpoint_url, "--overwrite", "--no-progress")  # fmt: skip

    assert code == 0, err
    assert "0 predicted" in out
    fs.invalidate_cache()
    # Before, the output was afresh only locally: the old lines stayed on S3.
    assert fs.cat_file("deploy/old-out/predictions.jsonl") == b""
