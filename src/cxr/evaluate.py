"""The evaluate stage: score one trained architecture on the test split and add the results
(metrics, figures, per-image predictions) to its training run in MLflow; and score it on the
validation split (`val.json`), which is what compare chooses the champion by and the register
gate compares: test figures are reported, never used to choose.

MLflow refuses to change a logged param, so evaluation adds metrics and files only; the
metrics are linked to the run's logged model and to the test dataset.

The shortcut audit (`lung_audit`) scores every test image three ways, intact, with the lungs
hidden and with only the lungs visible (cxr.lungs), and measures the share of each image's
Grad-CAM heat that falls inside its lungs: a model that reads the disease loses its accuracy
without the lungs and keeps it with them alone.
"""

from __future__ import annotations

import csv
import textwrap
from pathlib import Path
from typing import Any

import numpy as np

from cxr import tracking
from cxr.errors import CxrError
from cxr.figures import pyplot, save_figure
from cxr.files import atomic_path, read_json, write_json
from cxr.lungs import audit_inputs, heat_inside
from cxr.metrics import (
    HEADLINE,
    calibration,
    intervals,
    lung_verdict,
    macro_f1,
    per_source,
    scores,
)
from cxr.prepared import split_arrays, split_masks
from cxr.timing import Phases


def grad_cam(model, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(heatmaps in [0, 1] at the images' size, probabilities) for the predicted class.

    The feature map is the last 4-D output of the model's top-level graph: the base's output
    for the transfer models, the last conv block for the CNNs. The model is cut there into
    a body (images to feature maps) and a head (feature maps to probabilities), and the
    predicted class's log-probability is differentiated with respect to the feature maps
    by the backend (cxr.backend.value_and_grad); the rest is keras.ops."""
    import keras
    from keras import ops

    from cxr.backend import value_and_grad

    target = [layer for layer in model.layers if len(layer.output.shape) == 4][-1]
    # The tensor of the layer's call in this graph: for a nested base model, `.output` is
    # the base's own output, which is not connected to this model's inputs. Keras 3 has no
    # public way to it (no get_output_at): the private `_inbound_nodes`, pinned by
    # tests/test_private_apis.py, which fails when `.output` becomes usable here.
    features = target._inbound_nodes[-1].output_tensors[0]
    body = keras.Model(model.inputs, features)
    head = keras.Model(features, model.output)
    maps = ops.cast(body(ops.convert_to_tensor(images, "float32"), training=False), "float32")

    def score(maps):
        probs = ops.cast(head(maps, training=False), "float32")
        chosen = ops.argmax(probs, axis=1)
        # log-probability: its gradient does not vanish when the softmax saturates. Each
        # image's score depends on its own maps only: the sum's gradient is each one's.
        picked = ops.take_along_axis(probs, chosen[:, None], axis=1)
        return ops.sum(ops.log(picked + 1e-7)), probs

    (_, probs), grads = value_and_grad(score, maps)
    weights = ops.mean(grads, axis=(1, 2), keepdims=True)
    cam = ops.relu(ops.sum(weights * maps, axis=-1))
    cam = cam / (ops.max(cam, axis=(1, 2), keepdims=True) + 1e-7)
    # With the lung focus the feature maps cover only the crop (cxr.models): the heatmap goes
    # back into the crop's place in the image, zero where the network saw nothing.
    (top, bottom), (left, right) = _lung_crop(model)
    height, width = images.shape[1:3]
    inner = (height - top - bottom, width - left - right)
    cam = ops.image.resize(cam[..., None], inner, interpolation="bilinear")[..., 0]
    cam = ops.pad(cam, ((0, 0), (top, bottom), (left, right)))
    return ops.convert_to_numpy(cam), ops.convert_to_numpy(probs)


def _lung_crop(model) -> tuple[tuple[int, int], tuple[int, int]]:
    """((top, bottom), (left, right)) pixels the model's lung focus crops off; zeros without."""
    crops = [layer for layer in model.layers if layer.name == "lung_crop"]
    return tuple(map(tuple, crops[0].cropping)) if crops else ((0, 0), (0, 0))


def audit_scores(
    y: np.ndarray,
    probs: dict[str, np.ndarray],
    classes: list[str],
    cfg: dict[str, Any] | None = None,
) -> dict[str, float]:
    """Accuracy and macro-F1 of each audit view's probabilities (`lungs_hidden`,
    `lungs_only`): test.json's `<view>_accuracy`, `<view>_macro_f1`, and their intervals
    when `cfg` (evaluate's bootstrap settings) is given."""
    figures = {}
    for view, p in probs.items():
        pred = p.argmax(axis=1)
        figures[f"{view}_accuracy"] = float(np.mean(pred == y))
        figures[f"{view}_macro_f1"] = macro_f1(y, pred, len(classes))
        if cfg is not None:
            ci = intervals(y, pred, len(classes), cfg["bootstrap"], cfg["ci_level"], cfg["seed"])
            for key in ("accuracy", "macro_f1"):
                figures[f"{view}_{key}_ci_low"], figures[f"{view}_{key}_ci_high"] = ci[key]
    return figures


def lung_audit(
    model,
    x: np.ndarray,
    y: np.ndarray,
    masks: np.ndarray,
    classes: list[str],
    cfg: dict[str, Any],
) -> tuple[dict[str, float], dict[str, np.ndarray], np.ndarray]:
    """(audit figures, the audit's predicted probabilities per view, every image's Grad-CAM
    heatmap) of the test images `x` with lung masks `masks`: accuracy and macro-F1 with the
    lungs hidden and with only the lungs visible, with intervals as for the intact images;
    the mean share of Grad-CAM heat inside the lungs, overall and per actual class, beside
    the lungs' share of the image (what heat spread evenly would give)."""
    views = audit_inputs(x, masks)
    probs = {
        view: model.predict(views[view], batch_size=cfg["batch_size"], verbose=0).astype(np.float64)
        for view in ("lungs_hidden", "lungs_only")
    }
    figures = audit_scores(y, probs, classes, cfg)
    step = cfg["batch_size"]
    cams = np.concatenate([grad_cam(model, x[i : i + step])[0] for i in range(0, len(x), step)])
    inside = heat_inside(cams, masks)
    for key, members in [("", y >= 0)] + [(f"_{c}", y == k) for k, c in enumerate(classes)]:
        values = inside[members & np.isfinite(inside)]
        if len(values):  # left out, as a class's ROC-AUC is, when there is nothing to average
            figures[f"gradcam_lung_share{key}"] = float(values.mean())
    figures["lung_area_share"] = float(masks.mean())
    # The lung focus (1.0: in the graph) and the template as the audit's lungs see the
    # same region: the audit then measures little (cxr.metrics.lung_verdict says so).
    figures["lung_focus"] = float(_lung_crop(model) != ((0, 0), (0, 0)))
    return figures, probs, cams


def plot_audit(
    x: np.ndarray,
    masks: np.ndarray,
    probs: dict[str, np.ndarray],
    y: np.ndarray,
    classes: list[str],
    path: Path,
    title: str,
) -> None:
    """The first test image of each class in the audit's three views, with the prediction."""
    plt = pyplot()
    views = audit_inputs(x, masks)
    firsts = [int(np.flatnonzero(y == k)[0]) for k in range(len(classes)) if np.any(y == k)]
    fig, axes = plt.subplots(len(firsts), 3, figsize=(6.6, 2.4 * len(firsts)), squeeze=False)
    for row, i in zip(axes, firsts, strict=True):
        for ax, view in zip(row, ("intact", "lungs_hidden", "lungs_only"), strict=True):
            p = probs[view][i]
            ax.imshow(views[view][i].squeeze(), cmap="gray", vmin=0, vmax=255)
            ax.contour(masks[i], [0.5], colors="red", linewidths=0.6)
            ax.set_title(
                f"{classes[y[i]]}, {view.replace('_', ' ')}\n-> {classes[int(p.argmax())]} "
                f"{p.max():.2f}",
                fontsize=8,
            )
            ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


def plot_confusion(conf: np.ndarray, classes: list[str], path: Path, title: str) -> None:
    """Counts and row-normalised (recall) confusion matrices side by side."""
    plt = pyplot()
    rows = conf.sum(axis=1, keepdims=True)
    normalised = np.divide(conf, rows, out=np.zeros(conf.shape), where=rows > 0)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    for ax, data, label, fmt in (
        (axes[0], conf, "counts", "{:d}"),
        (axes[1], normalised, "normalised by actual class", "{:.2f}"),
    ):
        ax.imshow(data, cmap="Blues", vmin=0)
        for (i, j), value in np.ndenumerate(data):
            dark = value > data.max() / 2
            ax.text(
                j,
                i,
                fmt.format(value),
                ha="center",
                va="center",
                color="white" if dark else "black",
            )
        ax.set_xticks(range(len(classes)), classes, rotation=30, ha="right")
        ax.set_yticks(range(len(classes)), classes)
        ax.set_xlabel("predicted")
        ax.set_ylabel("actual")
        ax.set_title(label)
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)


def plot_reliability(cal: dict[str, Any], path: Path, title: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.8, 4.6))
    bins = cal["bins"]
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    ax.bar(
        [b["confidence"] for b in bins],
        [b["accuracy"] for b in bins],
        width=0.08,
        alpha=0.7,
        label="accuracy per confidence bin",
    )
    for b in bins:
        ax.annotate(str(b["count"]), (b["confidence"], b["accuracy"]), ha="center", va="bottom")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("confidence (top probability)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{title}\nECE {cal['ece']:.3f}")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def plot_grad_cam(
    images: np.ndarray,
    cams: np.ndarray,
    probs: np.ndarray,
    y: np.ndarray,
    classes: list[str],
    path: Path,
    title: str,
) -> None:
    """One row per class: each image with its heatmap, titled actual / predicted (prob)."""
    plt = pyplot()
    per_row = max(np.bincount(y, minlength=len(classes)).max(), 1)
    fig, axes = plt.subplots(
        len(classes), per_row, figsize=(2.2 * per_row, 2.4 * len(classes)), squeeze=False
    )
    for ax in axes.ravel():
        ax.axis("off")
    column = dict.fromkeys(range(len(classes)), 0)
    for image, cam, p, label in zip(images, cams, probs, y, strict=True):
        ax = axes[label, column[label]]
        column[label] += 1
        ax.imshow(image[..., 0], cmap="gray", vmin=0, vmax=255)
        ax.imshow(cam, cmap="jet", alpha=0.35, vmin=0, vmax=1)
        guess = int(p.argmax())
        mark = "" if guess == label else " (wrong)"
        ax.set_title(f"{classes[label]}\n-> {classes[guess]} {p[guess]:.2f}{mark}", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)


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
    import mlflow

    phases = Phases(f"evaluate@{name}")
    cfg = params["evaluate"]
    record = read_json(run_record)
    run = tracking.find_run(record["run_id"])
    if run is None:
        raise CxrError(
            f"evaluate@{name}: the training run {record['run_id']} is not in the MLflow store "
            f"{tracking.redact(tracking.tracking_uri())} (was it trained against another store?). "
            f"Retrain it here with `dvc repro -f train@{name}`, or set MLFLOW_TRACKING_URI to "
            "the store it was trained against."
        )
    x, y, summary = split_arrays(prepared, "test")
    masks, mask_from = split_masks(prepared, "test")  # before the model: an old cache fails now
    classes = summary["classes"]
    model = keras.saving.load_model(model_path)  # safe mode: no code runs from the file
    probs = model.predict(x, batch_size=cfg["batch_size"], verbose=0).astype(np.float64)
    phases.done("predict")
    metrics = test_metrics(y, probs, classes, cfg)
    phases.done("metrics")
    audit, audit_probs, cams = lung_audit(model, x, y, masks, classes, cfg)
    metrics.update(audit)
    # Where the audit's lungs came from: 1.0 = every test image's own mask (the dataset's
    # masks), 0.0 = the template for all (a weaker audit: see cxr.lungs).
    metrics["lung_masks_from_files"] = float(np.mean([m == "file" for m in mask_from]))
    verdict = lung_verdict(metrics, len(classes))
    phases.done("lung audit")
    val = validation_scores(model, prepared, classes, cfg["batch_size"])
    phases.done("validation")

    figure_dir = out_dir / "figures"
    figure_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "run.json", record | {"param_count": model.count_params()})
    rows = _test_rows(prepared)
    write_predictions(out_dir / "predictions.csv", y, probs, classes, rows)
    # Per image source (the Kaggle metadata's URL column), to expose shortcut learning.
    sources = [r.get("source", "") for r in rows]
    write_json(out_dir / "per_source.json", per_source(y, probs.argmax(axis=1), sources, classes))
    write_json(out_dir / "test.json", metrics)
    write_json(out_dir / "val.json", val)
    write_json(out_dir / "metrics.json", dvc_metrics(metrics, val))
    plot_audit(
        x,
        masks,
        {"intact": probs, **audit_probs},
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
    # Grad-CAM: the first few test images of each class (the same ones for every model).
    chosen = np.concatenate(
        [np.flatnonzero(y == k)[: cfg["gradcam_per_class"]] for k in range(len(classes))]
    )
    plot_grad_cam(  # the audit's heatmaps: Grad-CAM runs once per image
        x[chosen],
        cams[chosen],
        probs[chosen],
        y[chosen],
        classes,
        figure_dir / "gradcam.png",
        f"{name}: where the model looks (Grad-CAM, predicted class)",
    )

    phases.done("figures")
    flat = {k: v for k, v in metrics.items() if isinstance(v, float)}
    for c, figures in metrics["per_class"].items():
        flat.update({f"{k}_{c}": v for k, v in figures.items() if k != "support"})
    dataset = mlflow.data.from_numpy(  # as the training set: images as features, labels
        x, targets=y, source=str(prepared), name="prepared-test", digest=summary["fingerprint"][:16]
    )
    with tracking.start_run(
        params["mlflow"]["experiment"], name, {}, run_id=record["run_id"], add_only=True
    ):
        mlflow.log_input(dataset, context="test")
        mlflow.log_metrics(
            {f"test_{k}": v for k, v in flat.items()},
            model_id=record.get("model_id"),
            dataset=dataset,
        )
        # `val_split_`: the validation split scored once, apart from Keras' per-epoch val_*.
        mlflow.log_metrics({f"val_split_{k}": v for k, v in val.items()})
        mlflow.log_artifacts(str(figure_dir), artifact_path="evaluation/figures")
        mlflow.log_artifact(str(out_dir / "test.json"), artifact_path="evaluation")
        mlflow.log_artifact(str(out_dir / "val.json"), artifact_path="evaluation")
        mlflow.log_artifact(str(out_dir / "predictions.csv"), artifact_path="evaluation")
        mlflow.log_artifact(str(out_dir / "per_source.json"), artifact_path="evaluation")
    phases.done("logging")
    print(phases.line())
    return metrics
