"""Pixel baselines: what a model must beat to show it learned more than raw pixel statistics.

Both fit on the training split only, on the prepared images resized to 64x64 (the same
`cxr.images.resize` that prepare and serving use) and scaled to 0-1:
- `logistic_regression`: scikit-learn's LogisticRegression, C=0.1, max_iter=3000 (the bar
  the real-radiograph benchmark is held to);
- `pca_svm`: the first 64 principal components (whitened), then an RBF support-vector
  machine (C=10): a non-linear pixel model, stronger than the linear one.
No TensorFlow here: these run in a second or two on 1,000 images.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from cxr.images import resize

SIZE = 64


def pixel_features(images: np.ndarray, size: int = SIZE) -> np.ndarray:
    """(n, size*size) float32 in 0-1 from (n, H, W[, 1]) uint8 images."""
    grey = images.reshape(images.shape[:3])
    return np.stack([resize(g, size) for g in grey]).reshape(len(grey), -1).astype(np.float32) / 255


def _logistic_regression(seed: int):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=0.1, max_iter=3000, random_state=seed)


def _pca_svm(seed: int):
    from sklearn.decomposition import PCA
    from sklearn.pipeline import make_pipeline
    from sklearn.svm import SVC

    return make_pipeline(PCA(64, whiten=True, random_state=seed), SVC(C=10.0, random_state=seed))


BASELINES: dict[str, Callable] = {
    "logistic_regression": _logistic_regression,
    "pca_svm": _pca_svm,
}


def fit_predict(
    name: str,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_tests: list[np.ndarray],
    seed: int = 0,
) -> list[np.ndarray]:
    """Fit baseline `name` on the training images once; return its class predictions on each
    array of `x_tests` (the test images, and the lung audit's views of them)."""
    model = BASELINES[name](seed).fit(pixel_features(x_train), y_train)
    return [model.predict(pixel_features(x)).astype(np.int64) for x in x_tests]
