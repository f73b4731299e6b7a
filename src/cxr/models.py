"""The model zoo: one small builder per architecture, in one registry.

Every model takes raw grey images (H, W, 1) with pixel values 0-255 and does its own
resizing, scaling and channel handling inside the graph, with serialisable layers only (no
`Lambda`, which safe-mode loading refuses), so a saved model needs no outside preprocessing.
The softmax runs in float32 so that mixed precision stays numerically stable.

`lung_focus="template"` puts the lung focus first in every graph (`_input`): the image is
cropped to the lung template's box (cxr.lungs, grown by `lung_focus_margin`), resized back,
and everything outside the template's lungs is set to mid grey, the same for every image, so
borders, markers, shoulders and body outline never reach the network, in training,
evaluation, serving and `cxr predict` alike.

Transfer models (`vgg16`, `vgg19`, `resnet50v2`) take `weights`: `imagenet`, `none`, or the
path of a weights file for the base (include_top=False). With ImageNet (or file) weights the
base is frozen and only the head trains, plus the top `fine_tune_layers` layers if set. With
`none` the whole base trains from scratch, made trainable as measured on the phantoms
(docs/training.md, "Models"): VGG gets batch norm after each conv (He-normal kernels; see
`_with_batch_norm`),
and batch norm momentum is `bn_momentum` (0.99 keeps the moving statistics near their
initial values for the few hundred steps of a small run).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np
from keras import layers

from cxr.lungs import FOCUS_FILL, focus_crop, template_mask

POOLINGS = {  # its names: cxr.params.POOLINGS (checked there without importing Keras)
    "max": layers.GlobalMaxPooling2D,
    "avg": layers.GlobalAveragePooling2D,
    "flatten": layers.Flatten,
}
# keras.applications refuse inputs under 32 x 32 (five halvings in VGG, ResNet's stem).
TRANSFER_MIN_INPUT = 32
# ImageNet channel means of the "caffe" preprocessing that VGG expects (BGR order; with three
# equal grey channels the order of the channels themselves does not matter).
VGG_MEAN_BGR = (103.939, 116.779, 123.68)


def _pool(x, pooling: str):
    return POOLINGS[pooling]()(x)


# The builders' lung focus settings: train's (cxr.fit.settings_for), or a model's own.
LUNG_FOCUS_KEYS = ("lung_focus", "lung_focus_margin")


def _focus(settings: dict) -> dict:
    """A builder's lung focus settings, from its locals()."""
    return {k: settings[k] for k in LUNG_FOCUS_KEYS}


def _head(x, n_classes: int, dense_units: int, dropout: float):
    x = layers.Dropout(dropout)(x)
    x = layers.Dense(dense_units, activation="relu")(x)
    x = layers.Dropout(dropout)(x)
    return layers.Dense(n_classes, activation="softmax", dtype="float32", name="probs")(x)


def lung_focus_layers(x, input_shape, size: int, margin: float):
    """Crop (H, W, 1) images to the template's box grown by `margin`, resize to `size`, and
    set what lies outside the template's lungs (grown by the same margin) to FOCUS_FILL (mid
    grey, the same for every image). Built-in layers only: the mask is a Normalization with
    mean 0 and variance 1 inside the lungs (the pixel passes unchanged) and, outside, a
    standard deviation of 1e6 and a mean of -fill * 1e6, which sends every pixel to the fill
    (within 3e-4 grey levels), in float32 whatever the dtype policy."""
    (top, bottom, left, right), box = focus_crop(*input_shape[:2], margin)
    x = layers.Cropping2D(((top, bottom), (left, right)), name="lung_crop")(x)
    x = layers.Resizing(size, size, interpolation="bilinear", name="lung_resize")(x)
    lungs = template_mask(size, margin, box)[..., None]
    scale = 1e6
    return layers.Normalization(
        axis=(1, 2, 3),
        mean=np.where(lungs, 0.0, -FOCUS_FILL * scale),
        variance=np.where(lungs, 1.0, scale**2),
        dtype="float32",
        name="lung_mask",
    )(x)


def _input(input_shape, input_size: int | None, focus: dict):
    """The model's input, with the lung focus (`focus`: the builder's lung_focus and
    lung_focus_margin) and resized inside the graph to `input_size` when that is set."""
    inputs = keras.Input(input_shape, name="image")
    x = inputs
    size = input_size or input_shape[0]
    if focus["lung_focus"] == "template":
        x = lung_focus_layers(x, input_shape, size, focus["lung_focus_margin"])
    elif size != input_shape[0]:
        x = layers.Resizing(size, size, interpolation="bilinear")(x)
    return inputs, x


