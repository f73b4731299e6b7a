"""The compare stage: one table of every evaluated architecture, a chart with the bootstrap
intervals, a paired test between the best two, and the champion by a params metric; each
model's lung audit (cxr.evaluate) beside it, with a plain verdict on where it reads.

The champion is chosen by compare.metric on the validation split (evaluate's val.json); the
test figures are reported beside it and never used to choose, so the champion's test score
is an honest estimate rather than the best of six draws."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import numpy as np

from cxr import tracking
from cxr.errors import CxrError
from cxr.evaluate import read_predictions
from cxr.figures import pyplot, save_figure
from cxr.files import atomic_path, read_json, write_json
from cxr.metrics import HEADLINE, INTERVALS, INTERVALS_NOTE, lung_verdict, mcnemar

TIMINGS = ("train_seconds", "epoch_seconds", "train_images_per_second")
# The audit's columns: test.json keys and how the table and chart name them.
AUDIT = {
    "lungs_hidden_accuracy": "accuracy, lungs hidden",
    "lungs_only_accuracy": "accuracy, lungs only",
    "lungs_only_macro_f1": "macro-F1, lungs only",
}


def collect(models: list[str], evaluation: Path) -> list[dict[str, Any]]:
    """One row per model: test metrics with intervals, parameter count, and the training
    timings of its MLflow run (NaN when this store does not hold the run)."""
    rows = []
    for name in models:
        folder = evaluation / name
        if not (folder / "test.json").is_file():
            raise CxrError(
                f"compare: {folder / 'test.json'} is missing; run `dvc repro evaluate@{name}` "
                "(or remove the model from train.models)."
            )
        test, run = read_json(folder / "test.json"), read_json(folder / "run.json")
        if "lungs_hidden_accuracy" not in test or not (folder / "val.json").is_file():
            raise CxrError(
                f"compare: {folder} has no lung audit or no validation scores (evaluated by "
                f"an older version); run `dvc repro -f evaluate@{name}`."
            )
        val = read_json(folder / "val.json")
        found = tracking.find_run(run["run_id"])
        timings = {k: (found.data.metrics.get(k, math.nan) if found else math.nan) for k in TIMINGS}
        rows.append(
            {
                "model": name,
                **{k: v for k, v in test.items() if not isinstance(v, dict | list)},
                **{f"val_{k}": v for k, v in val.items()},
                "param_count": run["param_count"],
                **timings,
                "run_id": run["run_id"],
                "model_id": run.get("model_id"),
                "data_fingerprint": found.data.tags.get("cxr.data_fingerprint") if found else None,
                "machine": found.data.tags.get("cxr.machine") if found else None,
            }
        )
    return rows


def rank(rows: list[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """Best first by `metric` on the validation split (`val_<metric>`); ties go to the
    smaller model, then the name. The test figures play no part."""
    return sorted(rows, key=lambda r: (-r[f"val_{metric}"], r["param_count"], r["model"]))


def _interval(row: dict[str, Any], key: str) -> str:
    if f"{key}_ci_low" in row:
        return f"{row[key]:.3f} [{row[f'{key}_ci_low']:.3f}, {row[f'{key}_ci_high']:.3f}]"
    return f"{row[key]:.3f}"


def markdown(
    ranked: list[dict], metric: str, paired: dict | None, level: float, n_classes: int
) -> str:
    champion = ranked[0]
    lines = [
        "# Model comparison (chosen on validation, reported on test)",
        "",
        f"Champion by validation `{metric}`: **{champion['model']}** "
        f"({champion[f'val_{metric}']:.3f} on {champion['val_n_val']} validation images; "
        f"{champion[metric]:.3f} on the test split, reported, never used to choose). Brackets: "
        f"{level:.0%} intervals over {champion['n_test']} test images ({INTERVALS_NOTE}).",
        "",
        f"| rank | model | val {metric} | "
        + " | ".join(HEADLINE.values())
        + " | ECE | params | train s | images/s |",
        "|---:|---|---:|" + "---|" * len(HEADLINE) + "---:|---:|---:|---:|",
    ]
    for i, r in enumerate(ranked, 1):
        lines.append(
            f"| {i} | {r['model']} | {r[f'val_{metric}']:.3f} | "
            + " | ".join(_interval(r, key) for key in HEADLINE)
            + f" | {r['ece']:.3f} | {r['param_count']:,} | {r['train_seconds']:.0f} "
            f"| {r['train_images_per_second']:.0f} |"
        )
    if paired:
        a, b = ranked[0]["model"], ranked[1]["model"]
        verdict = (
            "a difference unlikely to be chance"
            if paired["p_value"] < 0.05
            else "no evidence that they differ (p >= 0.05): the choice between them is a toss-up"
        )
        lines += [
            "",
            f"Paired test (exact McNemar, same test images): {a} alone right on "
            f"{paired['a_only_correct']}, {b} alone right on {paired['b_only_correct']}; "
            f"p = {paired['p_value']:.3g}, {verdict}.",
        ]
    lines += [
        "",
        "## Does each model read the lungs?",
        "",
        "The same test images with the lungs hidden (filled with the image's mean grey) and "
        "with only the lungs visible; Grad-CAM: the mean share of each image's heat inside "
        f"its lungs (lungs: {champion['lung_area_share']:.2f} of the image). A model that "
        "reads the disease drops to chance (here "
        f"{1 / n_classes:.3f}) without the lungs and keeps its accuracy with them alone. "
        + (
            "Lungs: each test image's own mask."
            if champion["lung_masks_from_files"] == 1
            else "Lungs: the template for "
            f"{1 - champion['lung_masks_from_files']:.0%} of the test images (no mask "
            "file), a weaker audit."
        ),
        "",
        "| model | " + " | ".join(AUDIT.values()) + " | Grad-CAM heat in lungs | verdict |",
        "|---|" + "---|" * len(AUDIT) + "---:|---|",
    ]
    for r in ranked:
        lines.append(
            f"| {r['model']} | "
            + " | ".join(_interval(r, key) for key in AUDIT)
            + f" | {r.get('gradcam_lung_share', math.nan):.2f} | {lung_verdict(r, n_classes)} |"
        )
    machines = sorted({r["machine"] for r in ranked if r["machine"]})
    lines += [
        "",
        "Timings come from the training runs in MLflow, on "
        + (" | ".join(machines) or "a machine this store does not record")
        + ". They vary run to run. The metrics are the same on a rerun on the same machine and "
        "library versions; on another CPU their last digits may move.",
    ]
    return "\n".join(lines) + "\n"


def plot(ranked: list[dict], n_classes: int, path: Path) -> None:
    plt = pyplot()

    names = [r["model"] for r in ranked]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(1.4 * len(names) + 2, 4))
    bars = {key: HEADLINE[key] for key in INTERVALS} | {
        k: v for k, v in AUDIT.items() if k.endswith("accuracy")
    }
    width = 0.8 / len(bars)
    for i, (key, label) in enumerate(bars.items()):
        values = np.array([r[key] for r in ranked])
        errors = np.array(
            [[r[key] - r[f"{key}_ci_low"], r[f"{key}_ci_high"] - r[key]] for r in ranked]
        )
        offset = (i - (len(bars) - 1) / 2) * width
        ax.bar(x + offset, values, width, yerr=errors.T, capsize=3, label=label)
    ax.axhline(1 / n_classes, color="grey", ls=":", lw=1, label=f"chance ({n_classes} classes)")
    ax.set_xticks(x, names)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("test score (95% interval)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def plot_curves(models: list[str], histories: Path, path: Path) -> None:
    """Training and validation loss and accuracy of every model, per epoch, in one figure
    (from each training's `<histories>/<model>/history.csv`)."""
    plt = pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    colours = plt.get_cmap("tab10")
    for i, name in enumerate(models):
        with open(histories / name / "history.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        epochs = [int(r["epoch"]) for r in rows]
        for ax, key in zip(axes, ("loss", "accuracy"), strict=True):
            ax.plot(epochs, [float(r[key]) for r in rows], ls="--", color=colours(i), lw=1)
            ax.plot(epochs, [float(r[f"val_{key}"]) for r in rows], color=colours(i), label=name)
    for ax, key in zip(axes, ("loss", "accuracy"), strict=True):
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel(key)
        ax.set_title(f"{key}: validation (solid), training (dashed)", fontsize=10)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def compare(
    params: dict[str, Any], evaluation: Path, out_dir: Path, histories: Path | None = None
) -> dict[str, Any]:
    """Write table.md, table.csv, chart.png, summary.json (the champion) and, given the
    training histories' folder, curves.png in `out_dir`; log them as this execution's
    `compare` run."""
    import mlflow

    metric = params["compare"]["metric"]
    models = params["train"]["models"]
    ranked = rank(collect(models, evaluation), metric)
    classes = params["data"]["classes"]
    paired = None
    if len(ranked) > 1:
        a, b = ranked[0]["model"], ranked[1]["model"]
        y_a, p_a, paths_a = read_predictions(evaluation / a / "predictions.csv", classes)
        _, p_b, paths_b = read_predictions(evaluation / b / "predictions.csv", classes)
        if paths_a != paths_b:
            raise CxrError(
                f"compare: {a} and {b} were evaluated on different test images; rerun "
                "`dvc repro` so that every model is evaluated on the current split."
            )
        paired = mcnemar(y_a, p_a.argmax(axis=1), p_b.argmax(axis=1))
    champion = ranked[0]
    summary = {
        "metric": metric,
        "split": "val",  # what `value` (and the register gate) scores; test: reported only
        "champion": champion["model"],
        "value": champion[f"val_{metric}"],
        "test_value": champion[metric],
        "run_id": champion["run_id"],
        "model_id": champion["model_id"],
        "data_fingerprint": champion["data_fingerprint"],
        "classes": classes,
        "ranking": [
            {"model": r["model"], f"val_{metric}": r[f"val_{metric}"], f"test_{metric}": r[metric]}
            for r in ranked
        ],
        "runner_up": ranked[1]["model"] if paired else None,
        "mcnemar": paired,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    level = params["evaluate"]["ci_level"]
    with atomic_path(out_dir / "table.md") as tmp:
        tmp.write_text(markdown(ranked, metric, paired, level, len(classes)))
    with atomic_path(out_dir / "table.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(ranked[0]))
        writer.writeheader()
        writer.writerows(ranked)
    plot(ranked, len(classes), out_dir / "chart.png")
    if histories is not None:
        plot_curves(models, histories, out_dir / "curves.png")
    write_json(out_dir / "summary.json", summary)

    tags = tracking.run_tags("compare", champion["data_fingerprint"] or "")
    with tracking.start_run(params["mlflow"]["experiment"], "compare", tags):
        mlflow.log_params({"compare.metric": metric, "compare.models": ",".join(models)})
        mlflow.set_tags({"cxr.champion": champion["model"], "cxr.champion_run": champion["run_id"]})
        mlflow.log_metrics({f"{r['model']}_val_{metric}": r[f"val_{metric}"] for r in ranked})
        mlflow.log_metrics({f"{r['model']}_test_{metric}": r[metric] for r in ranked})
        if paired:
            mlflow.log_metric("mcnemar_p_value", paired["p_value"])
        mlflow.log_artifacts(str(out_dir), artifact_path="comparison")
    return summary
