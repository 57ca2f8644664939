"""visiontune: local-first fine-tuning, tuning, debugging and serving of image classifiers."""

__version__ = "0.1.0"
