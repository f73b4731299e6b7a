"""The train stage: fit one architecture on the cached images, tracked as one MLflow run."""

from __future__ import annotations

import csv
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from cxr import tracking
from cxr.io import atomic_path, write_json
from cxr.params import flatten
from cxr.prepare import load_prepared

LOCK_FILE = Path("requirements.lock")  # stages run in the repository root
# What a logged model needs to load and serve; exact versions come from the lock file.
MODEL_REQUIREMENTS = ("mlflow", "keras", "tensorflow", "numpy")


def split_arrays(prepared: Path, split: str) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(images (n, H, W, 1) uint8, labels (n,) int32, dataset summary) of one split."""
    images, rows, summary = load_prepared(prepared)
    index = {label: i for i, label in enumerate(summary["classes"])}
    chosen = [r for r in rows if r["split"] == split]
    x = images[[int(r["index"]) for r in chosen]][..., None]
    y = np.array([index[r["label"]] for r in chosen], dtype=np.int32)
    return x, y, summary


def make_dataset(x: np.ndarray, y: np.ndarray, batch_size: int, shuffle: bool, seed: int):
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices((x, y))
    if shuffle:
        ds = ds.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def pinned_requirements(lock: Path = LOCK_FILE) -> list[str] | None:
    """`name==version` lines of MODEL_REQUIREMENTS from the lock file (None if absent)."""
    if not lock.is_file():
        return None
    pins = {}
    for line in lock.read_text().splitlines():
        name, sep, _ = line.partition("==")
        if sep and name.strip().lower() in MODEL_REQUIREMENTS:
            pins[name.strip().lower()] = line.strip()
    return [pins[name] for name in MODEL_REQUIREMENTS if name in pins]


def plot_curves(history: dict[str, list[float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    epochs = np.arange(1, len(history["loss"]) + 1)
    for ax, metric in zip(axes, ("loss", "accuracy"), strict=True):
        ax.plot(epochs, history[metric], label="train")
        ax.plot(epochs, history[f"val_{metric}"], label="validation")
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def write_history(history: dict[str, list[float]], path: Path) -> None:
    keys = list(history)
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["epoch", *keys])
        for epoch in range(len(history[keys[0]])):
            writer.writerow([epoch + 1, *(f"{history[k][epoch]:.6g}" for k in keys)])


def log_keras_model(model, example: np.ndarray) -> None:
    """`mlflow.keras.log_model` with a signature, an input example and pinned requirements."""
    import mlflow
    from mlflow.keras import save as keras_save
    from mlflow.models import infer_signature

    # mlflow.keras writes the input example before creating the model folder
    # (mlflow/mlflow#16183, open): create the folder first.
    original = keras_save._save_example

    def save_example(mlflow_model, input_example, path, *args, **kwargs):
        os.makedirs(path, exist_ok=True)
        return original(mlflow_model, input_example, path, *args, **kwargs)

    keras_save._save_example = save_example
    try:
        mlflow.keras.log_model(
            model,
            name="model",
            signature=infer_signature(example, model.predict(example, verbose=0)),
            input_example=example,
            pip_requirements=pinned_requirements(),
        )
    finally:
        keras_save._save_example = original


def train(
    name: str, params: dict[str, Any], prepared: Path, out_dir: Path, report_dir: Path
) -> dict[str, Any]:
    """Train architecture `name`: model and curves in `out_dir`; history, metrics and the
    MLflow run record in `report_dir`."""
    import keras
    import mlflow
    import tensorflow as tf

    from cxr.models import build_model

    cfg, model_cfg = params["train"], params["models"][name]
    keras.utils.set_random_seed(cfg["seed"])
    tf.config.experimental.enable_op_determinism()

    x_train, y_train, summary = split_arrays(prepared, "train")
    x_val, y_val, _ = split_arrays(prepared, "val")
    train_ds = make_dataset(x_train, y_train, cfg["batch_size"], True, cfg["seed"])
    val_ds = make_dataset(x_val, y_val, cfg["batch_size"], False, cfg["seed"])

    classes = summary["classes"]
    model = build_model(name, x_train.shape[1:], len(classes), **model_cfg)
    model.compile(
        optimizer=keras.optimizers.Adam(model_cfg["learning_rate"]),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )

    run_params = {
        **{f"train.{k}": v for k, v in cfg.items() if k != "models"},
        **{f"model.{k}": v for k, v in flatten(model_cfg).items()},
        "model.name": name,
        "data.classes": ",".join(classes),
        "data.image_size": summary["image_size"],
        "data.n_train": len(x_train),
        "data.n_val": len(x_val),
    }
    tags = tracking.run_tags(stage=f"train@{name}", data_fingerprint=summary["fingerprint"])
    with tracking.start_run(params["mlflow"]["experiment"], name, tags) as run:
        mlflow.log_params(run_params)
        mlflow.log_metric("param_count", model.count_params())
        started = time.perf_counter()
        fit = model.fit(
            train_ds,
            validation_data=val_ds,
            epochs=cfg["epochs"],
            callbacks=[
                keras.callbacks.EarlyStopping(
                    monitor="val_loss",
                    patience=cfg["early_stopping_patience"],
                    restore_best_weights=True,
                ),
                mlflow.keras.MlflowCallback(),
            ],
            verbose=2,
        )
        seconds = time.perf_counter() - started
        history = {k: [float(v) for v in vals] for k, vals in fit.history.items()}
        best = int(np.argmin(history["val_loss"]))
        metrics = {
            "val_loss": history["val_loss"][best],
            "val_accuracy": history["val_accuracy"][best],
            "best_epoch": best + 1,
            "epochs_run": len(history["loss"]),
            "train_seconds": round(seconds, 2),
            "train_images_per_second": round(len(x_train) * len(history["loss"]) / seconds, 1),
        }
        mlflow.log_metrics(
            {f"best_{k}" if k.startswith("val_") else k: v for k, v in metrics.items()}
        )

        out_dir.mkdir(parents=True, exist_ok=True)
        report_dir.mkdir(parents=True, exist_ok=True)
        write_history(history, report_dir / "history.csv")
        plot_curves(history, out_dir / "curves.png", f"{name}: learning curves")
        mlflow.log_artifact(str(out_dir / "curves.png"))
        mlflow.log_artifact(str(report_dir / "history.csv"))

        log_keras_model(model, x_val[:1])
        with atomic_path(out_dir / "model.keras") as tmp:
            model.save(tmp)
        tracking.write_run_record(report_dir / "mlflow_run.json", run)
    write_json(report_dir / "train.json", metrics)
    return metrics
