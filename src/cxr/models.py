"""The model zoo: one small builder per architecture, in one registry.

Every model takes raw grey images (H, W, 1) with pixel values 0-255 and does its own scaling
inside the graph, so a saved model needs no outside preprocessing. The softmax runs in
float32 so that mixed precision stays numerically stable.
"""

from __future__ import annotations

from collections.abc import Callable

import keras
from keras import layers

POOLINGS = {
    "max": layers.GlobalMaxPooling2D,
    "avg": layers.GlobalAveragePooling2D,
    "flatten": layers.Flatten,
}


def _pool(x, pooling: str):
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {sorted(POOLINGS)}, got {pooling!r}.")
    return POOLINGS[pooling]()(x)


def _head(x, n_classes: int, dense_units: int, dropout: float):
    x = layers.Dense(dense_units, activation="relu")(x)
    x = layers.Dropout(dropout)(x)
    return layers.Dense(n_classes, activation="softmax", dtype="float32", name="probs")(x)


def build_cnn(
    input_shape: tuple[int, int, int],
    n_classes: int,
    filters: list[int] = (32, 64, 128),
    dense_units: int = 128,
    dropout: float = 0.3,
    pooling: str = "max",
) -> keras.Model:
    """A plain CNN: conv/max-pool blocks, no batch norm (the study's baseline).

    `pooling` reduces the last feature map: "max" (default) keeps the strongest local
    response, which is what a focal finding gives; "avg" dilutes a small lesion over the
    whole image (on the phantoms it stayed at chance where "max" reached 0.95);
    "flatten" keeps positions, at many more parameters.
    """
    inputs = keras.Input(input_shape, name="image")
    x = layers.Rescaling(1 / 127.5, offset=-1.0)(inputs)
    for f in filters:
        x = layers.Conv2D(f, 3, padding="same", activation="relu", kernel_initializer="he_normal")(
            x
        )
        x = layers.MaxPooling2D()(x)
    x = _pool(x, pooling)
    return keras.Model(inputs, _head(x, n_classes, dense_units, dropout), name="cnn")


# Architecture key -> builder. Builder keyword arguments are the model's params in
# params.yaml (models.<key>), minus the training-only keys in TRAINING_KEYS.
MODELS: dict[str, Callable[..., keras.Model]] = {"cnn": build_cnn}
TRAINING_KEYS = ("learning_rate",)


def build_model(
    name: str, input_shape: tuple[int, int, int], n_classes: int, **params
) -> keras.Model:
    if name not in MODELS:
        raise ValueError(f"Unknown model {name!r}; known models: {sorted(MODELS)}.")
    kwargs = {k: v for k, v in params.items() if k not in TRAINING_KEYS}
    return MODELS[name](input_shape, n_classes, **kwargs)
