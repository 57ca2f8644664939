"""The query API and the CLI on a run whose home is S3 (a moto server)."""

from __future__ import annotations

import json

import pytest
from loop_harness import cfg_for, run_train

from visiontune.debug import Trial, modes


@pytest.mark.integration
def test_trial_reads_a_run_on_s3(image_dataset, s3_env, cli):
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_env.endpoint_url})
    fs.mkdir("debug-bucket")
    uri = "s3://debug-bucket/runs/one"
    cfg = cfg_for(
        image_dataset, uri, epochs=1, endpoint_url=s3_env.endpoint_url,
        debugger={"save_interval": 1, "collections": ["weights"]},
    )  # fmt: skip
    run_train(cfg)
    trial = Trial(uri, endpoint_url=s3_env.endpoint_url)
    assert trial.finished
    assert trial.steps(mode=modes.TRAIN) == [0, 1, 2]
    assert trial.tensor("backbone.stem.0.weight").steps() == [0, 1]
    assert {r.rule for r in trial.rule_results()} >= {"LossNotDecreasing", "Overfit"}
    code, out, err = cli(
        "debug", uri, "--tensors", "^loss$", "--json", "--endpoint-url", s3_env.endpoint_url
    )
    assert code == 0, err
    assert json.loads(out)[0]["steps"] == [0, 1, 2]
