import keras
import numpy as np
import pytest

from cxr.models import MODELS, build_model


@pytest.mark.parametrize("name", sorted(MODELS))
def test_builder_trains_on_raw_grey_and_reloads_in_safe_mode(name, tmp_path):
    model = build_model(name, (32, 32, 1), 4)
    assert model.output.dtype == "float32" and model.output.shape == (None, 4)
    x = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 1), dtype=np.uint8)
    y = np.arange(8) % 4
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    loss = model.train_on_batch(x, y)
    assert np.isfinite(loss)
    path = tmp_path / "m.keras"
    model.save(path)
    again = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_allclose(model.predict(x, verbose=0), again.predict(x, verbose=0), atol=1e-6)


def test_unknown_model_and_pooling_are_named():
    with pytest.raises(ValueError, match="Unknown model 'vgg99'"):
        build_model("vgg99", (32, 32, 1), 4)
    with pytest.raises(ValueError, match="pooling"):
        build_model("cnn", (32, 32, 1), 4, pooling="median")
