import keras
import numpy as np
import pytest

from cxr.models import MODELS, build_model

# Small, fast settings for every architecture; transfer bases from scratch (no weight hub).
SETTINGS = {
    "vgg16": {"weights": "none", "dense_units": 16},
    "vgg19": {"weights": "none", "dense_units": 16},
    "resnet50v2": {"weights": "none", "dense_units": 16},
    "cnn": {"filters": [8, 16]},
    "cnn4_bn": {"filters": [8, 8, 16, 16]},
    "cnn6_bn": {"filters": [8, 8, 16, 16, 16, 16]},
}


def grey_batch(n=4, size=32):
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, size, size, 1), dtype=np.uint8), np.arange(n) % 4


def test_the_pipeline_trains_every_architecture_and_each_is_tested_here():
    from cxr.params import load_params
    from tests.conftest import ROOT

    assert set(SETTINGS) == set(MODELS) == set(load_params(ROOT / "params.yaml")["train"]["models"])


# On JAX (CI's second pass) the transfer models add nothing to the small CNNs' layers but XLA
# compiles on 2 cores (VGG16/19 30 s, ResNet50V2 43 s); the TensorFlow pass builds, trains
# and reloads all six, and their from-scratch set-up is checked below on both backends.
BUILT = (
    sorted(MODELS)
    if keras.backend.backend() == "tensorflow"
    else sorted(set(MODELS) - {"vgg16", "vgg19", "resnet50v2"})
)


@pytest.mark.parametrize("name", BUILT)
def test_builder_trains_on_raw_grey_and_reloads_in_safe_mode(name, tmp_path):
    model = build_model(name, (32, 32, 1), 4, **SETTINGS[name])
    assert model.output.dtype == "float32" and model.output.shape == (None, 4)
    assert not any(isinstance(layer, keras.layers.Lambda) for layer in model.layers)
    x, y = grey_batch()
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    before = [w.copy() for w in model.get_weights()]
    loss = model.train_on_batch(x, y)
    assert np.isfinite(loss)
    assert any(not np.array_equal(a, b) for a, b in zip(before, model.get_weights(), strict=True))
    probs = model.predict(x, verbose=0)
    np.testing.assert_allclose(probs.sum(axis=1), 1, atol=1e-5)
    path = tmp_path / "m.keras"
    model.save(path)
    again = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_allclose(probs, again.predict(x, verbose=0), atol=1e-5)


def test_input_is_resized_inside_the_model():
    """A 64 px model with input_size 32 predicts what the same weights give on the image
    resized to 32 px first (bilinear), and so sees 32 px only."""
    model = build_model("cnn", (64, 64, 1), 4, filters=[8], pooling="flatten", input_size=32)
    small = build_model("cnn", (32, 32, 1), 4, filters=[8], pooling="flatten")
    assert model.input_shape == (None, 64, 64, 1)
    small.set_weights(model.get_weights())  # same shapes: flatten sees 32 px maps in both
    x, _ = grey_batch(size=64)
    resized = keras.ops.convert_to_numpy(
        keras.ops.image.resize(x.astype("float32"), (32, 32), interpolation="bilinear")
    )
    np.testing.assert_allclose(
        model.predict(x, verbose=0), small.predict(resized, verbose=0), atol=1e-5
    )


@pytest.mark.parametrize("input_size, margin", [(None, 0.04), (32, 0.04), (None, -0.03)])
def test_the_lung_focus_shows_only_the_templates_lungs(input_size, margin, tmp_path):
    from cxr.lungs import FOCUS_FILL, focus_array, focus_crop, template_mask

    model = build_model(
        "cnn",
        (64, 64, 1),
        4,
        filters=[8],
        input_size=input_size,
        lung_focus="template",
        lung_focus_margin=margin,
    )
    focus = keras.Model(model.input, model.get_layer("lung_mask").output)
    x = grey_batch(3, 64)[0]
    seen = keras.ops.convert_to_numpy(focus(x.astype("float32")))[..., 0]
    size = input_size or 64
    lungs = template_mask(size, margin, focus_crop(64, 64, margin)[1])
    assert seen.shape == (3, size, size)
    np.testing.assert_allclose(seen[:, ~lungs], FOCUS_FILL, atol=1e-3)
    assert seen[:, lungs].std() > 30  # the lungs' own pixels pass (cropped, resized)
    if input_size is None:  # the baselines' copy of the focus sees the same lungs
        smooth = np.stack([np.full((64, 64), 40), np.tile(np.arange(64) * 3, (64, 1))])
        smooth = smooth[..., None].astype(np.uint8)
        ours = keras.ops.convert_to_numpy(focus(smooth.astype("float32")))[..., 0]
        np.testing.assert_allclose(focus_array(smooth, margin)[..., 0], ours, atol=2.5)
    # Whatever lies outside the template's box (a marker in a corner) changes nothing.
    marked = x.copy()
    marked[:, :6, :6] = 255
    np.testing.assert_allclose(
        model.predict(marked, verbose=0), model.predict(x, verbose=0), atol=1e-6
    )
    model.save(tmp_path / "m.keras")  # built-in layers only: loads in safe mode
    again = keras.saving.load_model(tmp_path / "m.keras", safe_mode=True)
    np.testing.assert_allclose(again.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-5)


