import numpy as np

from cxr.baselines import BASELINES, SIZE, fit_predict, pixel_features


def test_pixel_features_resize_and_scale():
    images = np.full((3, 100, 80, 1), 255, np.uint8)
    images[1] = 0
    features = pixel_features(images)
    assert features.shape == (3, SIZE * SIZE) and features.dtype == np.float32
    assert features[0].min() == 1.0 and features[1].max() == 0.0


def test_baselines_learn_a_pixel_pattern_from_the_training_split_only():
    rng = np.random.default_rng(0)

    # Class k: a bright band at rows 20k..20k+10, on noise.
    def images(n):
        x = rng.integers(0, 60, (n, 64, 64, 1), dtype=np.uint8)
        y = np.arange(n) % 3
        for i, k in enumerate(y):
            x[i, 20 * k : 20 * k + 10] = 200
        return x, y

    x_train, y_train = images(90)
    x_test, y_test = images(30)
    for name in BASELINES:
        pred, again = fit_predict(name, x_train, y_train, [x_test, x_test])
        assert np.array_equal(pred, again)
        assert pred.shape == (30,) and (pred == y_test).mean() == 1.0, name
        # Trained on shuffled labels, the same features predict the test labels at chance.
        (wrong,) = fit_predict(name, x_train, rng.permutation(y_train), [x_test])
        assert (wrong == y_test).mean() < 0.7, name
