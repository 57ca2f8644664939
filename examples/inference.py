"""A SageMaker PyTorch inference handler in the seed's style, served unchanged by visiontune.

    visiontune serve MODEL_DIR --handler examples/inference.py

MODEL_DIR holds only ``model.pth``: the state dict of a torchvision resnet50 whose ``fc`` was
replaced by a 133-class head (the seed's dog-breed classifier). Each step below overrides
visiontune's default of the same name, exactly as in SageMaker's PyTorch inference toolkit.
"""

import io
import json
import os

import torch
import torch.nn as nn
import torchvision.models as models
import torchvision.transforms as transforms
from PIL import Image

JPEG_CONTENT_TYPE = "image/jpeg"
JSON_CONTENT_TYPE = "application/json"


def model_fn(model_dir):
    """Build resnet50 with the seed's head and load ``model.pth`` from ``model_dir``."""
    model = models.resnet50(weights=None)
    for param in model.parameters():
        param.requires_grad = False
    num_features = model.fc.in_features
    model.fc = nn.Sequential(
        nn.Linear(num_features, 128), nn.ReLU(inplace=True), nn.Linear(128, 133)
    )
    with open(os.path.join(model_dir, "model.pth"), "rb") as f:
        model.load_state_dict(torch.load(f, map_location="cpu", weights_only=True))
    model.eval()
    return model


def input_fn(request_body, content_type=JPEG_CONTENT_TYPE):
    """Decode a JPEG body with PIL."""
    if content_type == JPEG_CONTENT_TYPE:
        return Image.open(io.BytesIO(request_body)).convert("RGB")
    raise ValueError(f"Requested unsupported ContentType in content_type: {content_type}")


def predict_fn(input_object, model):
    """Resize, crop, normalise and return the logits."""
    test_transform = transforms.Compose(
        [
            transforms.Resize(256),
            transforms.CenterCrop(224),
            transforms.ToTensor(),
            transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
        ]
    )
    input_object = test_transform(input_object)
    with torch.no_grad():
        prediction = model(input_object.unsqueeze(0))
    return prediction


def output_fn(predictions, content_type):
    """Return the logits as JSON."""
    assert content_type == JSON_CONTENT_TYPE
    res = predictions.cpu().numpy().tolist()
    return json.dumps(res)
