"""Test-set statistics from labels and predicted probabilities: plain numpy and scikit-learn,
no TensorFlow, so evaluate, compare and register share them and tests check them fast.

Every function takes integer labels `y` (n,) in range(k) and either predicted labels (n,) or
probabilities (n, k).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from cxr.params import METRICS

# The headline test metrics (test.json's keys, compare's columns and compare.metric's
# choices), with how reports name them; INTERVALS of them get intervals (`intervals`).
HEADLINE: dict[str, str] = dict(
    zip(
        METRICS,
        ("accuracy", "balanced accuracy", "macro-F1", "ROC-AUC (one-vs-rest, macro)"),
        strict=True,
    )
)
INTERVALS = ("accuracy", "macro_f1")


def confusion(y: np.ndarray, pred: np.ndarray, k: int) -> np.ndarray:
    """(k, k) counts, rows = actual, columns = predicted."""
    return np.bincount(y * k + pred, minlength=k * k).reshape(k, k)


def _f1_from_confusions(conf: np.ndarray) -> np.ndarray:
    """Per-class F1 of one (k, k) or many (b, k, k) confusion matrices (0 where undefined,
    as scikit-learn's zero_division=0)."""
    tp = np.diagonal(conf, axis1=-2, axis2=-1).astype(np.float64)
    denominator = conf.sum(axis=-1) + conf.sum(axis=-2)  # 2 tp + fn + fp
    return np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)


def macro_f1(y: np.ndarray, pred: np.ndarray, k: int) -> float:
    """Mean per-class F1 of predicted labels."""
    return float(_f1_from_confusions(confusion(y, pred, k)).mean())


def scores(y: np.ndarray, probs: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """Accuracy, balanced accuracy, macro-F1, one-vs-rest ROC-AUC and per-class figures."""
    from sklearn.metrics import precision_recall_fscore_support, roc_auc_score

    k = len(classes)
    pred = probs.argmax(axis=1)
    conf = confusion(y, pred, k)
    precision, recall, f1, support = precision_recall_fscore_support(
        y, pred, labels=list(range(k)), zero_division=0
    )
    auc = {}
    for i, c in enumerate(classes):
        positives = y == i
        if 0 < positives.sum() < len(y):  # AUC needs both kinds of example
            auc[c] = float(roc_auc_score(positives, probs[:, i]))
    present = support > 0
    return {
        "n": int(len(y)),
        "accuracy": float(np.mean(pred == y)),
        "balanced_accuracy": float(recall[present].mean()),
        "macro_f1": float(f1.mean()),
        "roc_auc_macro": float(np.mean(list(auc.values()))) if auc else float("nan"),
        "per_class": {
            c: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
                **({"roc_auc": auc[c]} if c in auc else {}),
            }
            for i, c in enumerate(classes)
        },
        "confusion": conf.tolist(),
    }


