"""Chest radiograph classification pipeline: DVC stages, Keras models, MLflow tracking."""

from cxr.machine import use_onednn

__version__ = "0.1.0"

use_onednn()  # before TensorFlow starts: its fast convolutions on AVX2-only CPUs too
