"""A SageMaker-style training script, as users write them (no visiontune in sight).

Reads its channel and model dir with os.environ[...] and no default, takes argparse
hyperparameters, prints metrics in its own format and saves model.pth. The "loss" it prints is a
known function of --lr (smallest at lr=0.01), so tests know which trial must win.
"""

import argparse
import math
import os
import time

parser = argparse.ArgumentParser()
parser.add_argument("--lr", type=float, default=0.1)
parser.add_argument("--epochs", type=int, default=3)
parser.add_argument("--batch-size", type=int, default=64)
parser.add_argument("--optimizer", type=str, default="sgd")
parser.add_argument("--sleep", type=float, default=0.0, help="seconds per epoch")
args = parser.parse_args()

train_dir = os.environ["SM_CHANNEL_TRAINING"]
model_dir = os.environ["SM_MODEL_DIR"]
n_files = sum(len(files) for _, _, files in os.walk(train_dir))
print(f"Training on {n_files} files from {train_dir}", flush=True)

for epoch in range(1, args.epochs + 1):
    time.sleep(args.sleep)
    loss = (math.log10(args.lr) + 2) ** 2 + 1.0 / epoch
    accuracy = 100.0 / (1.0 + loss)
    print(f"Train Epoch: {epoch} [{n_files}/{n_files}]\tLoss: {loss + 0.05:.6f}")
    print(f"Test set: Average loss: {loss:.4f}, Accuracy: {accuracy:.2f}%")

with open(os.path.join(model_dir, "model.pth"), "wb") as f:
    f.write(f"lr={args.lr} optimizer={args.optimizer}".encode())
print("saved model.pth")
