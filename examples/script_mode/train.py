"""A SageMaker PyTorch training script (script mode), as written for a notebook's estimator.

Nothing here knows about visiontune: the same file runs in a SageMaker training job, and with
`visiontune run` / `visiontune tune --entry-point` on your machine. It fine-tunes the head of
an EfficientNet-Lite0 on an image folder (one sub-folder per class): the backbone's features
are computed once, then a linear head is trained on them for --epochs.

Channels (SageMaker File mode):
    training    class folders of training images        (required)
    validation  class folders of validation images      (required)
    pretrained  backbone.pth: timm tf_efficientnet_lite0 weights (optional; random otherwise)

Writes model.pth (the whole model's state dict) and classes.json to SM_MODEL_DIR, which
inference.py in this folder loads to serve it.
"""

import argparse
import json
import os
import time

import timm
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Subset
from torchvision import datasets, transforms

MEAN, STD = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]  # what tf_efficientnet_lite0 was trained with


def parse_args():
    parser = argparse.ArgumentParser()
    # Hyperparameters: SageMaker passes them as --name value.
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--max-images-per-class", type=int, default=0, help="0: all")
    parser.add_argument("--seed", type=int, default=0)
    # The SageMaker environment, read with no default as SageMaker always sets it.
    parser.add_argument("--model-dir", type=str, default=os.environ["SM_MODEL_DIR"])
    parser.add_argument("--train", type=str, default=os.environ["SM_CHANNEL_TRAINING"])
    parser.add_argument("--validation", type=str, default=os.environ["SM_CHANNEL_VALIDATION"])
    parser.add_argument("--pretrained", type=str, default=os.environ.get("SM_CHANNEL_PRETRAINED"))
    return parser.parse_args()


def image_folder(root, size, limit):
    tf = transforms.Compose(
        [
            transforms.Resize(int(size * 1.14)),
            transforms.CenterCrop(size),
            transforms.ToTensor(),
            transforms.Normalize(MEAN, STD),
        ]
    )
    dataset = datasets.ImageFolder(root, transform=tf)
    if limit:
        kept, seen = [], {}
        for i, (_, label) in enumerate(dataset.samples):
            if seen.get(label, 0) < limit:
                kept.append(i)
                seen[label] = seen.get(label, 0) + 1
        return Subset(dataset, kept), dataset.classes
    return dataset, dataset.classes


@torch.no_grad()
def features(backbone, dataset, batch_size):
    xs, ys = [], []
    for images, labels in DataLoader(dataset, batch_size=batch_size):
        xs.append(backbone(images))
        ys.append(labels)
    return torch.cat(xs), torch.cat(ys)


def main():
    args = parse_args()
    torch.manual_seed(args.seed)
    train_set, classes = image_folder(args.train, args.image_size, args.max_images_per_class)
    val_set, val_classes = image_folder(args.validation, args.image_size, args.max_images_per_class)
    assert classes == val_classes, f"class folders differ: {classes} vs {val_classes}"
    print(f"classes: {classes}; {len(train_set)} training, {len(val_set)} validation images")

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=len(classes))
    if args.pretrained:
        weights = torch.load(os.path.join(args.pretrained, "backbone.pth"), weights_only=True)
        weights = {k: v for k, v in weights.items() if not k.startswith("classifier.")}
        missing = model.load_state_dict(weights, strict=False).missing_keys
        print(f"loaded pretrained backbone ({len(weights)} tensors; new: {missing})")
    model.eval()
    start = time.time()
    # A fresh head with PyTorch's default init (timm's init for a 2-way head is far too wide).
    head = nn.Linear(model.num_features, len(classes))
    model.reset_classifier(0)  # the backbone alone returns pooled features
    x_train, y_train = features(model, train_set, args.batch_size)
    x_val, y_val = features(model, val_set, args.batch_size)
    print(f"features computed in {time.time() - start:.1f}s")

    optimizer = torch.optim.SGD(head.parameters(), lr=args.lr, momentum=args.momentum)
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(1, args.epochs + 1):
        head.train()
        order = torch.randperm(len(x_train))
        total = 0.0
        for i in range(0, len(order), args.batch_size):
            idx = order[i : i + args.batch_size]
            optimizer.zero_grad()
            loss = loss_fn(head(x_train[idx]), y_train[idx])
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
        head.eval()
        with torch.no_grad():
            logits = head(x_val)
            val_loss = loss_fn(logits, y_val).item()
            accuracy = (logits.argmax(1) == y_val).float().mean().item()
        # The tuner's metric_definitions pick these numbers out of the log.
        print(
            f"epoch {epoch}: train_loss={total / len(x_train):.4f} "
            f"val_loss={val_loss:.4f} val_accuracy={accuracy:.4f}"
        )

    model.reset_classifier(len(classes))
    model.get_classifier().load_state_dict(head.state_dict())
    torch.save(model.state_dict(), os.path.join(args.model_dir, "model.pth"))
    with open(os.path.join(args.model_dir, "classes.json"), "w") as f:
        json.dump({"classes": classes, "image_size": args.image_size}, f)
    print(f"saved model.pth and classes.json to {args.model_dir}")


if __name__ == "__main__":
    main()
