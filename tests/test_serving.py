import base64
import io
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxr import pyfunc_classifier
from cxr.images import decode_grey, load_grey, resize
from cxr.pyfunc_classifier import (
    MAX_ARRAY_PIXELS,
    MAX_IMAGES,
    MAX_REQUEST_PIXELS,
    MIN_SIZE,
    BadRequest,
    Classifier,
    answers,
    load_classifier,
    log_classifier,
    predict_files,
    signature_and_example,
    to_batch,
)
from tests.conftest import REAL_SAMPLE

ROOT = Path(__file__).resolve().parent.parent
CLASSES = ["covid", "lung_opacity", "normal", "pneumonia"]


def png_bytes(grey: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(grey).save(buffer, format="PNG")
    return buffer.getvalue()


def real_files(n: int = 3):
    if not REAL_SAMPLE.is_dir():
        pytest.skip(f"the real radiograph sample is absent ({REAL_SAMPLE})")
    return sorted(REAL_SAMPLE.rglob("*.png"))[:n]


def test_prepare_predict_and_serving_decode_a_file_alike():
    """One decode/resize path: prepare (decode_grey + resize), `cxr predict` (load_grey on
    the file's bytes) and the server (base64 in a frame, or the pixels) agree to the pixel."""
    for path in real_files():
        prepared = resize(decode_grey(path), 64)
        assert np.array_equal(load_grey(path.read_bytes(), 64), prepared)
        encoded = base64.b64encode(path.read_bytes()).decode()
        served = to_batch(pd.DataFrame({"image": [encoded]}), 64)
        assert served.shape == (1, 64, 64, 1) and served.dtype == np.uint8
        assert np.array_equal(served[0, ..., 0], prepared)
        pixels = to_batch(np.array([decode_grey(path)]), 64)
        assert np.array_equal(pixels[0, ..., 0], prepared)


def test_pixel_arrays_of_any_size_and_jpeg_bytes_are_accepted():
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (80, 100)).astype(np.uint8)
    pairs = [grey.tolist(), grey[:50, :60, None].tolist()]
    assert to_batch(pairs, 32, min_size=50).shape == (2, 32, 32, 1)
    assert to_batch(grey[None].astype(float), 32, min_size=1).shape == (1, 32, 32, 1)
    with pytest.raises(BadRequest, match="got shape \\(100,\\)"):
        to_batch(grey, 32, min_size=1)  # no batch axis: a list of 80 one-row "images"
    buffer = io.BytesIO()
    Image.fromarray(grey).convert("RGB").save(buffer, format="JPEG")
    frame = pd.DataFrame({"image": [base64.b64encode(buffer.getvalue()).decode()]})
    assert to_batch(frame, 32, min_size=1).shape == (1, 32, 32, 1)


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (pd.DataFrame({"image": [base64.b64encode(b"not an image").decode()]}), "not an image"),
        (pd.DataFrame({"image": ["%%% not base64"]}), "not valid base64"),
        (pd.DataFrame({"image": [""]}), "empty file"),
        (pd.DataFrame({"pictures": [1]}), "expected one column, 'image'"),
        (pd.DataFrame({"image": ["a"], "pixels": [[[1]]]}), "expected one column"),
        (pd.DataFrame({"image": []}), "no images"),
        (np.zeros((2, 3, 4, 5)), "expected a 2-D grey image"),
        (np.full((1, 8, 8), 300.0), "0-255"),
        ([[["a"]]], "pixels must be numbers"),
        ([], "no images"),
    ],
)
def test_bad_requests_are_refused_with_the_reason(request_, message):
    with pytest.raises(BadRequest, match=message):
        to_batch(request_, 32, min_size=1)


def test_pixels_column_gives_the_same_batch_as_an_array():
    grey = np.random.default_rng(1).integers(0, 256, (40, 30)).astype(np.uint8)
    frame = pd.DataFrame({"pixels": [grey.tolist(), grey[:20].tolist()]})
    batch = to_batch(frame, 16, min_size=1)
    assert batch.shape == (2, 16, 16, 1)
    assert np.array_equal(batch[0], to_batch(grey[None], 16, min_size=1)[0])


def test_caps_on_images_per_request_and_array_pixels_say_the_limit():
    one = base64.b64encode(png_bytes(np.zeros((MIN_SIZE, MIN_SIZE), np.uint8))).decode()
    assert to_batch(pd.DataFrame({"image": [one] * MAX_IMAGES}), 8).shape[0] == MAX_IMAGES
    with pytest.raises(BadRequest, match=f"limit of {MAX_IMAGES} per request"):
        to_batch(pd.DataFrame({"image": [one] * (MAX_IMAGES + 1)}), 8)
    side = int(MAX_ARRAY_PIXELS**0.5)
    with pytest.raises(BadRequest, match=f"{side + 1} x {side} pixels is over the limit"):
        to_batch([np.zeros((side + 1, side), np.uint8)], 8)
    with pytest.raises(BadRequest, match="over the limit"):  # checked before conversion
        to_batch(pd.DataFrame({"pixels": [[[0] * side] * (side + 1)]}), 8)


