"""The augmentation layer (cxr.augment) on whichever Keras backend runs the tests."""

import math

import keras
import numpy as np
import pytest

from cxr.augment import RandomRadiograph, make_augmenter, served_part, training_model
from cxr.models import build_model

NO_AUGMENT = {
    "rotation": 0.0,
    "shift": 0.0,
    "zoom": 0.0,
    "brightness": 0.0,
    "contrast": 0.0,
    "flip": False,
}
EVERYTHING = {
    "rotation": 0.05,
    "shift": 0.1,
    "zoom": 0.2,
    "brightness": 0.1,
    "contrast": 0.3,
    "flip": True,
}


def as_numpy(x) -> np.ndarray:
    return keras.ops.convert_to_numpy(x)


def injected(seed: int, batch: int, contrast: float):
    """Random draws as the layer makes them: (B, 6) in [-1, 1] and contrast factors."""
    rng = np.random.default_rng(seed)
    draws = rng.uniform(-1, 1, (batch, 6)).astype("float32")
    factor = (1 + rng.uniform(-contrast, contrast, (batch, 1, 1, 1))).astype("float32")
    return draws, factor


def reference(layer: RandomRadiograph, images, u, factor) -> np.ndarray:
    """The layer's maths as it was written in TensorFlow before it moved to keras.ops
    (commit d5b136b), with the draws given instead of drawn."""
    import tensorflow as tf

    images = tf.cast(images, tf.float32)
    height, width = images.shape[1], images.shape[2]
    angle = u[:, 0] * (layer.rotation * 2 * math.pi)
    scale = 1.0 + u[:, 1] * layer.zoom
    flip = tf.where(u[:, 2] < 0, -1.0, 1.0) if layer.flip else tf.ones_like(u[:, 2])
    dx, dy = u[:, 3] * (layer.shift * width), u[:, 4] * (layer.shift * height)
    cos, sin = tf.cos(angle) * scale, tf.sin(angle) * scale
    cy, cx = (height - 1) / 2.0, (width - 1) / 2.0
    ys = tf.range(height, dtype=tf.float32)[None, :, None] - cy
    xs = tf.range(width, dtype=tf.float32)[None, None, :] - cx
    cos, sin = cos[:, None, None], sin[:, None, None]
    fx = xs * flip[:, None, None]
    src_x = cx + cos * fx - sin * ys - dx[:, None, None]
    src_y = cy + sin * fx + cos * ys - dy[:, None, None]
    channels = images.shape[3]
    flat = tf.reshape(images, (tf.shape(images)[0], height * width, channels))
    y0, x0 = tf.floor(src_y), tf.floor(src_x)
    wy, wx = src_y - y0, src_x - x0
    out = 0.0
    for oy, ox, weight in ((0, 0, (1 - wy) * (1 - wx)), (0, 1, (1 - wy) * wx),
                           (1, 0, wy * (1 - wx)), (1, 1, wy * wx)):  # fmt: skip
        y, x = y0 + oy, x0 + ox
        inside = (y >= 0) & (y <= height - 1) & (x >= 0) & (x <= width - 1)
        index = tf.cast(
            tf.clip_by_value(y, 0, height - 1) * width + tf.clip_by_value(x, 0, width - 1),
            tf.int32,
        )
        pixels = tf.gather(flat, tf.reshape(index, (-1, height * width)), batch_dims=1)
        weight = tf.where(inside, weight, 0.0)
        out += tf.reshape(pixels, tf.shape(images)) * weight[..., None]
    if layer.brightness:
        out = out + (u[:, 5] * (layer.brightness * 255.0))[:, None, None, None]
    if layer.contrast:
        mean = tf.reduce_mean(out, axis=(1, 2), keepdims=True)
        out = (out - mean) * factor + mean
    return tf.clip_by_value(out, 0.0, 255.0).numpy()


