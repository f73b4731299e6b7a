"""The served classifier: an MLflow pyfunc around the Keras model that takes what a client
has (grey pixel arrays, or PNG/JPEG bytes as base64) and answers with a label and the class
probabilities. `cxr predict` uses the same code locally.

Request forms (`mlflow models serve`, POST /invocations, JSON):
- `{"inputs": [<H x W grey pixels 0-255>, ...]}` (any size; resized like prepare does);
- `{"dataframe_records": [{"image": "<base64 PNG or JPEG>"}, ...]}` (or `"instances"`).
Each answer: `{"label": "covid", "probabilities": {"covid": 0.91, ...}}`. A request that is
not one of these (not an image, wrong shape, empty) is refused with HTTP 400 and the reason.
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path
from typing import Any

import numpy as np

from cxr.images import ImageRejected, load_grey, resize

try:
    from mlflow.pyfunc import PythonModel
except ImportError:  # the library works without MLflow; serving needs it
    PythonModel = object


class BadRequest(ValueError):
    """A request the classifier cannot answer; the message says why and what to send."""


def _from_base64(value: Any, i: int, size: int) -> np.ndarray:
    if isinstance(value, str):
        try:
            value = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError) as err:
            raise BadRequest(f"image {i}: not valid base64 ({err}).") from err
    if not isinstance(value, bytes):
        raise BadRequest(f"image {i}: expected base64 PNG/JPEG bytes, got {type(value).__name__}.")
    try:
        return load_grey(value, size)
    except ImageRejected as err:
        raise BadRequest(f"image {i}: {err}.") from err


def _from_pixels(value: Any, i: int, size: int) -> np.ndarray:
    try:
        grey = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise BadRequest(f"image {i}: pixels must be numbers ({err}).") from err
    if grey.ndim == 3 and grey.shape[-1] == 1:
        grey = grey[..., 0]
    if grey.ndim != 2 or min(grey.shape) < 1:
        raise BadRequest(
            f"image {i}: expected a 2-D grey image (H, W) or (H, W, 1), got shape {grey.shape}."
        )
    if not np.isfinite(grey).all() or grey.min() < 0 or grey.max() > 255:
        raise BadRequest(f"image {i}: pixel values must lie in 0-255.")
    return resize(np.rint(grey).astype(np.uint8), size)


def to_batch(model_input: Any, size: int) -> np.ndarray:
    """Any accepted request -> (n, size, size, 1) uint8 batch; BadRequest otherwise."""
    import pandas as pd

    if isinstance(model_input, pd.DataFrame):
        if "image" not in model_input.columns:
            raise BadRequest(
                "expected a column 'image' of base64 PNG/JPEG strings "
                f"(got columns {list(model_input.columns)}), or 'inputs' with pixel arrays."
            )
        items, convert = list(model_input["image"]), _from_base64
    elif isinstance(model_input, dict) and "image" in model_input:
        items, convert = list(np.atleast_1d(model_input["image"])), _from_base64
    elif isinstance(model_input, np.ndarray) and model_input.dtype.kind in "OSU":
        items, convert = list(model_input.ravel()), _from_base64  # base64 strings as inputs
    elif isinstance(model_input, np.ndarray | list):
        items, convert = list(model_input), _from_pixels  # always a batch: (n, H, W[, 1])
    else:
        raise BadRequest(f"unsupported input of type {type(model_input).__name__}.")
    if not items:
        raise BadRequest("the request holds no images.")
    return np.stack([convert(item, i, size) for i, item in enumerate(items)])[..., None]


def answers(probs: np.ndarray, classes: list[str]) -> list[dict[str, Any]]:
    return [
        {
            "label": classes[int(p.argmax())],
            "probabilities": {c: float(v) for c, v in zip(classes, p, strict=True)},
        }
        for p in probs
    ]


class Classifier(PythonModel):
    """The pyfunc: the Keras model file as an artefact, the classes in the model config."""

    def load_context(self, context) -> None:
        import keras

        self.model = keras.saving.load_model(context.artifacts["keras_model"])
        self.classes = list(context.model_config["classes"])
        self.size = int(self.model.input_shape[1])

    def predict(self, context, model_input, params=None) -> list[dict[str, Any]]:
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        try:
            batch = to_batch(model_input, self.size)
        except BadRequest as err:
            raise MlflowException(str(err), error_code=INVALID_PARAMETER_VALUE) from err
        return answers(self.model.predict(batch, verbose=0), self.classes)


def log_classifier(keras_model: Path, classes: list[str], requirements: list[str] | None):
    """Log the pyfunc into the active run as `classifier`; return its ModelInfo."""
    import mlflow

    package = Path(__file__).resolve().parent
    return mlflow.pyfunc.log_model(
        name="classifier",
        python_model=str(package / "served_model.py"),  # models-from-code: no pickle
        artifacts={"keras_model": str(keras_model)},
        model_config={"classes": classes},
        code_paths=[str(package)],
        pip_requirements=requirements,
    )


def load_classifier(model: str, classes: list[str] | None = None):
    """The predict function of a model URI (`models:/cxr-classifier@champion`, `runs:/...`)
    through MLflow, or of a local `.keras` file wrapped in the same Classifier (`classes`
    then names its outputs)."""
    if model.endswith(".keras"):
        import keras

        local = Classifier()
        local.model = keras.saving.load_model(model)
        local.classes, local.size = list(classes), int(local.model.input_shape[1])
        return lambda request: local.predict(None, request)
    import mlflow

    return mlflow.pyfunc.load_model(model).predict


def predict_files(predict, paths: list[Path]) -> list[dict[str, Any]]:
    """`cxr predict`: each file sent as the served model receives it (base64 in a frame).
    A file that is not a usable image gets an `error` instead of a label."""
    import pandas as pd
    from mlflow.exceptions import MlflowException

    results = []
    for path in paths:
        try:
            encoded = base64.b64encode(Path(path).read_bytes()).decode()
            answer = predict(pd.DataFrame({"image": [encoded]}))[0]
        except (OSError, MlflowException) as err:
            message = err.message if isinstance(err, MlflowException) else str(err)
            results.append({"file": str(path), "error": message})
            continue
        results.append({"file": str(path), **answer})
    return results
