"""Prints a metric, then never finishes; --ignore-sigterm makes it shrug off SIGTERM too."""

import argparse
import os
import signal
import sys
import time

parser = argparse.ArgumentParser()
parser.add_argument("--ignore-sigterm", type=int, default=0)
args = parser.parse_args()
if args.ignore_sigterm:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
else:
    signal.signal(
        signal.SIGTERM, lambda *_: (print("got SIGTERM, saving", flush=True), sys.exit(0))
    )
print(f"pid {os.getpid()}", flush=True)
print("Test set: Average loss: 0.5000, Accuracy: 50.00%", flush=True)
while True:
    time.sleep(3600)
