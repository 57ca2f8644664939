"""The SageMaker PyTorch inference handler for train.py's model (model.pth + classes.json).

    visiontune serve RUN/model --handler examples/script_mode/inference.py

Its answer is JSON shaped like visiontune's own endpoint, so `visiontune predict --endpoint`
and the Predictor client read it: {"predictions": [[{label, class_id, probability}, ...]]}.
"""

import io
import json
import os

import timm
import torch
from PIL import Image
from torchvision import transforms

MEAN, STD = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]  # what tf_efficientnet_lite0 was trained with


def model_fn(model_dir):
    with open(os.path.join(model_dir, "classes.json")) as f:
        meta = json.load(f)
    model = timm.create_model(
        "tf_efficientnet_lite0", pretrained=False, num_classes=len(meta["classes"])
    )
    state = torch.load(os.path.join(model_dir, "model.pth"), map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    model.eval()
    size = meta["image_size"]
    model.classes = meta["classes"]
    model.preprocess = transforms.Compose(
        [
            transforms.Resize(int(size * 1.14)),
            transforms.CenterCrop(size),
            transforms.ToTensor(),
            transforms.Normalize(MEAN, STD),
        ]
    )
    return model


def input_fn(request_body, content_type):
    if content_type.startswith("image/") or content_type == "application/x-image":
        return Image.open(io.BytesIO(request_body)).convert("RGB")
    raise ValueError(f"send an image (image/jpeg, image/png), not {content_type}")


def predict_fn(image, model):
    with torch.no_grad():
        probs = model(model.preprocess(image).unsqueeze(0)).softmax(1)[0]
    order = probs.argsort(descending=True).tolist()
    return [
        {"label": model.classes[i], "class_id": i, "probability": float(probs[i])} for i in order
    ]


def output_fn(prediction, accept):
    return json.dumps({"predictions": [prediction]})