@pytest.mark.parametrize("name", ["vgg16", "resnet50v2"])
def test_weights_file_loads_frozen_with_the_head_trainable(name, tmp_path):
    import keras.applications as apps

    application = {"vgg16": apps.VGG16, "resnet50v2": apps.ResNet50V2}[name]
    base = application(include_top=False, weights=None, input_shape=(32, 32, 3))
    path = tmp_path / "base.weights.h5"
    base.save_weights(path)
    model = build_model(name, (32, 32, 1), 4, weights=str(path), dense_units=8)
    inner = next(layer for layer in model.layers if isinstance(layer, keras.Model))
    assert not inner.trainable
    for a, b in zip(inner.get_weights(), base.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert len(inner.layers) == len(base.layers)  # loaded weights keep the original graph
    trainable = {w.path.split("/")[0] for w in model.trainable_weights}
    assert trainable and inner.name not in trainable


def test_fine_tuning_unfreezes_only_the_top_layers(tmp_path):
    import keras.applications as apps

    base = apps.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3))
    path = tmp_path / "vgg.weights.h5"
    base.save_weights(path)
    model = build_model("vgg16", (32, 32, 1), 4, weights=str(path), fine_tune_layers=4)
    inner = next(layer for layer in model.layers if isinstance(layer, keras.Model))
    flags = [layer.trainable for layer in inner.layers]
    assert flags[-4:] == [True] * 4 and not any(flags[:-4])


def test_from_scratch_vgg_gets_batch_norm_and_he_init_and_bn_momentum_is_set():
    vgg = build_model("vgg16", (32, 32, 1), 4, weights="none", bn_momentum=0.8)
    inner = next(layer for layer in vgg.layers if isinstance(layer, keras.Model))
    kinds = [type(layer).__name__ for layer in inner.layers[1:4]]
    assert kinds == ["Conv2D", "BatchNormalization", "Activation"]
    convs = [layer for layer in inner.layers if isinstance(layer, keras.layers.Conv2D)]
    assert len(convs) == 13 and not any(conv.use_bias for conv in convs)
    conv = convs[-1]
    fan_in = np.prod(conv.kernel.shape[:-1])
    assert abs(np.std(conv.kernel.numpy()) - np.sqrt(2 / fan_in)) < 0.3 * np.sqrt(2 / fan_in)
    resnet = build_model("resnet50v2", (32, 32, 1), 4, weights="none", bn_momentum=0.8)
    for model in (vgg, resnet):
        inner = next(layer for layer in model.layers if isinstance(layer, keras.Model))
        momenta = {
            layer.momentum
            for layer in inner.layers
            if isinstance(layer, keras.layers.BatchNormalization)
        }
        assert momenta == {0.8}


def test_model_settings_are_checked_against_the_builders_signature(tmp_path):
    from cxr.models import check_settings
    from cxr.params import ParamsError, load_params
    from tests.conftest import ROOT

    params = load_params(ROOT / "params.yaml")
    for name in params["train"]["models"]:
        check_settings(name, params["models"][name])  # the shipped settings pass
    with pytest.raises(ParamsError, match=r"unknown model 'vgg99'; known models: \['cnn'"):
        check_settings("vgg99", {})
    with pytest.raises(ParamsError, match=r"models.cnn.dropuot is not a setting of cnn \(did you"):
        check_settings("cnn", {"dropuot": 0.5})
    with pytest.raises(ParamsError, match="models.vgg16.weights is 'imagenet21k'; expected"):
        check_settings("vgg16", {"weights": "imagenet21k"})
    weights = tmp_path / "base.weights.h5"
    weights.write_bytes(b"")
    check_settings("vgg16", {"weights": str(weights), "epochs": 3})  # a file, a training key


def test_check_settings_accepts_exactly_what_the_builders_build():
    """params.py's pooling names and models.check_settings' smallest input are the builders'
    own: each name builds, the smallest input builds and predicts, one pixel less is refused."""
    from cxr.models import _min_input, check_settings
    from cxr.params import POOLINGS, ParamsError

    for pooling in POOLINGS:
        build_model("cnn", (32, 32, 1), 4, pooling=pooling)
    for name in ("cnn", "cnn4_bn", "cnn6_bn"):
        size = _min_input(name, {})
        check_settings(name, {}, size)
        model = build_model(name, (size, size, 1), 4)
        assert model.predict(np.zeros((1, size, size, 1), np.uint8), verbose=0).shape == (1, 4)
        with pytest.raises(ParamsError, match=f"needs inputs of at least {size} px"):
            check_settings(name, {}, size - 1)
    with pytest.raises(ParamsError, match="vgg16 needs inputs of at least 32 px"):
        check_settings("vgg16", {"input_size": 31}, 64)
