"""From script to endpoint on the real ants/bees photos: the shipped example script is tuned,
the best configuration trained again, served through its own inference.py, and asked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from helpers import free_port

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "script_mode"

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_script_tune_train_best_serve_predict(vt, hymenoptera, tmp_path):
    import torch

    from visiontune.models.registry import efficientnet_lite0_state_dict

    pretrained = tmp_path / "pretrained"
    pretrained.mkdir()
    torch.save(efficientnet_lite0_state_dict(), pretrained / "backbone.pth")
    study_dir = tmp_path / "study"
    proc = vt(
        "tune", "--job-config", EXAMPLE / "job.yaml",
        "--channel", f"training={hymenoptera / 'train'}",
        "--channel", f"validation={hymenoptera / 'val'}",
        "--channel", f"pretrained={pretrained}",
        # Small and quick: 12 photos per class at 96 px, 2 epochs, 2 trials.
        "--hp", "image-size=96", "--hp", "max-images-per-class=12", "--hp", "epochs=2",
        "--max-trials", "2", "--study", "e2e", "--study-dir", study_dir, "--train-best",
        timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "study e2e: 2 complete" in proc.stdout
    best_run = study_dir / "best"
    serve_line = proc.stdout.strip().splitlines()[-1]
    assert serve_line.startswith("serve it: visiontune serve ")
    assert serve_line.endswith(f"--handler {os.path.relpath(EXAMPLE / 'inference.py')}")
    assert (best_run / "model" / "model.pth").is_file()

    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "visiontune",
            "serve",
            best_run / "model",
            "--handler",
            EXAMPLE / "inference.py",
            "--port",
            str(port),
            "--access-log",
            "off",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/ping", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert server.poll() is None, server.stderr.read()
            assert time.monotonic() < deadline, "the endpoint did not become healthy"
            time.sleep(0.2)
        # Photos the final model trained on (the first of each class folder, as ImageFolder
        # orders them): the endpoint must give each its own class.
        images = {
            cls: sorted((hymenoptera / "train" / cls).iterdir())[0] for cls in ("ants", "bees")
        }
        answer = vt("predict", *images.values(), "--endpoint", url, "--json", "--top-k", "1")
        assert answer.returncode == 0, answer.stderr
        results = json.loads(answer.stdout)
        assert [r["predictions"][0]["label"] for r in results] == ["ants", "bees"]
    finally:
        server.terminate()
        server.wait(timeout=30)
