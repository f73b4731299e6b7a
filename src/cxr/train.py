"""The train stage: fit one architecture on the cached images, tracked as one MLflow run."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

import keras
import numpy as np

from cxr import backend, machine, tracking
from cxr.checkpoint import Checkpoint
from cxr.figures import pyplot, save_figure
from cxr.files import atomic_path, read_json, write_json
from cxr.fit import Fitted, accelerator_settings, early_stopping, fit, settings_for
from cxr.models import check_settings
from cxr.params import flatten
from cxr.prepared import split_arrays
from cxr.repo import repo_root
from cxr.requirements import pinned_requirements
from cxr.timing import Phases


def plot_curves(history: dict[str, list[float]], path: Path, title: str) -> None:
    plt = pyplot()

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
    save_figure(fig, path)


def write_history(history: dict[str, list[float]], path: Path) -> None:
    keys = list(history)
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["epoch", *keys])
        for epoch in range(len(history[keys[0]])):
            writer.writerow([epoch + 1, *(f"{history[k][epoch]:.6g}" for k in keys)])


def log_keras_model(model, example: np.ndarray, name: str = "model") -> str:
    """`mlflow.keras.log_model` with a signature, an input example and pinned requirements;
    return the logged model's id."""
    import mlflow
    from mlflow.keras import save as keras_save
    from mlflow.models import infer_signature

    # mlflow.keras writes the input example before creating the model folder
    # (mlflow/mlflow#16183, open): create the folder first. tests/test_private_apis.py
    # fails when MLflow fixes it; then remove this patch.
    original = keras_save._save_example

    def save_example(mlflow_model, input_example, path, *args, **kwargs):
        os.makedirs(path, exist_ok=True)
        return original(mlflow_model, input_example, path, *args, **kwargs)

    keras_save._save_example = save_example
    keras.config.disable_interactive_logging()  # MLflow's own predict calls: no progress bars
    try:
        info = mlflow.keras.log_model(
            model,
            name=name,  # the architecture: six logged models tell apart in the UI
            signature=infer_signature(example, model.predict(example, verbose=0)),
            input_example=example,
            pip_requirements=pinned_requirements(),
        )
    finally:
        keras_save._save_example = original
        keras.config.enable_interactive_logging()
    return info.model_id


def epoch_metrics():
    """MLflow's Keras callback (each epoch's metrics, the model summary) without what repeats
    the run's own record: the optimizer's config as params (train logs its settings) and the
    validation metrics again, as `validation_*` at step 0, after every epoch (the epoch's
    `val_*` are logged with it)."""
    import mlflow

    class EpochMetrics(mlflow.keras.MlflowCallback):
        def on_train_begin(self, logs=None):
            lines: list[str] = []
            self.model.summary(print_fn=lambda line, *args, **kwargs: lines.append(line))
            mlflow.log_text("\n".join(lines), artifact_file="model_summary.txt")

        def on_test_end(self, logs=None):
            pass

    return EpochMetrics()


def train(
    name: str, params: dict[str, Any], prepared: Path, out_dir: Path, report_dir: Path
) -> dict[str, Any]:
    """Train architecture `name` on the prepared cache as one MLflow run: model, curves and
    TensorBoard logs in `out_dir`; history, metrics and the MLflow run record in
    `report_dir`. A killed training resumes from its checkpoint, into the same MLflow run."""
    import mlflow

    phases = Phases(f"train@{name}")
    cfg, builder_cfg = settings_for(name, params)
    accel = accelerator_settings(cfg)  # first: threads and XLA flags are set before start
    summary = read_json(prepared / "dataset.json")
    check_settings(name, params["models"][name], summary["image_size"])  # before the data
    x_train, y_train, _ = split_arrays(prepared, "train")
    x_val, y_val, _ = split_arrays(prepared, "val")
    classes = summary["classes"]
    phases.done("data")

    checkpoint = Checkpoint(
        repo_root() / ".cache" / "checkpoints",
        name,
        [cfg, builder_cfg, summary["fingerprint"], accel["backend"]],
    )
    resume, resumed = _resumable(checkpoint, accel["distribution"])
    tags = tracking.run_tags(stage=f"train@{name}", data_fingerprint=summary["fingerprint"])
    stopper = early_stopping(cfg, resume)
    saver = checkpoint.saver(resume.history if resume else {}, cfg["checkpoint_seconds"], stopper)
    experiment = params["mlflow"]["experiment"]
    backend.hide_gpus_from_tensorflow()  # TensorBoard's summaries start TensorFlow
    with tracking.start_run(experiment, name, tags, resumed, system_metrics=True) as run:
        checkpoint.start(run.info.run_id)
        # Timings (and the last digits of metrics) depend on the CPU: name it. A tag, not a
        # param, so that a training resumed on another machine can update it.
        mlflow.set_tag("cxr.machine", machine.header(dated=False))
        if resume:
            print(f"train@{name}: resuming MLflow run {resumed} after epoch {resume.epochs_done}")
        mlflow.log_params(
            run_params(name, cfg, builder_cfg, summary, (len(x_train), len(x_val)), accel)
        )
        _log_training_set(x_train, y_train, prepared, summary["fingerprint"])
        result = fit(
            name,
            cfg,
            builder_cfg,
            (x_train, y_train),
            (x_val, y_val),
            len(classes),
            accel,
            callbacks=[
                LogRuntime(),
                epoch_metrics(),
                saver,  # after MLflow's: a checkpoint's epochs are in the run
                keras.callbacks.TensorBoard(str(out_dir / "tensorboard")),
            ],
            resume=resume,
            stopper=stopper,
        )
        phases.done("fit")
        phases.move("fit", "build", result.build_seconds, before=True)
        phases.move("fit", "checkpoints", saver.seconds)
        metrics, timing = summarise(result)
        mlflow.log_metrics(
            {f"best_{k}" if k.startswith("val_") else k: v for k, v in metrics.items()} | timing
        )
        model_id = write_outputs(name, result, out_dir, report_dir, x_val[:1])
        tracking.write_run_record(report_dir / "mlflow_run.json", run, model_id=model_id)
        phases.done("logging")
        mlflow.log_metrics(phases.metrics())
    write_json(report_dir / "train.json", {k: metrics[k] for k in DVC_METRICS})
    checkpoint.remove()
    print(phases.line())
    return metrics | timing


