"""The train stage: fit one architecture on the cached images, tracked as one MLflow run."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import keras
import numpy as np

from cxr import tracking
from cxr.io import atomic_path, pyplot, read_json, save_figure, write_json
from cxr.params import flatten
from cxr.prepare import split_arrays
from cxr.timing import Phases


def make_dataset(x: np.ndarray, y: np.ndarray, batch_size: int, shuffle: bool, seed: int):
    """tf.data over the cached uint8 arrays, shuffled for training. No per-image work on the
    host: augmentation runs inside the training step (cxr.augment)."""
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices((x, y))
    if shuffle:
        ds = ds.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def class_weights(y: np.ndarray, n_classes: int) -> dict[int, float]:
    """'balanced' weights n / (k * count): each class weighs the same in the loss."""
    counts = np.bincount(y, minlength=n_classes)
    return {k: float(len(y) / (n_classes * c)) if c else 0.0 for k, c in enumerate(counts)}


def oversample(y: np.ndarray, n_classes: int, seed: int) -> np.ndarray:
    """Indices that draw every class of `y` up to the largest class's count: each image once,
    then random repeats of the smaller classes' own images (training split only)."""
    rng = np.random.default_rng(seed)
    counts = np.bincount(y, minlength=n_classes)
    top = counts.max()
    chosen = []
    for k in range(n_classes):
        members = np.flatnonzero(y == k)
        if len(members):
            extra = rng.choice(members, top - len(members), replace=True)
            chosen.append(np.concatenate([members, extra]))
    return np.sort(np.concatenate(chosen))


def accelerator_settings(cfg: dict[str, Any]) -> dict[str, Any]:
    """Resolve the `auto` settings from the visible devices; set TensorFlow's CPU threads.

    Threads (`threads`): every core this process may use (its CPU affinity, which follows
    taskset and container CPU sets, not the host's count), for both of TensorFlow's thread
    pools; set before TensorFlow starts its runtime (in a process where it has already
    started, the running pools stay). Mixed precision: bfloat16 on GPUs that have it (compute
    capability 8.0+), else float16; off on CPU. XLA (jit_compile): on with a GPU.
    `steps_per_execution`: 32 batches per compiled call with a GPU (one host round trip per
    32 steps), 1 on CPU (no gain there, and per-batch progress stays exact). Several GPUs:
    MirroredStrategy."""
    import tensorflow as tf

    threads = len(os.sched_getaffinity(0)) if cfg["threads"] == "auto" else cfg["threads"]
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError:  # the runtime already runs (tests, notebooks): keep its pools
        threads = tf.config.threading.get_intra_op_parallelism_threads() or threads
    gpus = tf.config.list_physical_devices("GPU")
    policy = "float32"
    if cfg["mixed_precision"] == "on" or (cfg["mixed_precision"] == "auto" and gpus):
        major = 0
        if gpus:
            details = tf.config.experimental.get_device_details(gpus[0])
            major = (details.get("compute_capability") or (0, 0))[0]
        policy = "mixed_bfloat16" if not gpus or major >= 8 else "mixed_float16"
    jit = cfg["jit_compile"]
    jit = bool(gpus) if jit == "auto" else bool(jit)
    steps = cfg["steps_per_execution"]
    steps = (32 if gpus else 1) if steps == "auto" else steps
    logical = tf.config.list_logical_devices("GPU")
    strategy = (
        tf.distribute.MirroredStrategy() if len(logical) > 1 else (tf.distribute.get_strategy())
    )
    return {
        "policy": policy,
        "jit_compile": jit,
        "steps_per_execution": steps,
        "threads": threads,
        "strategy": strategy,
        "gpus": len(gpus),
    }


def compile_for_training(fitted, learning_rate, accel: dict[str, Any]) -> None:
    """The train stage's compile (Adam, sparse cross-entropy, accuracy) with the resolved
    XLA and steps-per-execution settings; the training benchmark compiles the same way."""
    fitted.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        jit_compile=accel["jit_compile"],
        steps_per_execution=accel["steps_per_execution"],
    )


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


def log_keras_model(model, example: np.ndarray) -> str:
    """`mlflow.keras.log_model` with a signature, an input example and pinned requirements;
    return the logged model's id."""
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
        info = mlflow.keras.log_model(
            model,
            name="model",
            signature=infer_signature(example, model.predict(example, verbose=0)),
            input_example=example,
            pip_requirements=tracking.pinned_requirements(),
        )
    finally:
        keras_save._save_example = original
    return info.model_id


def settings_for(name: str, params: dict[str, Any]) -> tuple[dict, dict]:
    """(training settings with the model's overrides applied, builder kwargs) of `name`."""
    from cxr.models import TRAINING_KEYS

    model_cfg = params["models"][name]
    cfg = {**params["train"], **{k: model_cfg[k] for k in TRAINING_KEYS if k in model_cfg}}
    return cfg, {k: v for k, v in model_cfg.items() if k not in TRAINING_KEYS}


