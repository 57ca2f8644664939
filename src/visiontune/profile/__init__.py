"""The profiler: system usage sampled in a thread, step phases timed from the loop's events,
SageMaker's profiler rules over both. Everything lands in ``RUN/profile/``.

Heavy parts (psutil, pyarrow, torch, nvidia-ml-py) are imported by the modules that need them;
importing this package costs nothing.
"""
