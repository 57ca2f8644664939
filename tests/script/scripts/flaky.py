"""A script whose fate depends on --lr: fine, crashes, never prints the metric, or hangs."""

import argparse
import os
import time

parser = argparse.ArgumentParser()
parser.add_argument("--lr", type=float)
args = parser.parse_args()
os.environ["SM_CHANNEL_TRAINING"]
if args.lr == 0.2:
    raise ValueError("loss is nan at step 3")
if args.lr == 0.3:
    print("training... (but this script prints no metric)")
elif args.lr == 0.4:
    print("Test set: Average loss: 0.7000", flush=True)
    time.sleep(3600)
else:
    print(f"Test set: Average loss: {args.lr:.4f}")