def train(
    name: str, params: dict[str, Any], prepared: Path, out_dir: Path, report_dir: Path
) -> dict[str, Any]:
    """Train architecture `name`: model, curves and TensorBoard logs in `out_dir`; history,
    metrics and the MLflow run record in `report_dir`."""
    import mlflow
    import tensorflow as tf

    from cxr.augment import make_augmenter, served_part, training_model
    from cxr.models import build_model

    phases = Phases(f"train@{name}")
    cfg, builder_cfg = settings_for(name, params)
    accel = accelerator_settings(cfg)  # first: thread pools are set before TensorFlow starts
    keras.utils.set_random_seed(cfg["seed"])
    tf.config.experimental.enable_op_determinism()
    keras.mixed_precision.set_dtype_policy(accel["policy"])

    x_train, y_train, summary = split_arrays(prepared, "train")
    x_val, y_val, _ = split_arrays(prepared, "val")
    classes = summary["classes"]
    batch = cfg["batch_size"] * accel["strategy"].num_replicas_in_sync
    weights = None
    if cfg["imbalance"] == "class_weight":
        weights = class_weights(y_train, len(classes))
    elif cfg["imbalance"] == "oversample":
        keep = oversample(y_train, len(classes), cfg["seed"])
        x_train, y_train = x_train[keep], y_train[keep]
    train_ds = make_dataset(x_train, y_train, batch, True, cfg["seed"])
    val_ds = make_dataset(x_val, y_val, batch, False, cfg["seed"])
    phases.done("data")

    # A killed training resumes from its last checkpoint, into the same MLflow run. The
    # checkpoint lives under the user's repository (not in the stage's outputs, which a `dvc
    # exp run --temp` copy would take with it), keyed by everything that shapes the training.
    key = hashlib.sha256(
        json.dumps([name, cfg, builder_cfg, summary["fingerprint"]], sort_keys=True).encode()
    ).hexdigest()[:16]
    checkpoint = tracking.repo_root() / ".cache" / "checkpoints" / f"{name}-{key}"
    resumed = (checkpoint / "run_id").read_text() if (checkpoint / "run_id").is_file() else None
    with accel["strategy"].scope():
        restored, epochs_done, history = load_checkpoint(checkpoint)
        if resumed and (restored is None or tracking.find_run(resumed) is None):
            shutil.rmtree(checkpoint)  # nothing usable to resume, or its run is not in this store
            restored, epochs_done, history, resumed = None, 0, {}, None
        # `fitted` is what fit trains: the model behind the augmentation layer, sharing its
        # weights; `model`, without the layer, is what is saved, logged and served.
        fitted = restored  # a restored model comes compiled, with its optimizer state
        if fitted is None:
            model = build_model(name, x_train.shape[1:], len(classes), **builder_cfg)
            fitted = training_model(model, make_augmenter(cfg["augment"], cfg["seed"]))
            lr = cfg["learning_rate"]
            if cfg["schedule"] == "cosine":
                steps = cfg["epochs"] * int(np.ceil(len(x_train) / batch))
                lr = keras.optimizers.schedules.CosineDecay(lr, decay_steps=steps)
            compile_for_training(fitted, lr, accel)
        model = served_part(fitted)
    checkpoint.mkdir(parents=True, exist_ok=True)
    phases.done("build")

    run_params = {
        **{f"train.{k}": v for k, v in flatten(cfg).items() if k != "models"},
        **{f"model.{k}": v for k, v in flatten(builder_cfg).items()},
        "model.name": name,
        "data.classes": ",".join(classes),
        "data.image_size": summary["image_size"],
        "data.n_train": len(x_train),
        "data.n_val": len(x_val),
        "runtime.dtype_policy": accel["policy"],
        "runtime.jit_compile": accel["jit_compile"],
        "runtime.replicas": accel["strategy"].num_replicas_in_sync,
        "runtime.steps_per_execution": accel["steps_per_execution"],
        "runtime.threads": accel["threads"],
    }
    tags = tracking.run_tags(stage=f"train@{name}", data_fingerprint=summary["fingerprint"])
    epoch_times = EpochTimer()
    saver = EpochCheckpoint(checkpoint, history, cfg["checkpoint_seconds"])
    with tracking.start_run(params["mlflow"]["experiment"], name, tags, run_id=resumed) as run:
        (checkpoint / "run_id").write_text(run.info.run_id)
        if resumed:
            print(f"train@{name}: resuming MLflow run {resumed} after epoch {epochs_done}")
        mlflow.log_params(run_params)
        mlflow.log_metric("param_count", model.count_params())
        mlflow.log_input(
            mlflow.data.from_numpy(
                y_train,
                source=str(prepared),
                name="prepared-train",
                digest=summary["fingerprint"][:16],
            ),
            context="training",
        )
        started = time.perf_counter()
        fit = fitted.fit(
            train_ds,
            validation_data=val_ds,
            epochs=cfg["epochs"],
            initial_epoch=epochs_done,
            class_weight=weights,
            callbacks=[
                keras.callbacks.EarlyStopping(
                    monitor="val_loss",
                    patience=cfg["early_stopping_patience"],
                    restore_best_weights=True,
                ),
                epoch_times,
                saver,
                mlflow.keras.MlflowCallback(),
                keras.callbacks.TensorBoard(str(out_dir / "tensorboard")),
            ],
            verbose=2,
        )
        seconds = time.perf_counter() - started
        phases.done("fit")
        phases.move("fit", "checkpoints", saver.seconds)
        if not history:  # no epoch ran (already complete): keras' own record
            history = {k: [float(v) for v in vals] for k, vals in fit.history.items()}
        best = int(np.argmin(history["val_loss"]))
        steady = epoch_times.seconds[1:] or epoch_times.seconds  # the first epoch compiles
        # Deterministic figures go to DVC's metrics (a rerun gives an empty metrics diff);
        # timings vary run to run and go to MLflow only.
        metrics = {
            "val_loss": history["val_loss"][best],
            "val_accuracy": history["val_accuracy"][best],
            "best_epoch": best + 1,
            "epochs_run": len(history["loss"]),
            "param_count": model.count_params(),
        }
        timing = {
            "train_seconds": round(seconds, 2),
            "epoch_seconds": round(float(np.median(steady)), 3),
            "train_images_per_second": round(len(x_train) / float(np.median(steady)), 1),
        }
        mlflow.log_metrics(
            {f"best_{k}" if k.startswith("val_") else k: v for k, v in metrics.items()} | timing
        )

        out_dir.mkdir(parents=True, exist_ok=True)
        report_dir.mkdir(parents=True, exist_ok=True)
        write_history(history, report_dir / "history.csv")
        plot_curves(history, out_dir / "curves.png", f"{name}: learning curves")
        mlflow.log_artifact(str(out_dir / "curves.png"))
        mlflow.log_artifact(str(report_dir / "history.csv"))
        mlflow.log_artifacts(str(out_dir / "tensorboard"), artifact_path="tensorboard")

        model_id = log_keras_model(model, x_val[:1])
        with atomic_path(out_dir / "model.keras") as tmp:
            model.save(tmp)
        tracking.write_run_record(report_dir / "mlflow_run.json", run, model_id=model_id)
        phases.done("logging")
        mlflow.log_metrics(phases.metrics())
    write_json(report_dir / "train.json", metrics)
    shutil.rmtree(checkpoint, ignore_errors=True)
    print(phases.line())
    return metrics | timing


