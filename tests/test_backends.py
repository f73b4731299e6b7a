"""The same model, augmentation and Grad-CAM on both Keras backends (TensorFlow, JAX): what
one backend saves, the other loads and predicts within a stated tolerance."""

import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

from cxr.augment import RandomRadiograph
from cxr.lung_audit import grad_cam
from cxr.models import build_model
from tests.conftest import ROOT
from tests.test_augment import EVERYTHING, injected

BACKEND = keras.backend.backend()
OTHER = {"tensorflow": "jax", "jax": "tensorflow"}[BACKEND]
# float32 on two compilers (oneDNN kernels, XLA) summing in different orders
PROBS_ATOL, CAM_ATOL, PIXEL_ATOL = 1e-4, 1e-3, 1e-3


def test_grad_cam_of_a_model_with_a_known_answer():
    """Conv 1x1 of weight 1 then average pooling and a dense layer that favours class 0 as
    the pixels grow: the gradient is the same positive number everywhere, so the heatmap of
    class 0 is the feature map itself, that is the image scaled to a maximum of 1."""
    inputs = keras.Input((16, 16, 1))
    maps = keras.layers.Conv2D(1, 1, use_bias=False, kernel_initializer="ones")(inputs)
    pooled = keras.layers.GlobalAveragePooling2D()(maps)
    dense = keras.layers.Dense(2, activation="softmax", kernel_initializer="zeros")
    model = keras.Model(inputs, dense(pooled))
    dense.kernel.assign(np.array([[1.0, -1.0]], "float32"))
    image = np.zeros((2, 16, 16, 1), "float32")
    image[0, 2:6, 10:14] = 3.0
    image[1, 8:16, 0:4] = 1.5
    image[1, 0, 0] = 0.75
    cam, probs = grad_cam(model, image)
    assert cam.shape == (2, 16, 16) and np.all(probs[:, 0] > 0.5)
    want = image[..., 0] / image.max(axis=(1, 2, 3))[:, None, None]
    np.testing.assert_allclose(cam, want, atol=1e-4)  # the 1e-7 that guards the division
    np.testing.assert_allclose(probs, model.predict(image, verbose=0), atol=1e-6)


@pytest.mark.skipif(BACKEND != "tensorflow", reason="the reference is TensorFlow's tape")
def test_grad_cam_equals_the_gradient_tape_original():
    """The heatmaps of the TensorFlow-only version (commit d5b136b) on a nested base."""
    import tensorflow as tf

    model = build_model("resnet50v2", (32, 32, 1), 3, weights="none", dense_units=8)
    x = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 1)).astype("float32")
    target = [layer for layer in model.layers if len(layer.output.shape) == 4][-1]
    features = target._inbound_nodes[-1].output_tensors[0]
    grad_model = keras.Model(model.inputs, [features, model.output])
    with tf.GradientTape() as tape:
        maps, probs = grad_model(tf.convert_to_tensor(x), training=False)
        chosen = tf.argmax(probs, axis=1)
        score = tf.math.log(tf.gather(probs, chosen, batch_dims=1) + 1e-7)
    grads = tape.gradient(score, maps)
    cam = tf.nn.relu(tf.reduce_sum(tf.reduce_mean(grads, axis=(1, 2), keepdims=True) * maps, -1))
    cam = cam / (tf.reduce_max(cam, axis=(1, 2), keepdims=True) + 1e-7)
    want = tf.image.resize(cam[..., None], (32, 32), method="bilinear")[..., 0].numpy()
    got, got_probs = grad_cam(model, x)
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(got_probs, probs.numpy(), atol=1e-6)


OTHER_SIDE = textwrap.dedent("""
    import sys
    import keras, numpy as np
    from cxr.augment import RandomRadiograph
    from cxr.lung_audit import grad_cam
    from tests.test_augment import EVERYTHING
    data, out = np.load(sys.argv[1]), {}
    for name in ("cnn4_bn", "resnet50v2"):
        model = keras.saving.load_model(sys.argv[2] + f"/{name}.keras")
        out[f"{name}_probs"] = model.predict(data["x"], verbose=0)
        out[f"{name}_cam"] = grad_cam(model, data["x"])[0]
    layer = RandomRadiograph(**EVERYTHING, seed=0)
    x = keras.ops.convert_to_tensor(data["x"])
    out["augmented"] = keras.ops.convert_to_numpy(
        layer.transform(x, data["draws"], data["factor"]))
    np.savez(sys.argv[3], backend=keras.backend.backend(), **out)
""")


def test_a_model_saved_on_one_backend_predicts_the_same_on_the_other(tmp_path):
    keras.utils.set_random_seed(0)
    x = np.random.default_rng(1).integers(0, 256, (4, 32, 32, 1)).astype("float32")
    here = {}
    for name, kwargs in (("cnn4_bn", {"filters": [4, 4, 4, 4]}),
                         ("resnet50v2", {"weights": "none", "dense_units": 8})):  # fmt: skip
        model = build_model(name, (32, 32, 1), 4, **kwargs)
        if name == "cnn4_bn":  # batch norm statistics away from their start
            model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
            model.train_on_batch(x, np.arange(4))
        model.save(tmp_path / f"{name}.keras")
        here[f"{name}_probs"] = model.predict(x, verbose=0)
        here[f"{name}_cam"] = grad_cam(model, x)[0]
    draws, factor = injected(3, len(x), EVERYTHING["contrast"])
    layer = RandomRadiograph(**EVERYTHING, seed=0)
    here["augmented"] = keras.ops.convert_to_numpy(
        layer.transform(keras.ops.convert_to_tensor(x), draws, factor)
    )
    np.savez(tmp_path / "inputs.npz", x=x, draws=draws, factor=factor)
    out = subprocess.run(
        [sys.executable, "-c", OTHER_SIDE, str(tmp_path / "inputs.npz"), str(tmp_path),
         str(tmp_path / "other.npz")],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
        env={**os.environ, "KERAS_BACKEND": OTHER},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    there = np.load(tmp_path / "other.npz")
    assert str(there["backend"]) == OTHER
    for name in ("cnn4_bn", "resnet50v2"):
        np.testing.assert_allclose(there[f"{name}_probs"], here[f"{name}_probs"], atol=PROBS_ATOL)
        np.testing.assert_allclose(there[f"{name}_cam"], here[f"{name}_cam"], atol=CAM_ATOL)
    np.testing.assert_allclose(there["augmented"], here["augmented"], atol=PIXEL_ATOL)