def wilson(successes: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion: stays inside [0, 1] and does not collapse to a
    point at 0 or n successes (120/120 gives [0.969, 1.000], not [1.000, 1.000])."""
    from scipy.stats import binomtest

    ci = binomtest(int(successes), int(n)).proportion_ci(confidence_level=level, method="wilson")
    return float(ci.low), float(ci.high)


def intervals(
    y: np.ndarray,
    pred: np.ndarray,
    k: int,
    resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, tuple[float, float]]:
    """Intervals of the INTERVALS metrics: accuracy, a proportion, by Wilson's score
    interval; macro-F1 by the percentile bootstrap (test images resampled with replacement,
    `resamples` times, seeded: the same inputs give the same interval)."""
    rng = np.random.default_rng(seed)
    n = len(y)
    draws = rng.integers(0, n, size=(resamples, n))
    codes = y[draws] * k + pred[draws] + np.arange(resamples)[:, None] * k * k
    confs = np.bincount(codes.ravel(), minlength=resamples * k * k).reshape(resamples, k, k)
    macro_f1 = _f1_from_confusions(confs).mean(axis=1)
    tails = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]
    return {
        "accuracy": wilson(int(np.sum(y == pred)), n, level),
        "macro_f1": tuple(float(v) for v in np.percentile(macro_f1, tails)),
    }


# How the reports describe INTERVALS' brackets.
INTERVALS_NOTE = "accuracy: Wilson score interval; macro-F1: percentile bootstrap"


def calibration(probs: np.ndarray, y: np.ndarray, bins: int = 10) -> dict[str, Any]:
    """Expected calibration error over equal-width confidence bins, and the bins themselves
    (mean confidence, accuracy, count) for a reliability diagram."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    table = []
    ece = 0.0
    for b in range(bins):
        members = which == b
        count = int(members.sum())
        if count:
            conf_b, acc_b = float(confidence[members].mean()), float(correct[members].mean())
            ece += abs(acc_b - conf_b) * count / len(y)
            table.append({"bin": b, "confidence": conf_b, "accuracy": acc_b, "count": count})
    return {"ece": float(ece), "bins": table}


def mcnemar(y: np.ndarray, pred_a: np.ndarray, pred_b: np.ndarray) -> dict[str, Any]:
    """Exact McNemar test of two classifiers on the same images: of the images exactly one of
    them gets right, is the split further from 50/50 than chance would make it?"""
    from scipy.stats import binomtest

    a_only = int(np.sum((pred_a == y) & (pred_b != y)))
    b_only = int(np.sum((pred_a != y) & (pred_b == y)))
    p = binomtest(a_only, a_only + b_only, 0.5).pvalue if a_only + b_only else 1.0
    return {"a_only_correct": a_only, "b_only_correct": b_only, "p_value": float(p)}


def per_source(
    y: np.ndarray, pred: np.ndarray, sources: list[str], classes: list[str]
) -> dict[str, Any]:
    """Accuracy and class counts per image source, largest source first ({} when no source
    is known). A source that holds one class only, scored near 1.0, is a shortcut risk: the
    model may recognise the source rather than the finding."""
    if not any(sources):
        return {}
    table = {}
    for source in sorted(set(sources), key=lambda s: (-sources.count(s), s)):
        members = np.array([s == source for s in sources])
        counts = np.bincount(y[members], minlength=len(classes))
        table[source or "unknown"] = {
            "n": int(members.sum()),
            "accuracy": float(np.mean(pred[members] == y[members])),
            "classes": {c: int(n) for c, n in zip(classes, counts, strict=True) if n},
        }
    return table


def outside_share(intact_accuracy: float, hidden_accuracy: float, k: int) -> float:
    """The share of a model's accuracy above chance (1/k) that it keeps with the lungs
    hidden: about 0 for a model that reads the lungs, about 1 for one that reads only what
    lies outside them (clipped to [0, 1]; nan when the model is not above chance at all)."""
    above = intact_accuracy - 1 / k
    if above <= 0:
        return float("nan")
    return float(np.clip((hidden_accuracy - 1 / k) / above, 0.0, 1.0))


def lung_verdict(row: dict[str, Any], k: int) -> str:
    """One plain sentence on where a model's accuracy comes from, from its test.json figures
    (`accuracy`, `lungs_hidden_accuracy`, `lungs_only_accuracy`, `lung_focus`,
    `lung_masks_from_files`)."""
    share = outside_share(row["accuracy"], row["lungs_hidden_accuracy"], k)
    hidden, only = row["lungs_hidden_accuracy"], row["lungs_only_accuracy"]
    if row.get("lung_focus") and row.get("lung_masks_from_files", 0) < 1:
        return (
            "not measured: the model's lung focus and the audit both use the lung template "
            f"(lungs hidden {hidden:.3f}, lungs only {only:.3f}); the images' own lung masks "
            "are needed to audit it"
        )
    if math.isnan(share):
        return "not above chance on intact images"
    if share >= 0.5:
        return (
            f"reads mostly outside the lungs: with the lungs hidden it keeps {share:.0%} of its "
            f"accuracy above chance ({hidden:.3f}; chance {1 / k:.3f})"
        )
    if row["accuracy"] - only > 0.05:
        return (
            f"needs more than the lungs: {only:.3f} with only the lungs visible against "
            f"{row['accuracy']:.3f} intact (lungs hidden: {hidden:.3f})"
        )
    return f"reads the lungs: lungs hidden {hidden:.3f}, lungs only {only:.3f}"
