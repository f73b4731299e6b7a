import base64
import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxr.images import decode_grey, load_grey, resize
from cxr.serving import (
    MAX_ARRAY_PIXELS,
    MAX_IMAGES,
    BadRequest,
    answers,
    signature_and_example,
    to_batch,
)
from tests.conftest import REAL_SAMPLE


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
    assert to_batch([grey.tolist(), grey[:50, :60, None].tolist()], 32).shape == (2, 32, 32, 1)
    assert to_batch(grey[None].astype(float), 32).shape == (1, 32, 32, 1)
    with pytest.raises(BadRequest, match="got shape \\(100,\\)"):
        to_batch(grey, 32)  # no batch axis: a list of 80 one-row "images"
    buffer = io.BytesIO()
    Image.fromarray(grey).convert("RGB").save(buffer, format="JPEG")
    frame = pd.DataFrame({"image": [base64.b64encode(buffer.getvalue()).decode()]})
    assert to_batch(frame, 32).shape == (1, 32, 32, 1)


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
        to_batch(request_, 32)


def test_pixels_column_gives_the_same_batch_as_an_array():
    grey = np.random.default_rng(1).integers(0, 256, (40, 30)).astype(np.uint8)
    frame = pd.DataFrame({"pixels": [grey.tolist(), grey[:20].tolist()]})
    batch = to_batch(frame, 16)
    assert batch.shape == (2, 16, 16, 1)
    assert np.array_equal(batch[0], to_batch(grey[None], 16)[0])


def test_caps_on_images_per_request_and_array_pixels_say_the_limit():
    one = base64.b64encode(png_bytes(np.zeros((8, 8), np.uint8))).decode()
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


def test_answers_name_the_label_and_every_probability():
    out = answers(np.array([[0.1, 0.7, 0.1, 0.1]]), ["a", "b", "c", "d"])
    assert out == [{"label": "b", "probabilities": {"a": 0.1, "b": 0.7, "c": 0.1, "d": 0.1}}]
