from concurrent.futures import ProcessPoolExecutor

import numpy as np
from PIL import Image

from cxr.classes import DATASET_DIR, LABEL_TO_FOLDER, LABELS
from cxr.synthetic import phantom


def test_phantoms_are_deterministic_and_distinct():
    a = phantom("covid", 3, size=96, seed=1)
    assert a.dtype == np.uint8 and a.shape == (96, 96)
    assert np.array_equal(a, phantom("covid", 3, size=96, seed=1))
    assert not np.array_equal(a, phantom("covid", 4, size=96, seed=1))
    assert not np.array_equal(a, phantom("covid", 3, size=96, seed=2))


def test_kaggle_layout(synthetic_raw):
    for label in LABELS:
        folder = synthetic_raw / DATASET_DIR / LABEL_TO_FOLDER[label] / "images"
        files = sorted(folder.glob("*.png"))
        assert len(files) == 12
        assert files[0].name.startswith(LABEL_TO_FOLDER[label] + "-")


def test_global_brightness_says_nothing_about_the_class():
    means = {label: np.mean([phantom(label, i, 128).mean() for i in range(20)]) for label in LABELS}
    assert max(means.values()) - min(means.values()) < 2.0, means


def test_a_linear_model_on_raw_pixels_stays_below_085():
    """The issue's bar: logistic regression on raw 64 px pixels scores at most 0.85."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score

    jobs = [(label, i) for label in LABELS for i in range(100)]
    with ProcessPoolExecutor(2) as pool:  # phantoms at 299 px: 18 s in one process
        x = np.stack(list(pool.map(_pixels_64, jobs, chunksize=20)))
    y = [LABELS.index(label) for label, _ in jobs]
    model = LogisticRegression(C=0.1, max_iter=3000)
    score = cross_val_score(model, x, y, cv=5, n_jobs=2)
    assert 0.3 < score.mean() <= 0.85, score


def _pixels_64(job):
    """A phantom as prepared at 299 px, resized to 64 px, its pixels in [0, 1]."""
    img = Image.fromarray(phantom(*job, 299)).resize((64, 64), Image.BILINEAR)
    return np.asarray(img, np.float32).ravel() / 255
