"""Prints one metric, then fails the way real scripts do: an exception with a traceback."""

import argparse
import os

parser = argparse.ArgumentParser()
parser.add_argument("--lr", type=float, default=0.1)
args = parser.parse_args()
data = os.environ["SM_CHANNEL_TRAINING"]
print("Test set: Average loss: 0.9000, Accuracy: 10.00%", flush=True)
raise RuntimeError(f"CUDA out of memory while training on {os.path.basename(data)}")
