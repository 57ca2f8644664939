"""Serving a model directory: SageMaker's container contract, dynamic batching, runtimes.

``app`` (HTTP), ``handler`` (model_fn/input_fn/predict_fn/output_fn), ``batching``,
``runtimes`` (torch, onnxruntime) and ``client`` (``Predictor``, ``predict_endpoint``). Nothing
heavy is imported here, so ``import visiontune.serving.client`` stays light.
"""