def test_example_request_of_the_signature_is_accepted():
    signature, example = signature_and_example()
    assert [c.name for c in signature.inputs.inputs] == list(example.columns) + ["pixels"]
    assert to_batch(example, 32).shape == (1, 32, 32, 1)
    assert to_batch(signature_and_example(300)[1], 32, min_size=300).shape == (1, 32, 32, 1)


def test_the_signature_describes_each_answer():
    """The output schema is what `answers` returns: the label and a probability per class,
    and MLflow reads it back from the model's MLmodel file."""
    from mlflow.models import ModelSignature

    signature, _ = signature_and_example()
    answer = answers(np.array([[0.1, 0.7, 0.2]]), ["covid", "normal", "pneumonia"])[0]
    outputs = {c.name: c.type for c in signature.outputs.inputs}
    assert set(outputs) == set(answer)
    assert all(isinstance(v, float) for v in answer["probabilities"].values())
    assert outputs["probabilities"].to_dict() == {"type": "map", "values": {"type": "double"}}
    assert ModelSignature.from_dict(signature.to_dict()) == signature


def b64_png(height: int, width: int) -> str:
    ramp = np.tile((np.arange(width) % 256).astype(np.uint8), (height, 1))
    return base64.b64encode(png_bytes(ramp)).decode()


@pytest.mark.parametrize(("height", "width"), [(1, 1), (4000, 2), (2, 300)])
def test_images_prepare_would_reject_as_too_small_are_refused_in_both_columns(height, width):
    """A 1 x 1 dot or a 2-pixel sliver is no radiograph: refused with prepare's reason,
    as a file or as pixels, at the default minimum (prepare.min_size) or the one given."""
    reason = f"image 0: too small: {width}x{height} < {MIN_SIZE} px."
    with pytest.raises(BadRequest, match=f"^{re.escape(reason)}$"):
        to_batch(pd.DataFrame({"image": [b64_png(height, width)]}), 32)
    pixels = np.zeros((height, width), np.uint8).tolist()
    with pytest.raises(BadRequest, match=f"^{re.escape(reason)}$"):
        to_batch(pd.DataFrame({"pixels": [pixels]}), 32)
    with pytest.raises(BadRequest, match=f"too small: {width}x{height} < {MIN_SIZE} px"):
        to_batch([np.zeros((height, width))], 32)
    small = min(height, width)
    assert to_batch(pd.DataFrame({"image": [b64_png(height, width)]}), 8, small).shape[0] == 1
    assert to_batch([pixels], 8, min_size=small).shape == (1, 8, 8, 1)
    edge = b64_png(MIN_SIZE, 4 * MIN_SIZE)  # at the minimum: accepted
    assert to_batch(pd.DataFrame({"image": [edge]}), 8).shape == (1, 8, 8, 1)


def test_pixels_per_request_are_capped_from_headers_before_any_decoding(monkeypatch):
    """The sum over the request's images, from file headers and array shapes: over the cap,
    nothing is decoded and the answer names the total, the cap and the fix."""
    decoded = []
    monkeypatch.setattr(pyfunc_classifier, "load_grey", lambda *a, **k: decoded.append(a))
    files = pd.DataFrame({"image": [b64_png(200, 300)] * 3})  # 180,000 pixels in all
    with pytest.raises(BadRequest) as refused:
        to_batch(files, 8, max_pixels=179_999)
    assert str(refused.value) == (
        "the request's images hold 180,000 pixels in all, over the limit of 179,999 per "
        "request (cxr serve --max-megapixels); send fewer or smaller images per request."
    )
    arrays = [np.zeros((200, 300), np.uint8)] * 3
    with pytest.raises(BadRequest, match="hold 180,000 pixels in all, over the limit of 179,999"):
        to_batch(arrays, 8, max_pixels=179_999)
    with pytest.raises(BadRequest, match="hold 180,000 pixels"):
        to_batch(pd.DataFrame({"pixels": [a.tolist() for a in arrays]}), 8, max_pixels=1000)
    assert decoded == []
    monkeypatch.undo()
    assert to_batch(files, 8, max_pixels=180_000).shape == (3, 8, 8, 1)
    assert to_batch(arrays, 8, max_pixels=180_000).shape == (3, 8, 8, 1)


