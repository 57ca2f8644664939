"""Test-time augmentation: the views, a flip-invariant model, and ``evaluate --tta`` end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from helpers import write_dataset
from test_train import FAST
from torch import nn

from visiontune import tta
from visiontune.config import TrainConfig, build_config
from visiontune.errors import UserError
from visiontune.evaluate import Predictor
from visiontune.train import train


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny_cnn run (64 px, one epoch) on a root of class folders, its final test
    evaluation with 2-view TTA (``tta: 2`` in the config)."""
    base = tmp_path_factory.mktemp("tta")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VISIONTUNE_HOME", str(base / "home"))
        data = write_dataset(base / "data", classes=("cat", "dog", "owl"), per_class=8, splits=None)
        cfg = build_config(
            TrainConfig,
            None,
            {**FAST, "data": str(data), "output": str(base / "run"), "epochs": 1, "tta": 2},
        )
        train(cfg)
    return data, base / "run" / "model"


class MirrorInvariant(nn.Module):
    """``f(x) + f(mirror x)``: the same output for an image and its mirror, by construction."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x) + self.model(x.flip(-1))


def test_views_are_the_image_its_mirror_and_zooms_in_a_fixed_order():
    x = torch.randn(3, 3, 32, 32)
    rows = tta.expand(x, 2)
    assert rows.shape == (6, 3, 32, 32)
    assert torch.equal(rows[2], x[1]) and torch.equal(rows[3], x[1].flip(-1))
    four = tta.expand(x, 4)
    assert torch.equal(four[:2], rows[:2])  # more views extend the list, never reorder it
    assert four[2].shape == x[0].shape and not torch.equal(four[2], x[0])
    assert torch.equal(four[3], four[2].flip(-1))
    assert torch.equal(tta.expand(x, tta.MAX_VIEWS), tta.expand(x, tta.MAX_VIEWS))
    probs = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.2, 0.8], [0.4, 0.6]])
    assert torch.allclose(tta.average(probs, 2), torch.tensor([[0.5, 0.5], [0.3, 0.7]]))
    for bad in (1, -2, tta.MAX_VIEWS + 1):
        with pytest.raises(UserError, match="--tta-views must be between 2"):
            tta.check_views(bad)
        with pytest.raises(ValueError, match=r"tta must be|greater than or equal"):
            TrainConfig(data="d", tta=bad)


def test_a_mirror_invariant_model_gives_the_same_answers_with_and_without_tta(trained):
    data, model_dir = trained
    images = sorted(str(p) for p in data.rglob("*.jpg"))[::4]
    plain = Predictor(model_dir, device="cpu", precision="fp32")
    with_tta = Predictor(model_dir, device="cpu", precision="fp32", tta=2)
    before = with_tta.predict_proba(images)
    # The trained model itself is not mirror-invariant: TTA changes its probabilities ...
    assert not torch.allclose(before, plain.predict_proba(images), atol=1e-4)
    for predictor in (plain, with_tta):
        predictor.loaded.model = MirrorInvariant(predictor.loaded.model)
    # ... while for a mirror-invariant one, averaging over the mirror changes nothing.
    expected = plain.predict_proba(images)
    assert torch.allclose(with_tta.predict_proba(images), expected, atol=1e-6)
    assert with_tta.predict(images) == plain.predict(images)
    # The logits-shaped wrapper evaluate uses agrees as well.
    x = torch.randn(4, 3, 64, 64)
    invariant = MirrorInvariant(plain.loaded.model.model).eval()
    with torch.no_grad():
        assert torch.allclose(
            tta.TTAModel(invariant, 2)(x).softmax(1), invariant(x).softmax(1), atol=1e-6
        )


def test_evaluate_tta_from_the_console_reports_views_and_accuracy(trained, cli):
    from visiontune.evaluate import evaluation_split
    from visiontune.inference import preprocess_batch
    from visiontune.models.artifact import load_model_dir, read_meta

    data, model_dir = trained
    command = [sys.executable, "-m", "visiontune", "evaluate", str(model_dir), "--data", str(data)]
    done = subprocess.run(
        [*command, "--tta", "--json", "--device", "cpu"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["tta"]["views"] == 2 and report["tta"]["names"] == ["full", "full+flip"]
    assert set(report["tta"]["single_view"]) == {"accuracy", "top5", "loss", "macro_f1"}

    # The same accuracies computed here, from the recorded test split and torch.flip.
    chosen = evaluation_split(read_meta(model_dir), model_dir, str(data), "test")
    loaded = load_model_dir(model_dir, "cpu")
    predictor = Predictor(model_dir, device="cpu", precision="fp32")
    x = preprocess_batch(predictor._images([path for path, _ in chosen.items]), loaded.preprocess)
    labels = torch.tensor(
        [loaded.class_ids.index(chosen.index.class_ids[y]) for _, y in chosen.items]
    )
    with torch.no_grad():
        plain = loaded.model(x).softmax(1)
        mirrored = loaded.model(torch.flip(x, dims=[3])).softmax(1)
    averaged = (plain + mirrored) / 2
    assert report["count"] == len(labels)
    assert report["accuracy"] == pytest.approx((averaged.argmax(1) == labels).float().mean().item())
    assert report["tta"]["single_view"]["accuracy"] == pytest.approx(
        (plain.argmax(1) == labels).float().mean().item()
    )
    # Loose: the CLI runs bf16 autocast where the CPU has it; the test runs fp32.
    assert report["loss"] == pytest.approx(
        nn.functional.nll_loss(averaged.log(), labels).item(), abs=1e-2
    )

    # The training run's own final evaluation (config tta: 2) says the same.
    recorded = json.loads((model_dir.parent / "evaluation.json").read_text())
    assert recorded["tta"]["views"] == 2 and recorded["tta"]["count"] == report["count"]
    assert recorded["tta"]["accuracy"] == pytest.approx(report["accuracy"])
    assert recorded["accuracy"] == pytest.approx(report["tta"]["single_view"]["accuracy"])

    # In-process from here: the console entry point was shown above.
    code, out, _ = cli(*command[3:], "--json")
    assert code == 0 and json.loads(out)["tta"] is None
    code, out, _ = cli(*command[3:], "--tta-views", "4")
    assert code == 0 and "test-time augmentation: 4 views (full, full+flip, center" in out
    code, _, err = cli(*command[3:], "--tta-views", "13")
    assert code != 0
    assert err.strip().splitlines() == [
        f"error: --tta-views must be between 2 (image + its mirror) and {tta.MAX_VIEWS}, got 13"
    ]
