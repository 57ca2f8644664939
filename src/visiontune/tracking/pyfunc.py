"""A visiontune model directory as an MLflow pyfunc model.

The MLflow model holds the whole model directory (weights, classes and the preprocessing
training used) as an artifact, and is logged "from code" (a two-line script naming
:class:`ImageClassifier`), so loading it never unpickles anything. ``mlflow.pyfunc.
load_model(uri).predict(frame)`` and ``mlflow models serve`` take a DataFrame with an
``image`` column of encoded image bytes (base64 in JSON) and answer ``label``, ``class_id``
and ``probability`` of the top class, the same top-1 as ``visiontune predict``.
"""

from __future__ import annotations

import base64
import io
import os
import tempfile
from pathlib import Path
from typing import Any

import mlflow
from mlflow.pyfunc import PythonModel

# What MLflow loads: the class below, named from a file so nothing is pickled.
_MODEL_CODE = """\
import mlflow
from visiontune.tracking.pyfunc import ImageClassifier

mlflow.models.set_model(ImageClassifier())
"""


class ImageClassifier(PythonModel):
    """Top-1 label of each image in the ``image`` column, from a visiontune model directory."""

    # No type hints on these two: MLflow would read them as a schema; the signature is explicit.
    def load_context(self, context):
        from visiontune.evaluate import Predictor

        self.predictor = Predictor(context.artifacts["model_dir"], device="cpu", precision="fp32")

    def predict(self, context, model_input, params=None):
        import pandas as pd

        images = [_image_bytes(v) for v in _column(model_input)]
        top = self.predictor.top_k(images, k=1)
        return pd.DataFrame(
            {
                "label": [t[0]["label"] for t in top],
                "class_id": [t[0]["class_id"] for t in top],
                "probability": [float(t[0]["probability"]) for t in top],
            }
        )


def _column(model_input: Any) -> list[Any]:
    if hasattr(model_input, "columns"):
        column = "image" if "image" in model_input.columns else model_input.columns[0]
        return list(model_input[column])
    if isinstance(model_input, dict):
        value = model_input.get("image")
        return list(value) if isinstance(value, (list, tuple)) else [value]
    return list(model_input)


def _image_bytes(value: Any) -> bytes:
    """Encoded image bytes from bytes, base64 text, or a path to an image file."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str):
        if os.path.isfile(value):
            return Path(value).read_bytes()
        return base64.b64decode(value)
    raise ValueError(f"an image must be bytes, base64 text or a file path, not {type(value)}")


def _example_image(size: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), (128, 128, 128)).save(buf, "PNG")
    return buf.getvalue()


def signature():
    """Input: an ``image`` column of encoded bytes; output: the top class and its probability."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("binary", "image")]),
        outputs=Schema(
            [
                ColSpec("string", "label"),
                ColSpec("string", "class_id"),
                ColSpec("double", "probability"),
            ]
        ),
    )


def requirements() -> list[str]:
    """Pinned from this environment (MLflow's own inference would load the model again)."""
    import PIL
    import torch
    import torchvision

    from visiontune import __version__

    return [
        f"visiontune=={__version__}",
        f"mlflow=={mlflow.__version__}",
        f"torch=={torch.__version__.split('+')[0]}",
        f"torchvision=={torchvision.__version__.split('+')[0]}",
        f"pillow=={PIL.__version__}",
    ]


def log_pyfunc_model(
    tracking_uri: str,
    run_id: str,
    model_dir: Path,
    meta: dict[str, Any],
    *,
    registered_model_name: str | None = None,
    artifact_name: str = "model",
) -> Any:
    """Log ``model_dir`` to run ``run_id`` as a pyfunc model (registering it when a name is
    given); returns MLflow's ``ModelInfo``."""
    import pandas as pd

    from visiontune.tracking._mlflow import use_tracking_uri

    size = int((meta.get("preprocess") or {}).get("input_size") or 64)
    example = pd.DataFrame({"image": [_example_image(size)]})
    with tempfile.TemporaryDirectory() as tmp:
        code = Path(tmp) / "visiontune_model.py"
        code.write_text(_MODEL_CODE)
        with use_tracking_uri(tracking_uri), mlflow.start_run(run_id=run_id):
            return mlflow.pyfunc.log_model(
                name=artifact_name,
                python_model=str(code),
                artifacts={"model_dir": str(model_dir)},
                signature=signature(),
                input_example=example,
                pip_requirements=requirements(),
                registered_model_name=registered_model_name,
            )
