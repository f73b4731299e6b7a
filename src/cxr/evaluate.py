"""The evaluate stage: score one trained architecture on the test split and add the results
(metrics, figures, per-image predictions) to its training run in MLflow; and score it on the
validation split (`val.json`), which is what compare chooses the champion by and the register
gate compares: test figures are reported, never used to choose.

MLflow refuses to change a logged param, so evaluation adds metrics and files only; the
metrics are linked to the run's logged model and to the test dataset.

The shortcut audit (cxr.lung_audit) scores every test image three ways, intact, with the
lungs hidden and with only the lungs visible, and measures the share of each image's Grad-CAM
heat inside its lungs; the figures are drawn by cxr.evaluation_figures.
"""

from __future__ import annotations

import csv
import textwrap
from pathlib import Path
from typing import Any

import numpy as np

from cxr import tracking
from cxr.errors import CxrError
from cxr.evaluation_figures import plot_audit, plot_confusion, plot_grad_cam, plot_reliability
from cxr.files import atomic_path, read_json, write_json
from cxr.lung_audit import audit_scores, lung_audit
from cxr.lungs import audit_inputs
from cxr.metrics import HEADLINE, calibration, intervals, lung_verdict, per_source, scores
from cxr.prepared import split_arrays, split_masks
from cxr.timing import Phases


