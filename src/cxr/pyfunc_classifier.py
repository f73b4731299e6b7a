"""The served classifier: an MLflow pyfunc around the Keras model that takes what a client
has (grey pixel arrays, or PNG/JPEG bytes as base64) and answers with a label and the class
probabilities. `cxr predict` uses the same code locally.

The logged model's signature is a frame of one row per image, in one of two columns (one
column per request): `image`, a base64 PNG or JPEG file, or `pixels`, an H x W grey array
(0-255, any size; resized like prepare does). Over HTTP (`cxr serve`, POST /invocations):
`{"dataframe_records": [{"image": "<base64>"}, ...]}` or `[{"pixels": [[...], ...]}, ...]`.
Each answer: `{"label": "covid", "probabilities": {"covid": 0.91, ...}}`. A request that is
not one of these (not an image, wrong shape, empty, over a cap) is refused with HTTP 400 and
the reason; so is an image that prepare would reject as too small (smaller side under
prepare.min_size, which travels with the logged model), in either column.

Every cap is checked before any image is decoded, the pixels of a request included: their
sum, read from each file's header (or an array's shape), is at most MAX_REQUEST_PIXELS, so
decoding one request takes at most ~0.6 s whatever it holds (at the ~110 M pixels/s that
decoding 128 files of 7000 x 7000 took here); the images are decoded one at a time, so peak
memory is that of one image, capped by images.MAX_PIXELS.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cxr.images import ImageRejected, load_grey, resize, too_small

try:
    from mlflow.pyfunc import PythonModel
except ImportError:  # the library works without MLflow; serving needs it
    PythonModel = object


# Caps checked before any decoding. Files keep prepare's cap (images.MAX_PIXELS); pixel arrays,
# which cost ~4 bytes of JSON and 8 of memory per pixel, are capped far lower: send a large
# image as a PNG file instead. `cxr serve` also caps the request body before parsing it.
MAX_IMAGES = 128
MAX_ARRAY_PIXELS = 2048 * 2048
# Pixels of all a request's images: 128 Kaggle images (299 x 299, 11 M), four hospital films
# of 4000 x 4000 or one image at images.MAX_PIXELS fit; 128 bombs of 7000 x 7000 (6.3 G, ~1
# minute of decoding) do not. `cxr serve --max-megapixels` sets it.
MAX_REQUEST_PIXELS = 64_000_000
# The minimum of models logged before log_classifier recorded theirs (prepare.min_size) in the
# model config: prepare's minimum then, whatever params.yaml says now.
MIN_SIZE = 128
COLUMNS = ("image", "pixels")


class BadRequest(ValueError):
    """A request the classifier cannot answer; the message says why and what to send."""


def _file_bytes(value: Any, i: int) -> bytes:
    if isinstance(value, str):
        try:
            value = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError) as err:
            raise BadRequest(f"image {i}: not valid base64 ({err}).") from err
    if not isinstance(value, bytes):
        raise BadRequest(f"image {i}: expected base64 PNG/JPEG bytes, got {type(value).__name__}.")
    return value


def _header_pixels(data: bytes) -> int:
    """Width x height from a file's header, nothing decoded; 0 for what PIL cannot open (the
    decode then says why, before decoding anything: decode_grey)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return 0
    return width * height


def _array_shape(value: Any) -> tuple[int, int]:
    """Rows x columns of a pixel array, from its length and its first row's: nothing converted."""
    rows = len(value) if isinstance(value, list | np.ndarray) else 0
    cols = len(value[0]) if rows and isinstance(value[0], list | np.ndarray) else 0
    return rows, cols


def _from_file(data: bytes, i: int, size: int, min_size: int) -> np.ndarray:
    try:
        return load_grey(data, size, min_size)
    except ImageRejected as err:
        raise BadRequest(f"image {i}: {err}.") from err


def _from_pixels(value: Any, i: int, size: int, min_size: int) -> np.ndarray:
    rows, cols = _array_shape(value)
    if rows * cols > MAX_ARRAY_PIXELS:
        raise BadRequest(
            f"image {i}: {rows} x {cols} pixels is over the limit of {MAX_ARRAY_PIXELS:,} "
            "for a pixel array; send it as a PNG or JPEG file in the 'image' column."
        )
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
    if min(grey.shape) < min_size:  # as for a file
        raise BadRequest(f"image {i}: {too_small(grey.shape, min_size)}.")
    if not np.isfinite(grey).all() or grey.min() < 0 or grey.max() > 255:
        raise BadRequest(f"image {i}: pixel values must lie in 0-255.")
    return resize(np.rint(grey).astype(np.uint8), size)