def _resumable(checkpoint: Checkpoint, distribution) -> tuple[Any, str | None]:
    """(the checkpoint's state, its MLflow run id) to resume from, or (None, None): a
    checkpoint that cannot be loaded, or whose run is not in this store, is removed."""
    resumed = checkpoint.run_id
    with backend.scope(distribution):
        resume = checkpoint.load() if resumed else None
    if resumed and (resume is None or tracking.find_run(resumed) is None):
        checkpoint.remove()
        return None, None
    return resume, resumed


def _log_training_set(x: np.ndarray, y: np.ndarray, prepared: Path, fingerprint: str) -> None:
    import mlflow

    dataset = mlflow.data.from_numpy(
        x, targets=y, source=str(prepared), name="prepared-train", digest=fingerprint[:16]
    )
    mlflow.log_input(dataset, context="training")


def run_params(
    name: str,
    cfg: dict[str, Any],
    builder_cfg: dict[str, Any],
    summary: dict[str, Any],
    sizes: tuple[int, int],
    accel: dict[str, Any],
) -> dict[str, Any]:
    """The MLflow params of a training run: its settings, its data and the runtime facts
    known before the model exists (LogRuntime adds what the compiled model does)."""
    return {
        **{f"train.{k}": v for k, v in flatten(cfg).items() if k != "models"},
        **{f"model.{k}": v for k, v in flatten(builder_cfg).items()},
        "model.name": name,
        "data.classes": ",".join(summary["classes"]),
        "data.image_size": summary["image_size"],
        "data.n_train": sizes[0],
        "data.n_val": sizes[1],
        "runtime.backend": accel["backend"],
        "runtime.deterministic": accel["deterministic"],
        "runtime.replicas": accel["replicas"],
        "runtime.threads": accel["threads"],
    }


class LogRuntime(keras.callbacks.Callback):
    """Log the settings the training really runs with, read back from the compiled model
    (Keras turns a requested XLA off where it cannot use it): runtime.jit_compile,
    runtime.steps_per_execution and runtime.dtype_policy."""

    def on_train_begin(self, logs=None):
        import mlflow

        mlflow.log_params(
            {
                "runtime.jit_compile": bool(self.model.jit_compile),
                "runtime.steps_per_execution": int(self.model.steps_per_execution),
                "runtime.dtype_policy": self.model.dtype_policy.name,
            }
        )


# What `dvc metrics` and `dvc exp show` get of a training (MLflow has all of summarise's):
# few, so that a table of six models' experiments stays readable.
DVC_METRICS = ("val_loss", "best_epoch")


def summarise(result: Fitted) -> tuple[dict[str, Any], dict[str, float]]:
    """(metrics, timings) of a fit. The metrics are deterministic and go to DVC (a rerun
    gives an empty metrics diff); timings vary run to run and go to MLflow only."""
    best = result.best_epoch - 1
    metrics = {
        "val_loss": result.history["val_loss"][best],
        "val_accuracy": result.history["val_accuracy"][best],
        "best_epoch": best + 1,
        "epochs_run": len(result.history["loss"]),
        "param_count": result.model.count_params(),
    }
    # The first epoch compiles: the median of the others is the steady state.
    steady = float(np.median(result.epoch_seconds[1:] or result.epoch_seconds or [np.nan]))
    timing = {
        "train_seconds": round(result.fit_seconds, 2),
        "epoch_seconds": round(steady, 3),
        "train_images_per_second": round(result.images_per_epoch / steady, 1),
    }
    return metrics, timing


def write_outputs(
    name: str, result: Fitted, out_dir: Path, report_dir: Path, example: np.ndarray
) -> str:
    """History CSV, learning curves, TensorBoard logs and the model, as files and as the
    active MLflow run's artifacts; return the logged model's id."""
    import mlflow

    out_dir.mkdir(parents=True, exist_ok=True)
    report_dir.mkdir(parents=True, exist_ok=True)
    write_history(result.history, report_dir / "history.csv")
    plot_curves(result.history, out_dir / "curves.png", f"{name}: learning curves")
    mlflow.log_artifact(str(out_dir / "curves.png"))
    mlflow.log_artifact(str(report_dir / "history.csv"))
    mlflow.log_artifacts(str(out_dir / "tensorboard"), artifact_path="tensorboard")
    model_id = log_keras_model(result.model, example, name)
    with atomic_path(out_dir / "model.keras") as tmp:
        result.model.save(tmp)
    return model_id