def write_predictions(
    path: Path, y: np.ndarray, probs: np.ndarray, classes: list[str], rows: list[dict]
) -> None:
    """One line per test image: actual, predicted, confidence and every class probability
    (`dvc plots` draws the confusion matrix from actual/predicted; compare reads it)."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "actual", "predicted", "confidence", *(f"p_{c}" for c in classes)])
        for row, label, p in zip(rows, y, probs, strict=True):
            guess = int(p.argmax())
            writer.writerow(
                [row["path"], classes[label], classes[guess], f"{p[guess]:.6f}"]
                + [f"{v:.6f}" for v in p]
            )


def read_predictions(path: Path, classes: list[str]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(labels, probabilities, image paths) from a predictions CSV written above."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    index = {c: i for i, c in enumerate(classes)}
    y = np.array([index[r["actual"]] for r in rows], dtype=np.int64)
    probs = np.array([[float(r[f"p_{c}"]) for c in classes] for r in rows])
    return y, probs, [r["path"] for r in rows]


def test_metrics(y: np.ndarray, probs: np.ndarray, classes: list[str], cfg: dict) -> dict:
    """The metrics JSON of one model: headline figures with intervals (`intervals`), calibration,
    per-class figures and the confusion counts."""
    result = scores(y, probs, classes)
    ci = intervals(
        y, probs.argmax(axis=1), len(classes), cfg["bootstrap"], cfg["ci_level"], cfg["seed"]
    )
    cal = calibration(probs, y, cfg["calibration_bins"])
    headline = {}
    for key in HEADLINE:
        headline[key] = result[key]
        if key in ci:
            headline[f"{key}_ci_low"], headline[f"{key}_ci_high"] = ci[key]
    return {
        "n_test": result["n"],
        **headline,
        "ece": cal["ece"],
        "per_class": result["per_class"],
        "confusion": result["confusion"],
        "calibration_bins": cal["bins"],
    }


def validation_scores(
    model, prepared: Path, classes: list[str], batch_size: int
) -> dict[str, float]:
    """The scores the champion is chosen by (compare.metric's choices), on the validation
    split: the headline scores of the intact images, and accuracy and macro-F1 with the lungs
    hidden and with only the lungs visible. Training saw these images to pick its best epoch
    (early stopping), and `cxr tune` searches settings by them: choosing among tuned and
    untuned models favours the tuned ones a little. No intervals: choosing needs the point
    values."""
    x, y, _ = split_arrays(prepared, "val")
    views = {"intact": x, **audit_inputs(x, split_masks(prepared, "val")[0])}
    probs = {
        view: model.predict(views[view], batch_size=batch_size, verbose=0).astype(np.float64)
        for view in ("intact", "lungs_hidden", "lungs_only")
    }
    result = scores(y, probs.pop("intact"), classes)
    return {
        "n_val": int(len(y)),
        **{key: result[key] for key in HEADLINE},
        **audit_scores(y, probs, classes),
    }


def _test_rows(prepared: Path) -> list[dict]:
    from cxr.prepared import load_prepared

    return [r for r in load_prepared(prepared)[1] if r["split"] == "test"]


def dvc_metrics(test: dict[str, Any], val: dict[str, Any]) -> dict[str, float]:
    """What `dvc metrics` and `dvc exp show` list of an evaluation (test.json and val.json
    hold everything): the score the champion is chosen by by default, the headline test
    scores, and the lung audit's two views; few, so that six models' table stays readable."""
    return {
        "val_macro_f1": val["macro_f1"],
        "test_accuracy": test["accuracy"],
        "test_macro_f1": test["macro_f1"],
        "lungs_hidden_accuracy": test["lungs_hidden_accuracy"],
        "lungs_only_accuracy": test["lungs_only_accuracy"],
    }


def evaluate(
    name: str,
    params: dict[str, Any],
    prepared: Path,
    model_path: Path,
    run_record: Path,
    out_dir: Path,
) -> dict[str, Any]:
    """Score `name` on the test split and on the validation split; write test.json, val.json,
    predictions.csv, run.json (the training run and logged model) and figures/ in `out_dir`;
    log all of it into the model's training run."""
    import keras

    phases = Phases(f"evaluate@{name}")
    cfg = params["evaluate"]
    record = read_json(run_record)
    if tracking.find_run(record["run_id"]) is None:
        raise CxrError(
            f"evaluate@{name}: the training run {record['run_id']} is not in the MLflow store "
            f"{tracking.redact(tracking.tracking_uri())} (was it trained against another store?). "
            f"Retrain it here with `dvc repro -f train@{name}`, or set MLFLOW_TRACKING_URI to "
            "the store it was trained against."
        )
    test = Scored(prepared)  # masks before the model: an old cache fails now
    model = keras.saving.load_model(model_path)  # safe mode: no code runs from the file
    test.probs = model.predict(test.x, batch_size=cfg["batch_size"], verbose=0)
    test.probs = test.probs.astype(np.float64)
    phases.done("predict")
    metrics = test_metrics(test.y, test.probs, test.classes, cfg)
    phases.done("metrics")
    audit, test.audit_probs, test.cams = lung_audit(
        model, test.x, test.y, test.masks, test.classes, cfg
    )
    metrics.update(audit)
    # Where the audit's lungs came from: 1.0 = every test image's own mask (the dataset's
    # masks), 0.0 = the template for all (a weaker audit: see cxr.lungs).
    metrics["lung_masks_from_files"] = float(np.mean([m == "file" for m in test.mask_from]))
    phases.done("lung audit")
    val = validation_scores(model, prepared, test.classes, cfg["batch_size"])
    phases.done("validation")
    write_json(out_dir / "run.json", record | {"param_count": model.count_params()})
    rows = _test_rows(prepared)
    write_predictions(out_dir / "predictions.csv", test.y, test.probs, test.classes, rows)
    # Per image source (the Kaggle metadata's URL column), to expose shortcut learning.
    sources = [r.get("source", "") for r in rows]
    by_source = per_source(test.y, test.probs.argmax(axis=1), sources, test.classes)
    write_json(out_dir / "per_source.json", by_source)
    write_json(out_dir / "test.json", metrics)
    write_json(out_dir / "val.json", val)
    write_json(out_dir / "metrics.json", dvc_metrics(metrics, val))
    draw_figures(name, test, metrics, cfg["gradcam_per_class"], out_dir / "figures")
    phases.done("figures")
    log_evaluation(params["mlflow"]["experiment"], name, record, test, metrics, val, out_dir)
    phases.done("logging")
    print(phases.line())
    return metrics


class Scored:
    """The test split as evaluate scores it: images, labels, lung masks (and where each came
    from), then the model's probabilities, the audit's and its Grad-CAM heatmaps."""

    def __init__(self, prepared: Path):
        self.prepared = prepared
        self.x, self.y, self.summary = split_arrays(prepared, "test")
        self.masks, self.mask_from = split_masks(prepared, "test")
        self.classes: list[str] = self.summary["classes"]
        self.probs = np.empty((0, len(self.classes)))
        self.audit_probs: dict[str, np.ndarray] = {}
        self.cams = np.empty((0,))


def draw_figures(
    name: str, test: Scored, metrics: dict[str, Any], gradcam_per_class: int, figure_dir: Path
) -> None:
    """figures/: the lung audit's views, the confusion matrices, the reliability diagram and
    Grad-CAM heatmaps of the first few test images of each class (the same for every model)."""
    figure_dir.mkdir(parents=True, exist_ok=True)
    x, y, classes = test.x, test.y, test.classes
    verdict = lung_verdict(metrics, len(classes))
    plot_audit(
        x,
        test.masks,
        {"intact": test.probs, **test.audit_probs},
        y,
        classes,
        figure_dir / "lung_audit.png",
        textwrap.fill(f"{name}: {verdict}", 70),
    )
    conf = np.array(metrics["confusion"])
    plot_confusion(conf, classes, figure_dir / "confusion.png", f"{name}: test confusion")
    plot_reliability(
        {"ece": metrics["ece"], "bins": metrics["calibration_bins"]},
        figure_dir / "reliability.png",
        f"{name}: reliability",
    )
    chosen = np.concatenate(
        [np.flatnonzero(y == k)[:gradcam_per_class] for k in range(len(classes))]
    )
    plot_grad_cam(  # the audit's heatmaps: Grad-CAM runs once per image
        x[chosen],
        test.cams[chosen],
        test.probs[chosen],
        y[chosen],
        classes,
        figure_dir / "gradcam.png",
        f"{name}: where the model looks (Grad-CAM, predicted class)",
    )


def log_evaluation(
    experiment: str,
    name: str,
    record: dict[str, Any],
    test: Scored,
    metrics: dict[str, Any],
    val: dict[str, Any],
    out_dir: Path,
) -> None:
    """Into the model's training run (adding only): the test dataset and metrics (linked to
    the logged model), the validation scores, the figures and the JSON/CSV files."""
    import mlflow

    flat = {k: v for k, v in metrics.items() if isinstance(v, float)}
    for c, figures in metrics["per_class"].items():
        flat.update({f"{k}_{c}": v for k, v in figures.items() if k != "support"})
    dataset = mlflow.data.from_numpy(  # as the training set: images as features, labels
        test.x,
        targets=test.y,
        source=str(test.prepared),
        name="prepared-test",
        digest=test.summary["fingerprint"][:16],
    )
    with tracking.start_run(experiment, name, {}, run_id=record["run_id"], add_only=True):
        mlflow.log_input(dataset, context="test")
        mlflow.log_metrics(
            {f"test_{k}": v for k, v in flat.items()},
            model_id=record.get("model_id"),
            dataset=dataset,
        )
        # `val_split_`: the validation split scored once, apart from Keras' per-epoch val_*.
        mlflow.log_metrics({f"val_split_{k}": v for k, v in val.items()})
        mlflow.log_artifacts(str(out_dir / "figures"), artifact_path="evaluation/figures")
        for file in ("test.json", "val.json", "predictions.csv", "per_source.json"):
            mlflow.log_artifact(str(out_dir / file), artifact_path="evaluation")