def to_batch(
    model_input: Any,
    size: int,
    min_size: int = MIN_SIZE,
    max_pixels: int = MAX_REQUEST_PIXELS,
) -> np.ndarray:
    """A request frame (column `image` or `pixels`, a row per image), or an array of pixel
    images (n, H, W[, 1]) -> (n, size, size, 1) uint8 batch; BadRequest otherwise, or when
    an image's smaller side is under `min_size`, or when the images hold more than
    `max_pixels` in all (counted from headers and shapes before anything is decoded)."""
    import pandas as pd

    if isinstance(model_input, pd.DataFrame):
        given = [c for c in COLUMNS if c in model_input.columns]
        if len(given) != 1:
            raise BadRequest(
                "expected one column, 'image' (base64 PNG/JPEG) or 'pixels' (H x W grey "
                f"arrays), in every row (got columns {list(model_input.columns)})."
            )
        files, items = given[0] == "image", list(model_input[given[0]])
    elif isinstance(model_input, np.ndarray | list):
        files, items = False, list(model_input)  # always a batch: (n, H, W[, 1])
    else:
        raise BadRequest(f"unsupported input of type {type(model_input).__name__}.")
    if not items:
        raise BadRequest("the request holds no images.")
    if len(items) > MAX_IMAGES:
        raise BadRequest(
            f"{len(items)} images is over the limit of {MAX_IMAGES} per request; split the request."
        )
    if files:
        items = [_file_bytes(item, i) for i, item in enumerate(items)]
        total = sum(map(_header_pixels, items))
    else:
        total = sum(rows * cols for rows, cols in map(_array_shape, items))
    if total > max_pixels:
        raise BadRequest(
            f"the request's images hold {total:,} pixels in all, over the limit of "
            f"{max_pixels:,} per request (cxr serve --max-megapixels); send fewer or smaller "
            "images per request."
        )
    convert = _from_file if files else _from_pixels
    return np.stack([convert(item, i, size, min_size) for i, item in enumerate(items)])[..., None]


def answers(probs: np.ndarray, classes: list[str]) -> list[dict[str, Any]]:
    return [
        {
            "label": classes[int(p.argmax())],
            "probabilities": {c: float(v) for c, v in zip(classes, p, strict=True)},
        }
        for p in probs
    ]


class Classifier(PythonModel):
    """The pyfunc: the Keras model file as an artefact, the classes and prepare's min_size in
    the model config (MIN_SIZE for a model logged without it). `max_pixels` is the server's
    to set (`cxr serve --max-megapixels`), not the model's."""

    min_size, max_pixels = MIN_SIZE, MAX_REQUEST_PIXELS

    def load_context(self, context) -> None:
        import keras

        self.model = keras.saving.load_model(context.artifacts["keras_model"])
        self.classes = list(context.model_config["classes"])
        self.min_size = int(context.model_config.get("min_size", MIN_SIZE))
        self.size = int(self.model.input_shape[1])

    def predict(self, context, model_input, params=None) -> list[dict[str, Any]]:
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        try:
            batch = to_batch(model_input, self.size, self.min_size, self.max_pixels)
        except BadRequest as err:
            raise MlflowException(str(err), error_code=INVALID_PARAMETER_VALUE) from err
        return answers(np.asarray(self.model.predict_on_batch(batch)), self.classes)


def signature_and_example(min_size: int = MIN_SIZE):
    """The request schema (one row per image: `image` or `pixels`, see the module text) and
    an example request: a grey ramp of the smallest size accepted, as a base64 PNG (no
    patient data)."""
    import pandas as pd
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, Map, Schema

    schema = Schema(
        [
            ColSpec("string", "image", required=False),
            ColSpec(Array(Array("long")), "pixels", required=False),
        ]
    )
    png = io.BytesIO()
    ramp = np.linspace(0, 255, min_size).astype(np.uint8)
    Image.fromarray(np.tile(ramp, (min_size, 1))).save(png, "PNG")
    example = pd.DataFrame({"image": [base64.b64encode(png.getvalue()).decode()]})
    # Each answer (`answers`): the label and every class's probability.
    outputs = Schema([ColSpec("string", "label"), ColSpec(Map("double"), "probabilities")])
    return ModelSignature(inputs=schema, outputs=outputs), example


def log_classifier(
    keras_model: Path,
    classes: list[str],
    requirements: list[str] | None,
    min_size: int = MIN_SIZE,
):
    """Log the pyfunc into the active run as `classifier`; return its ModelInfo. `min_size`
    (prepare.min_size) goes with it: the served model refuses what prepare would."""
    import mlflow

    package = Path(__file__).resolve().parent
    signature, example = signature_and_example(min_size)
    return mlflow.pyfunc.log_model(
        name="classifier",
        python_model=str(package / "pyfunc_definition.py"),  # models-from-code: no pickle
        artifacts={"keras_model": str(keras_model)},
        model_config={"classes": classes, "min_size": int(min_size)},
        code_paths=[str(package)],
        pip_requirements=requirements,
        signature=signature,
        input_example=example,
    )


def load_classifier(model: str, classes: list[str] | None = None, min_size: int = MIN_SIZE):
    """The predict function of a model URI (`models:/cxr-classifier@champion`, `runs:/...`)
    through MLflow, or of a local `.keras` file wrapped in the same Classifier (`classes`
    then names its outputs; images under `min_size` are refused)."""
    if model.endswith(".keras"):
        import keras

        local = Classifier()
        local.model = keras.saving.load_model(model)
        local.classes, local.size = list(classes), int(local.model.input_shape[1])
        local.min_size = min_size
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
