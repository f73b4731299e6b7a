"""Chest radiograph classification pipeline: DVC stages, Keras models, MLflow tracking."""

__version__ = "0.1.0"
