"""The lung audit against a planted shortcut: phantoms whose class is also told by a marker
outside the lungs. A model trained on them as they are reads the marker, and the audit says
so (accuracy with the lungs hidden far above chance); the same model with the lung focus
in its graph cannot see the marker, and with the lungs hidden it falls to chance."""

import numpy as np
import pytest

from cxr.classes import LABELS
from cxr.fit import fit
from cxr.lung_audit import grad_cam, lung_audit
from cxr.lungs import focus_crop
from cxr.metrics import lung_verdict
from cxr.synthetic import _phantom

SIZE = 64
MARGIN = 0.04  # the phantoms' lungs fill the template: its edges stay in view
CFG = {
    "seed": 0,
    "batch_size": 16,
    "epochs": 15,
    "early_stopping_patience": 6,
    "learning_rate": 2e-3,
    "schedule": "constant",
    "imbalance": "none",
    "augment": dict.fromkeys(("rotation", "shift", "zoom", "brightness", "contrast"), 0.0)
    | {"flip": False},
}
ACCEL = {
    "policy": "float32",
    "jit_compile": False,
    "deterministic": True,
    "steps_per_execution": 1,
    "distribution": None,
    "replicas": 1,
}
AUDIT = {"batch_size": 64, "bootstrap": 200, "ci_level": 0.95, "seed": 0}


def marked_phantoms(per_class: int, first: int):
    """(images (n, SIZE, SIZE, 1) uint8, labels, exact lung masks) with the marker shortcut."""
    images, labels, masks = [], [], []
    for k, label in enumerate(LABELS):
        for i in range(first, first + per_class):
            img, mask = _phantom(label, i, SIZE, 0, "marker")
            images.append(img)
            masks.append(mask)
            labels.append(k)
    return np.stack(images)[..., None], np.array(labels, np.int32), np.stack(masks)


@pytest.fixture(scope="module")
def splits():
    return marked_phantoms(100, 0), marked_phantoms(20, 1000), marked_phantoms(25, 2000)


@pytest.mark.parametrize("focus", ["none", "template"])
def test_the_audit_catches_a_planted_shortcut_and_the_lung_focus_removes_it(splits, focus):
    (xt, yt, _), (xv, yv, _), (x, y, masks) = splits
    builder = {"filters": [16, 32, 64, 64], "dense_units": 32, "dropout": 0.1, "bn_momentum": 0.9}
    builder |= {"lung_focus": focus, "lung_focus_margin": MARGIN}
    model = fit("cnn4_bn", CFG, builder, (xt, yt), (xv, yv), 4, ACCEL, progress=False).model
    intact = float(np.mean(model.predict(x, verbose=0).argmax(1) == y))
    audit, _, cams = lung_audit(model, x, y, masks, list(LABELS), AUDIT)
    verdict = lung_verdict({"accuracy": intact, **audit}, 4)
    if focus == "none":  # the marker: the class is read outside the lungs
        assert intact > 0.9 and audit["lungs_hidden_accuracy"] > 0.8, audit
        assert verdict.startswith("reads mostly outside the lungs"), verdict
    else:  # the marker never reaches the network: it learns the findings in the lungs
        assert intact > 0.8 and audit["lungs_hidden_accuracy"] < 0.4, (intact, audit)
        assert audit["lungs_only_accuracy"] > 0.6, audit
        assert not verdict.startswith("reads mostly outside"), verdict
        # Grad-CAM maps go back into the crop's place: no heat where the network saw nothing.
        (top, bottom, left, right), _ = focus_crop(SIZE, SIZE, MARGIN)
        np.testing.assert_allclose(cams[:4], grad_cam(model, x[:4])[0], atol=1e-5)
        assert cams.shape == (len(x), SIZE, SIZE) and cams[:, top:-bottom, left:-right].max() > 0
        assert cams[:, :top].max() == cams[:, -bottom:].max() == cams[:, :, :left].max() == 0
    assert 0 <= audit["gradcam_lung_share"] <= 1
    assert audit["lung_area_share"] == pytest.approx(masks.mean())
