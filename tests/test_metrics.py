import numpy as np
import pytest
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, roc_auc_score

from cxr.metrics import calibration, confusion, intervals, mcnemar, scores, wilson

CLASSES = ["covid", "lung_opacity", "normal", "pneumonia"]


def fixed_predictions(n: int, skill: float = 0.7, seed: int = 1):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n)
    logits = rng.normal(size=(n, 4))
    logits[np.arange(n), y] += 3 * skill
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return y, probs


def test_scores_match_scikit_learn():
    y, probs = fixed_predictions(300)
    pred = probs.argmax(axis=1)
    s = scores(y, probs, CLASSES)
    assert s["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert s["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert s["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert s["roc_auc_macro"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr"))
    for i, c in enumerate(CLASSES):
        assert s["per_class"][c]["f1"] == pytest.approx(f1_score(y == i, pred == i))
    assert np.array(s["confusion"]).sum() == 300 and np.trace(s["confusion"]) == (pred == y).sum()


def test_a_class_missing_from_the_test_labels_is_handled():
    y, probs = fixed_predictions(200)
    keep = y != 3
    s = scores(y[keep], probs[keep], CLASSES)
    assert s["per_class"]["pneumonia"]["support"] == 0
    assert "roc_auc" not in s["per_class"]["pneumonia"]
    pred = probs[keep].argmax(axis=1)
    assert s["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y[keep], pred))


def test_intervals_contain_the_estimate_and_shrink_with_n():
    widths = []
    for n in (100, 1600):
        y, probs = fixed_predictions(n)
        pred = probs.argmax(axis=1)
        ci = intervals(y, pred, 4, resamples=500, seed=0)
        s = scores(y, probs, CLASSES)
        for key in ("accuracy", "macro_f1"):
            low, high = ci[key]
            assert low < s[key] < high
        widths.append(ci["accuracy"][1] - ci["accuracy"][0])
    assert widths[1] < widths[0] / 2.5  # ~ 1/sqrt(n): 4x narrower for 16x the images
    y, probs = fixed_predictions(100)
    pred = probs.argmax(axis=1)
    assert intervals(y, pred, 4, seed=3) == intervals(y, pred, 4, seed=3)


def test_bootstrap_macro_f1_agrees_with_scikit_learn_per_resample():
    y, probs = fixed_predictions(80)
    pred = probs.argmax(axis=1)
    ci = intervals(y, pred, 4, resamples=1, level=0.0, seed=5)
    draw = np.random.default_rng(5).integers(0, 80, size=(1, 80))[0]
    expected = f1_score(y[draw], pred[draw], average="macro", labels=range(4), zero_division=0)
    assert ci["macro_f1"][0] == pytest.approx(expected)


def test_accuracy_intervals_are_wilsons_and_do_not_collapse_at_the_boundary():
    # Wilson's interval by its formula, for 120/120 and 96/120 at 95 %
    z = 1.959963984540054
    for k, n in ((120, 120), (96, 120)):
        p = k / n
        centre = (p + z**2 / (2 * n)) / (1 + z**2 / n)
        half = z / (1 + z**2 / n) * np.sqrt(p * (1 - p) / n + z**2 / (4 * n**2))
        assert wilson(k, n) == pytest.approx((centre - half, centre + half))
    low, high = wilson(120, 120)
    assert 0.96 < low < 0.97 and high == pytest.approx(1.0)  # not [1.000, 1.000]
    y = np.arange(120) % 4
    assert intervals(y, y, 4)["accuracy"] == wilson(120, 120)


def test_calibration_of_a_perfectly_calibrated_and_an_overconfident_model():
    y = np.array([0, 0, 0, 1] * 25)
    honest = np.tile([0.75, 0.25 / 3, 0.25 / 3, 0.25 / 3], (100, 1))
    assert calibration(honest, y)["ece"] == pytest.approx(0.0, abs=1e-9)
    sure = np.tile([0.99, 0.01 / 3, 0.01 / 3, 0.01 / 3], (100, 1))
    cal = calibration(sure, y)
    assert cal["ece"] == pytest.approx(0.24)
    assert cal["bins"] == [
        {"bin": 9, "confidence": pytest.approx(0.99), "accuracy": 0.75, "count": 100}
    ]


def test_confusion_and_mcnemar():
    y = np.array([0, 1, 2, 3, 0, 1])
    a = np.array([0, 1, 2, 3, 0, 0])
    b = np.array([0, 0, 0, 3, 0, 1])
    assert confusion(y, a, 4)[1].tolist() == [1, 1, 0, 0]
    result = mcnemar(y, a, b)
    assert (result["a_only_correct"], result["b_only_correct"]) == (2, 1)
    assert result["p_value"] == pytest.approx(1.0)
    assert mcnemar(y, a, a)["p_value"] == 1.0


def test_per_source_accuracy_and_classes():
    from cxr.metrics import per_source

    y = np.array([0, 0, 1, 1, 2])
    pred = np.array([0, 1, 1, 1, 0])
    table = per_source(y, pred, ["a", "a", "b", "b", ""], CLASSES)
    assert list(table) == ["a", "b", "unknown"]
    assert table["a"] == {"n": 2, "accuracy": 0.5, "classes": {"covid": 2}}
    assert table["b"]["accuracy"] == 1.0 and table["unknown"]["n"] == 1
    assert per_source(y, pred, [""] * 5, CLASSES) == {}