def test_the_default_pixel_cap_takes_a_batch_of_real_films(monkeypatch):
    """128 Kaggle images (299 x 299) or four hospital films (4000 x 4000) in a request pass
    the cap; a file that is not an image counts nothing and is refused for what it is."""
    decoded = []
    monkeypatch.setattr(
        pyfunc_classifier,
        "load_grey",
        lambda data, size, min_size: decoded.append(1) or np.zeros((size, size), np.uint8),
    )
    kaggle, film = b64_png(299, 299), b64_png(4000, 4000)
    assert to_batch(pd.DataFrame({"image": [kaggle] * MAX_IMAGES}), 8).shape[0] == MAX_IMAGES
    assert to_batch(pd.DataFrame({"image": [film] * 4}), 8).shape[0] == 4
    with pytest.raises(
        BadRequest, match=f"80,000,000 pixels in all, over the limit of {MAX_REQUEST_PIXELS:,}"
    ):
        to_batch(pd.DataFrame({"image": [film] * 5}), 8)
    assert len(decoded) == MAX_IMAGES + 4
    monkeypatch.undo()
    junk = base64.b64encode(b"not an image").decode()
    with pytest.raises(BadRequest, match="image 1: not an image"):
        to_batch(pd.DataFrame({"image": [b64_png(MIN_SIZE, MIN_SIZE), junk]}), 8)


def test_log_classifier_records_the_minimum_in_the_model_config(monkeypatch, tmp_path):
    import mlflow

    logged = {}
    monkeypatch.setattr(mlflow.pyfunc, "log_model", lambda **kwargs: logged.update(kwargs))
    log_classifier(tmp_path / "model.keras", CLASSES, None, min_size=256)
    assert logged["model_config"] == {"classes": CLASSES, "min_size": 256}
    assert to_batch(logged["input_example"], 8, min_size=256).shape == (1, 8, 8, 1)
    log_classifier(tmp_path / "model.keras", CLASSES, None)
    assert logged["model_config"]["min_size"] == MIN_SIZE


@pytest.fixture(scope="module")
def keras_file(tmp_path_factory):
    import keras

    model = keras.Sequential(
        [keras.Input((8, 8, 1)), keras.layers.Flatten(), keras.layers.Dense(4, "softmax")]
    )
    path = tmp_path_factory.mktemp("model") / "model.keras"
    model.save(path)
    return path


def test_the_served_model_reads_its_minimum_and_defaults_to_the_old_one(keras_file):
    from mlflow.exceptions import MlflowException

    old = Classifier()  # logged before the minimum went into the model config
    old.load_context(
        SimpleNamespace(
            artifacts={"keras_model": str(keras_file)}, model_config={"classes": CLASSES}
        )
    )
    assert old.min_size == MIN_SIZE
    given = Classifier()
    given.load_context(
        SimpleNamespace(
            artifacts={"keras_model": str(keras_file)},
            model_config={"classes": CLASSES, "min_size": 4},
        )
    )
    assert len(given.predict(None, [np.zeros((4, 6))])) == 1
    with pytest.raises(MlflowException, match="too small: 3x3 < 4 px"):
        given.predict(None, [np.zeros((3, 3))])
    with pytest.raises(MlflowException, match=f"too small: 6x4 < {MIN_SIZE} px"):
        old.predict(None, [np.zeros((4, 6))])


def test_cxr_predict_refuses_a_dot_and_a_sliver_and_labels_a_film(keras_file, tmp_path):
    """`cxr predict --model model.keras`: a 1 x 1 PNG and a 2 x 4000 sliver get prepare's
    reason, not a label."""
    paths = []
    for name, shape in (("dot", (1, 1)), ("sliver", (4000, 2)), ("film", (MIN_SIZE, MIN_SIZE))):
        paths.append(tmp_path / f"{name}.png")
        paths[-1].write_bytes(png_bytes(np.full(shape, 128, np.uint8)))
    dot, sliver, film = predict_files(load_classifier(str(keras_file), CLASSES), paths)
    assert dot["error"] == f"image 0: too small: 1x1 < {MIN_SIZE} px."
    assert sliver["error"] == f"image 0: too small: 2x4000 < {MIN_SIZE} px."
    assert film["label"] in CLASSES and "error" not in film


def test_answers_name_the_label_and_every_probability():
    out = answers(np.array([[0.1, 0.7, 0.1, 0.1]]), ["a", "b", "c", "d"])
    assert out == [{"label": "b", "probabilities": {"a": 0.1, "b": 0.7, "c": 0.1, "d": 0.1}}]