def load_checkpoint(folder: Path) -> tuple[Any, int, dict[str, list[float]]]:
    """(model with optimizer state, epochs done, history so far) of a killed training, or
    (None, 0, {}) when there is none or it cannot be read."""
    state_path = folder / "state.json"
    if not state_path.is_file():
        return None, 0, {}
    state = read_json(state_path)
    try:
        model = keras.saving.load_model(folder / state["model"])
    except Exception as err:  # an unreadable checkpoint means: start over
        print(f"checkpoint {folder} unreadable ({err}); training from the start")
        return None, 0, {}
    return model, state["epochs_done"], state["history"]


class EpochCheckpoint(keras.callbacks.Callback):
    """At the end of an epoch, once `interval` seconds have passed since the last save (or
    the start), save the model (with its optimizer state) and the history so far, each
    atomically: a kill at any moment leaves a complete epoch to resume from, and loses at
    most `interval` seconds plus one epoch of training. `interval` 0: every epoch."""

    def __init__(self, folder: Path, history: dict[str, list[float]], interval: float):
        super().__init__()
        self.folder, self.history, self.interval = folder, history, interval
        self.seconds = 0.0  # spent saving, in all
        self._last = time.perf_counter()

    def on_train_begin(self, logs=None):
        self._last = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        for key, value in (logs or {}).items():
            if key != "learning_rate":
                self.history.setdefault(key, []).append(float(value))
        started = time.perf_counter()
        if started - self._last < self.interval:
            return
        path = self.folder / f"epoch-{epoch + 1}.keras"
        with atomic_path(path) as tmp:
            self.model.save(tmp)
        state = {"epochs_done": epoch + 1, "model": path.name, "history": self.history}
        write_json(self.folder / "state.json", state)
        for old in self.folder.glob("epoch-*.keras"):
            if old != path:
                old.unlink()
        self._last = time.perf_counter()
        self.seconds += self._last - started


class EpochTimer(keras.callbacks.Callback):
    """Wall seconds of each epoch."""

    def __init__(self):
        super().__init__()
        self.seconds: list[float] = []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self._start)