@pytest.mark.parametrize(
    "settings",
    [EVERYTHING, {**NO_AUGMENT, "rotation": 0.1}, {**NO_AUGMENT, "zoom": 0.5, "flip": True}],
)
@pytest.mark.parametrize("channels", [1, 3])
def test_the_maths_equals_the_tensorflow_original_with_the_same_draws(settings, channels):
    x = np.random.default_rng(1).integers(0, 256, (6, 20, 28, channels)).astype("float32")
    layer = RandomRadiograph(**settings, seed=0)
    draws, factor = injected(2, len(x), settings["contrast"])
    out = as_numpy(layer.transform(keras.ops.convert_to_tensor(x), draws, factor))
    want = reference(layer, x, draws, factor)
    # The same operations in the same order; XLA on JAX may fuse a multiply-add.
    np.testing.assert_allclose(out, want, rtol=0, atol=1e-3)
    assert np.abs(out - x).max() > 10  # the draws do move pixels


def test_augmentation_changes_training_batches_only():
    x = np.tile(np.linspace(0, 255, 32, dtype=np.uint8), (16, 32, 1))[..., None]
    assert make_augmenter(NO_AUGMENT, 0) is None
    augment = make_augmenter({**NO_AUGMENT, "rotation": 0.05, "shift": 0.1, "contrast": 0.2}, 0)
    out = as_numpy(augment(x, training=True))
    assert out.min() >= 0 and out.max() <= 255
    assert not np.allclose(out, x)
    assert np.array_equal(as_numpy(augment(x)), x)  # inference: untouched


def test_augmentation_is_one_resampling_of_the_image():
    x = np.random.default_rng(0).integers(0, 256, (8, 24, 24, 1)).astype(np.uint8)
    # every setting at zero maps each pixel onto itself
    assert np.array_equal(as_numpy(RandomRadiograph(seed=0)(x, training=True)), x)
    # a flip alone gives each image either as it was or mirrored, both seen in a batch
    flipped = as_numpy(RandomRadiograph(flip=True, seed=0)(x, training=True))
    mirrored = [np.array_equal(f, i[:, ::-1]) for f, i in zip(flipped, x, strict=True)]
    same = [np.array_equal(f, i) for f, i in zip(flipped, x, strict=True)]
    assert all(m or s for m, s in zip(mirrored, same, strict=True))
    assert any(mirrored) and any(same)
    # zooming out leaves black (0) margins: the film's outside, never wrapped-around pixels
    bright = np.full((8, 24, 24, 1), 200, np.uint8)
    out = as_numpy(RandomRadiograph(zoom=0.5, seed=1)(bright, training=True))
    assert (out == 0).any() and out.max() <= 200.001
    # seeded: the same layer config draws the same sequence
    a = as_numpy(RandomRadiograph(rotation=0.05, seed=3)(x, training=True))
    b = as_numpy(RandomRadiograph(rotation=0.05, seed=3)(x, training=True))
    assert np.array_equal(a, b)


def test_training_model_trains_the_served_model_and_saves_without_augmentation(tmp_path):
    keras.utils.set_random_seed(0)  # not whatever the tests before left in the generators
    model = build_model("cnn", (24, 24, 1), 4, filters=[4], dense_units=4)
    fitted = training_model(model, make_augmenter({**NO_AUGMENT, "rotation": 0.05}, 0))
    assert served_part(fitted) is model and served_part(model) is model
    fitted.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    before = [w.copy() for w in model.get_weights()]
    x = np.random.default_rng(0).integers(0, 256, (8, 24, 24, 1)).astype(np.uint8)
    # Unbalanced labels: even with every ReLU dead (4 units), the output bias must move.
    fitted.train_on_batch(x, np.arange(8) % 3)
    assert any(not np.array_equal(a, b) for a, b in zip(before, model.get_weights(), strict=True))
    model.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras")
    assert not any(isinstance(layer, RandomRadiograph) for layer in loaded.layers)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0))
    # the checkpoint of a killed run (the training model, optimizer included) loads back
    fitted.save(tmp_path / "fitted.keras")
    restored = keras.saving.load_model(tmp_path / "fitted.keras")
    assert isinstance(restored.layers[1], RandomRadiograph)
    np.testing.assert_allclose(
        served_part(restored).predict(x, verbose=0), model.predict(x, verbose=0)
    )
