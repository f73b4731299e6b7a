"""Augmentation inside the training step: one layer, on the accelerator, compiled with XLA.

`RandomRadiograph` draws one affine map per image (rotation, shift, zoom, optional
left-right flip) and resamples the image once, bilinearly, with black outside the film; then
it varies brightness and contrast. It runs as the first layer of the *training* model only
(`training_model`): the model that is saved, logged and served never contains it.

Why not keras.layers.RandomRotation & co.: those resample once per layer (three bilinear
passes blur the image three times), run on the host when placed in tf.data (they share the
CPU with the training step and starve a GPU), and mark a model as not XLA-compilable
(`jit_compile` falls back to off). This layer is plain `keras.ops` arithmetic and one
batched gather, so it runs on any Keras backend, compiles with the step and costs a few
percent of it.
"""

from __future__ import annotations

import math
from typing import Any

import keras
from keras import ops

KEYS = ("rotation", "shift", "zoom", "brightness", "contrast", "flip")


@keras.saving.register_keras_serializable(package="cxr")
class RandomRadiograph(keras.layers.Layer):
    """Random affine map + brightness + contrast for batches of (H, W, C) images in 0-255.

    `rotation` is a fraction of a full turn (0.02 = up to 7.2 degrees either way), `shift`
    a fraction of the side, `zoom` a fraction of the scale (0.1 = 90-110 %), `brightness` a
    fraction of 255 added, `contrast` a fraction by which the spread about each image's mean
    grows or shrinks. Pixels stay in 0-255. Identity at inference (`training` false)."""

    def __init__(
        self,
        rotation: float = 0.0,
        shift: float = 0.0,
        zoom: float = 0.0,
        brightness: float = 0.0,
        contrast: float = 0.0,
        flip: bool = False,
        seed: int | None = None,
        **kwargs,
    ):
        kwargs.setdefault("dtype", "float32")  # resampling in float32 under mixed precision too
        super().__init__(**kwargs)
        self.rotation, self.shift, self.zoom = float(rotation), float(shift), float(zoom)
        self.brightness, self.contrast, self.flip = float(brightness), float(contrast), bool(flip)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, images, training=None):
        images = ops.cast(images, "float32")
        if not training:
            return images
        batch = ops.shape(images)[0]
        draws = keras.random.uniform((batch, 6), -1.0, 1.0, seed=self.seed_generator)
        factor = None
        if self.contrast:
            factor = 1.0 + keras.random.uniform(
                (batch, 1, 1, 1), -self.contrast, self.contrast, seed=self.seed_generator
            )
        return self.transform(images, draws, factor)

    def transform(self, images, draws, factor=None):
        """The augmentation of float32 `images` (B, H, W, C) for given random draws: `draws`
        (B, 6) uniform in [-1, 1] (rotation, zoom, flip, x shift, y shift, brightness) and
        `factor` (B, 1, 1, 1), the contrast factors (used when `contrast` is set)."""
        height, width = images.shape[1], images.shape[2]
        angle = draws[:, 0] * (self.rotation * 2 * math.pi)
        scale = 1.0 + draws[:, 1] * self.zoom
        flip = ops.where(draws[:, 2] < 0, -1.0, 1.0) if self.flip else ops.ones_like(draws[:, 2])
        dx, dy = draws[:, 3] * (self.shift * width), draws[:, 4] * (self.shift * height)
        # Output pixel p takes the input at c + scale * R(angle) * F * (p - c) - shift, where c
        # is the centre and F the optional flip: one map, one resampling.
        cos, sin = ops.cos(angle) * scale, ops.sin(angle) * scale
        cy, cx = (height - 1) / 2.0, (width - 1) / 2.0
        ys = ops.arange(height, dtype="float32")[None, :, None] - cy
        xs = ops.arange(width, dtype="float32")[None, None, :] - cx
        cos, sin = cos[:, None, None], sin[:, None, None]
        fx = xs * flip[:, None, None]
        src_x = cx + cos * fx - sin * ys - dx[:, None, None]
        src_y = cy + sin * fx + cos * ys - dy[:, None, None]
        out = _bilinear(images, src_y, src_x)
        if self.brightness:
            out = out + (draws[:, 5] * (self.brightness * 255.0))[:, None, None, None]
        if self.contrast:
            mean = ops.mean(out, axis=(1, 2), keepdims=True)
            out = (out - mean) * factor + mean
        return ops.clip(out, 0.0, 255.0)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            **{key: getattr(self, key) for key in KEYS},
            "seed": self.seed,
        }


def _bilinear(images, src_y, src_x):
    """Sample (B, H, W, C) `images` at (B, H, W) float coordinates; 0 outside the image."""
    height, width, channels = images.shape[1], images.shape[2], images.shape[3]
    flat = ops.reshape(images, (-1, height * width, channels))
    y0, x0 = ops.floor(src_y), ops.floor(src_x)
    wy, wx = src_y - y0, src_x - x0
    out = 0.0
    for oy, ox, weight in ((0, 0, (1 - wy) * (1 - wx)), (0, 1, (1 - wy) * wx),
                           (1, 0, wy * (1 - wx)), (1, 1, wy * wx)):  # fmt: skip
        y, x = y0 + oy, x0 + ox
        inside = (y >= 0) & (y <= height - 1) & (x >= 0) & (x <= width - 1)
        index = ops.cast(
            ops.clip(y, 0, height - 1) * width + ops.clip(x, 0, width - 1),
            "int32",
        )
        index = ops.repeat(ops.reshape(index, (-1, height * width, 1)), channels, axis=2)
        pixels = ops.take_along_axis(flat, index, axis=1)
        weight = ops.where(inside, weight, 0.0)
        out += ops.reshape(pixels, (-1, height, width, channels)) * weight[..., None]
    return out


def make_augmenter(augment: dict[str, Any], seed: int) -> RandomRadiograph | None:
    """The training model's augmentation layer from params.yaml's `train.augment`, or None
    when every setting is off."""
    if not any(augment[key] for key in KEYS):
        return None
    return RandomRadiograph(**{key: augment[key] for key in KEYS}, seed=seed, name="augment")


def served_part(fitted: keras.Model) -> keras.Model:
    """The model inside a `training_model` (itself when it has no augmentation layer)."""
    if any(isinstance(layer, RandomRadiograph) for layer in fitted.layers):
        return fitted.layers[-1]
    return fitted


def training_model(model: keras.Model, augmenter: RandomRadiograph | None) -> keras.Model:
    """`model` behind the augmentation layer: what `fit` trains. The two share their weights,
    so training this trains `model`, which is saved and served without the layer."""
    if augmenter is None:
        return model
    inputs = keras.Input(model.input_shape[1:], name="image")
    return keras.Model(inputs, model(augmenter(inputs)), name=f"{model.name}_training")