def build_cnn(
    input_shape: tuple[int, int, int],
    n_classes: int,
    filters: list[int] = (32, 64, 128),
    dense_units: int = 128,
    dropout: float = 0.3,
    pooling: str = "max",
    input_size: int | None = None,
    lung_focus: str = "none",
    lung_focus_margin: float = -0.03,
) -> keras.Model:
    """A plain CNN: conv/max-pool blocks, no batch norm (the study's baseline).

    `pooling` reduces the last feature map: "max" (default) keeps the strongest local
    response, which is what a focal finding gives; "avg" dilutes a small lesion over the
    whole image (on the phantoms it stayed at chance where "max" reached 0.95);
    "flatten" keeps positions, at many more parameters.
    """
    inputs, x = _input(input_shape, input_size, _focus(locals()))
    x = layers.Rescaling(1 / 127.5, offset=-1.0)(x)
    for f in filters:
        x = layers.Conv2D(f, 3, padding="same", activation="relu", kernel_initializer="he_normal")(
            x
        )
        x = layers.MaxPooling2D()(x)
    x = _pool(x, pooling)
    return keras.Model(inputs, _head(x, n_classes, dense_units, dropout), name="cnn")


def _build_bn_cnn(name: str, blocks: int):
    def build(
        input_shape: tuple[int, int, int],
        n_classes: int,
        filters: list[int] | None = None,
        dense_units: int = 128,
        dropout: float = 0.3,
        pooling: str = "max",
        bn_momentum: float = 0.9,
        input_size: int | None = None,
        lung_focus: str = "none",
        lung_focus_margin: float = -0.03,
    ) -> keras.Model:
        filters = list(filters or [32 * 2 ** min(i // 2, 3) for i in range(blocks)])
        if len(filters) != blocks:
            raise ValueError(f"{name} has {blocks} conv blocks; got {len(filters)} filters.")
        inputs, x = _input(input_shape, input_size, _focus(locals()))
        x = layers.Rescaling(1 / 127.5, offset=-1.0)(x)
        for i, f in enumerate(filters):
            x = layers.Conv2D(f, 3, padding="same", use_bias=False, kernel_initializer="he_normal")(
                x
            )
            x = layers.BatchNormalization(momentum=bn_momentum)(x)
            x = layers.Activation("relu")(x)
            # Pool after every block of a 4-block net, every other block of a 6-block one,
            # so both end at the same resolution.
            if blocks <= 4 or i % 2 == 1:
                x = layers.MaxPooling2D()(x)
        x = _pool(x, pooling)
        return keras.Model(inputs, _head(x, n_classes, dense_units, dropout), name=name)

    build.__name__ = f"build_{name}"
    build.__doc__ = f"{blocks} conv blocks (conv, batch norm, ReLU), max pooling, dense head."
    build.blocks, build.halvings = blocks, blocks if blocks <= 4 else blocks // 2
    return build


build_cnn4_bn = _build_bn_cnn("cnn4_bn", 4)
build_cnn6_bn = _build_bn_cnn("cnn6_bn", 6)


def _with_batch_norm(base: keras.Model, bn_momentum: float) -> keras.Model:
    """A VGG base rebuilt for training from scratch: the same conv/pool layout, each conv
    He-normal without bias, followed by batch norm and ReLU.

    Plain VGG from scratch (Glorot kernels, no batch norm) stayed at chance on the phantoms;
    He-normal alone moved it slowly (0.25-0.43 after 8-15 epochs); with batch norm VGG16
    reached 0.87 validation accuracy in 12 epochs at 64 px. Never used with loaded weights."""
    inputs = keras.Input(base.input_shape[1:])
    x = inputs
    for layer in base.layers[1:]:
        config = layer.get_config()
        if isinstance(layer, layers.Conv2D):
            config.update(activation=None, use_bias=False, kernel_initializer="he_normal")
            x = layers.Conv2D.from_config(config)(x)
            x = layers.BatchNormalization(momentum=bn_momentum, name=f"{layer.name}_bn")(x)
            x = layers.Activation("relu", name=f"{layer.name}_relu")(x)
        else:
            x = layer.__class__.from_config(config)(x)
    return keras.Model(inputs, x, name=f"{base.name}_bn")


def _build_transfer(name: str, application, preprocess: str):
    def build(
        input_shape: tuple[int, int, int],
        n_classes: int,
        weights: str = "imagenet",
        fine_tune_layers: int = 0,
        dense_units: int = 256,
        dropout: float = 0.3,
        bn_momentum: float = 0.9,
        pooling: str = "avg",
        input_size: int | None = None,
        lung_focus: str = "none",
        lung_focus_margin: float = -0.03,
    ) -> keras.Model:
        inputs, x = _input(input_shape, input_size, _focus(locals()))
        size = input_size or input_shape[0]
        x = layers.Concatenate(name="grey_to_rgb")([x, x, x])
        from_scratch = weights in (None, "none")
        if preprocess == "caffe" and not from_scratch:
            x = layers.Normalization(mean=VGG_MEAN_BGR, variance=(1.0, 1.0, 1.0))(x)
        else:  # "tf", and any base trained from scratch: scale to [-1, 1]
            x = layers.Rescaling(1 / 127.5, offset=-1.0)(x)
        base = application(
            include_top=False,
            weights=None if from_scratch else weights,
            input_shape=(size, size, 3),
            pooling=None,
        )
        if from_scratch and preprocess == "caffe":
            base = _with_batch_norm(base, bn_momentum)
        elif from_scratch:
            for layer in base.layers:
                if isinstance(layer, layers.BatchNormalization):
                    layer.momentum = bn_momentum
        else:
            base.trainable = fine_tune_layers > 0
            if fine_tune_layers > 0:
                for layer in base.layers[:-fine_tune_layers]:
                    layer.trainable = False
                for layer in base.layers:  # keep ImageNet batch-norm statistics fixed
                    if isinstance(layer, layers.BatchNormalization):
                        layer.trainable = False
        x = base(x, training=False if not from_scratch else None)
        x = _pool(x, pooling)
        return keras.Model(inputs, _head(x, n_classes, dense_units, dropout), name=name)

    build.__name__ = f"build_{name}"
    build.__doc__ = f"{name} base (keras.applications) on repeated grey channels, dense head."
    build.min_input = TRANSFER_MIN_INPUT
    return build


build_vgg16 = _build_transfer("vgg16", keras.applications.VGG16, "caffe")
build_vgg19 = _build_transfer("vgg19", keras.applications.VGG19, "caffe")
build_resnet50v2 = _build_transfer("resnet50v2", keras.applications.ResNet50V2, "tf")

# Architecture key -> builder. Builder keyword arguments are the model's params in
# params.yaml (models.<key>), minus the training-only keys in TRAINING_KEYS.
MODELS: dict[str, Callable[..., keras.Model]] = {
    "vgg16": build_vgg16,
    "vgg19": build_vgg19,
    "resnet50v2": build_resnet50v2,
    "cnn": build_cnn,
    "cnn4_bn": build_cnn4_bn,
    "cnn6_bn": build_cnn6_bn,
}
# A model's own training settings (models.<name>.<key>), winning over train's for it only;
# `augment` may hold some of train.augment's keys (the others stay train's).
TRAINING_KEYS = ("learning_rate", "epochs", "batch_size", "schedule", "augment")


def _min_input(name: str, settings: dict) -> int:
    """The smallest input side `name`'s graph takes: one pixel left after its halvings."""
    import inspect

    builder = MODELS[name]
    if hasattr(builder, "min_input"):
        return builder.min_input
    default = inspect.signature(builder).parameters["filters"].default
    return 2 ** (getattr(builder, "halvings", None) or len(settings.get("filters") or default))


def check_settings(name: str, settings: dict, image_size: int | None = None) -> None:
    """Fail, naming the key and the fix, when params.yaml's models.<name> has a key its
    builder does not take (a typo would be a TypeError deep in the train stage), a
    `weights` that is neither imagenet, none nor a file, a `filters` list that does not fit
    the architecture, or (given the prepared `image_size`) an input too small for it. The
    values of each key: cxr.settings.MODEL_SETTINGS."""
    import difflib
    import inspect

    from cxr.params import ParamsError

    if name not in MODELS:
        raise ParamsError(f"params.yaml: unknown model {name!r}; known models: {sorted(MODELS)}.")
    allowed = set(inspect.signature(MODELS[name]).parameters) - {"input_shape", "n_classes"}
    allowed |= set(TRAINING_KEYS)
    for key in sorted(set(settings) - allowed):
        close = difflib.get_close_matches(key, sorted(allowed), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ParamsError(
            f"params.yaml: models.{name}.{key} is not a setting of {name}{hint}; "
            f"its settings are {sorted(allowed)}."
        )
    weights = settings.get("weights", "none")
    if weights not in ("imagenet", "none", None) and not Path(str(weights)).is_file():
        raise ParamsError(
            f"params.yaml: models.{name}.weights is {weights!r}; expected imagenet, none "
            "(from scratch) or the path of a weights file for the base (not found)."
        )
    blocks = getattr(MODELS[name], "blocks", None)
    if blocks and settings.get("filters") and len(settings["filters"]) != blocks:
        raise ParamsError(
            f"params.yaml: models.{name}.filters has {len(settings['filters'])} entries; "
            f"{name} has {blocks} conv blocks: give {blocks} filter counts."
        )
    size, smallest = settings.get("input_size") or image_size, _min_input(name, settings)
    if size is not None and size < smallest:
        where = f"models.{name}.input_size" if settings.get("input_size") else "prepare.image_size"
        raise ParamsError(
            f"params.yaml: {where} is {size}; {name} needs inputs of at least "
            f"{smallest} px: set models.{name}.input_size to that or more."
        )


def build_model(
    name: str, input_shape: tuple[int, int, int], n_classes: int, **params
) -> keras.Model:
    """Build `name` (a key of MODELS; params.yaml's values are checked before: cxr.params,
    check_settings)."""
    kwargs = {k: v for k, v in params.items() if k not in TRAINING_KEYS}
    return MODELS[name](input_shape, n_classes, **kwargs)
