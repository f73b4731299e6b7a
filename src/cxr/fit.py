"""Fit one configuration on given arrays: the one training loop that the train stage, the
training benchmark and a hyper-parameter search all call.

`fit` builds (or resumes) the model, trains it with early stopping and returns what happened;
it starts no MLflow run and writes no file. What a caller records (MLflow, checkpoints,
TensorBoard) goes in as Keras callbacks.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

import keras
import numpy as np

from cxr import backend


def settings_for(name: str, params: dict[str, Any]) -> tuple[dict, dict]:
    """(training settings with the model's overrides applied, builder kwargs) of `name`."""
    from cxr.models import LUNG_FOCUS_KEYS, TRAINING_KEYS

    model_cfg = params["models"][name]
    own = {k: model_cfg[k] for k in TRAINING_KEYS if model_cfg.get(k) is not None}  # null: train's
    cfg = {**params["train"], **own}
    own_augment = {k: v for k, v in (model_cfg.get("augment") or {}).items() if v is not None}
    cfg["augment"] = {**params["train"]["augment"], **own_augment}
    # train.lung_focus* are part of every model's graph: builder settings (a model's own win).
    builder = {k: cfg.pop(k) for k in LUNG_FOCUS_KEYS}
    builder |= {k: model_cfg[k] for k in LUNG_FOCUS_KEYS if model_cfg.get(k) is not None}
    skip = (*TRAINING_KEYS, *LUNG_FOCUS_KEYS)
    return cfg, builder | {k: v for k, v in model_cfg.items() if k not in skip}


def accelerator_settings(cfg: dict[str, Any]) -> dict[str, Any]:
    """Resolve the `auto` settings from the Keras backend (cxr.backend) and its devices.

    Threads (`threads`): every core this process may use (its CPU affinity, which follows
    taskset and container CPU sets, not the host's count); TensorFlow's two pools are set
    before its runtime starts. Mixed precision: bfloat16 on GPUs that have it (compute
    capability 8.0+), else float16; off on CPU. Deterministic ops: on without a GPU, off
    with one (measured on an H200 with JAX: determinism costs 40-70 % of the speed).
    XLA (jit_compile): on with a GPU; on TensorFlow never with deterministic ops (Keras 3
    turns it off then; resolving it here keeps the logged value true); on JAX always unless
    set false (JAX without XLA runs op by op). `steps_per_execution`: 32 batches per
    host round trip with a GPU (one compiled loop on TensorFlow; on JAX, Keras 3.15 queues
    32 compiled steps and syncs once), 1 on CPU (no gain there, and per-batch progress
    stays exact). Several devices: `distribution` (cxr.backend)."""
    if cfg["deterministic"] is True:
        backend.request_determinism()  # before JAX starts: XLA reads its flags once
    threads = len(os.sched_getaffinity(0)) if cfg["threads"] == "auto" else cfg["threads"]
    threads = backend.set_threads(threads)
    gpus = backend.gpu_capabilities()
    policy = "float32"
    if cfg["mixed_precision"] is True or (cfg["mixed_precision"] == "auto" and gpus):
        policy = "mixed_bfloat16" if not gpus or min(gpus) >= 8 else "mixed_float16"
    deterministic = cfg["deterministic"]
    deterministic = not gpus if deterministic == "auto" else bool(deterministic)
    jit = cfg["jit_compile"]
    if backend.name() == "jax":
        jit = jit in ("auto", True)
    else:
        jit = (bool(gpus) if jit == "auto" else bool(jit)) and not deterministic
    steps = cfg["steps_per_execution"]
    steps = (32 if gpus else 1) if steps == "auto" else steps
    dist = backend.distribution()
    return {
        "backend": backend.name(),
        "policy": policy,
        "deterministic": deterministic,
        "jit_compile": jit,
        "steps_per_execution": steps,
        "threads": threads,
        "distribution": dist,
        "replicas": backend.replicas(dist),
        "gpus": len(gpus),
    }


def make_dataset(
    x: np.ndarray, y: np.ndarray, batch_size: int, shuffle: bool, seed: int, steps: int = 0
):
    """Batches of the cached uint8 arrays, shuffled for training, for the backend that runs:
    tf.data on TensorFlow (its own prefetching thread), `ArrayBatches` on the others (Keras
    puts each batch on the device one step ahead). `steps`: epochs of that many batches,
    running on through the data (benchmarks; pass the same `steps_per_epoch` to fit). No
    per-image work on the host: augmentation runs inside the training step (cxr.augment)."""
    if backend.name() != "tensorflow":
        return ArrayBatches(x, y, batch_size, shuffle, seed, steps)
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices((x, y))
    if shuffle:
        ds = ds.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)
    return (ds.repeat() if steps else ds).prefetch(tf.data.AUTOTUNE)


class ArrayBatches(keras.utils.PyDataset):
    """uint8 image batches with their labels, in a new seeded order each epoch when
    `shuffle`; the last batch may be short. `steps` (benchmarks) sets the epoch's length,
    wrapping around the data. Each epoch's order is one contiguous copy made when the
    epoch ends, so a batch is a slice of it, not a gather."""

    def __init__(self, x, y, batch_size: int, shuffle: bool, seed: int, steps: int = 0):
        super().__init__()
        self.x, self.y, self.batch_size, self.shuffle = x, y, batch_size, shuffle
        self.full = int(np.ceil(len(x) / batch_size))
        self.steps = steps or self.full
        self.rng = np.random.default_rng(seed)
        self.xs, self.ys = x, y
        self.on_epoch_end()

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, index: int):
        start = (index % self.full) * self.batch_size
        return self.xs[start : start + self.batch_size], self.ys[start : start + self.batch_size]

    def on_epoch_end(self) -> None:
        if self.shuffle:
            order = self.rng.permutation(len(self.x))
            self.xs, self.ys = self.x[order], self.y[order]


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


def set_runtime(seed: int, accel: dict[str, Any]) -> None:
    """Seed Keras, NumPy and the backend; turn deterministic ops on when accel says so and
    set the precision policy: what fit does before it builds a model. TensorFlow has no
    public way to turn determinism off again: in a process where a deterministic training
    ran, later ones stay deterministic (and so without XLA; the stage runs one training
    per process, and LogRuntime logs what the model really does)."""
    keras.utils.set_random_seed(seed)
    if accel["deterministic"]:
        backend.make_deterministic()
    keras.mixed_precision.set_dtype_policy(accel["policy"])


def build_for_training(
    name: str,
    cfg: dict[str, Any],
    builder_cfg: dict[str, Any],
    input_shape: tuple[int, ...],
    n_classes: int,
    steps_per_epoch: int,
    accel: dict[str, Any],
) -> keras.Model:
    """The compiled training model of `name`: the augmentation layer (cfg's `augment`) in
    front of the built architecture, Adam at cfg's learning rate (cosine-decayed over
    `epochs * steps_per_epoch` steps with `schedule: cosine`), sparse cross-entropy and
    accuracy, with the resolved XLA and steps-per-execution settings. Build it under
    `backend.scope(accel["distribution"])`."""
    from cxr.augment import make_augmenter, training_model
    from cxr.models import build_model

    model = build_model(name, input_shape, n_classes, **builder_cfg)
    fitted = training_model(model, make_augmenter(cfg["augment"], cfg["seed"]))
    lr = cfg["learning_rate"]
    if cfg["schedule"] == "cosine":
        lr = keras.optimizers.schedules.CosineDecay(lr, decay_steps=cfg["epochs"] * steps_per_epoch)
    fitted.compile(
        optimizer=keras.optimizers.Adam(lr),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        jit_compile=accel["jit_compile"],
        steps_per_execution=accel["steps_per_execution"],
    )
    return fitted


@dataclass
class Resume:
    """Where a killed training stopped: its training model (compiled, with the optimizer's
    state), the epochs done, their history and early stopping's state (best loss, epoch
    and weights so far, epochs without improvement)."""

    fitted: keras.Model
    epochs_done: int
    history: dict[str, list[float]] = field(default_factory=dict)
    early_stopping: dict[str, Any] | None = None


class EarlyStopping(keras.callbacks.EarlyStopping):
    """Keras' early stopping on the validation loss, best weights restored at the end, that
    continues from a saved `state()` (a resumed training keeps the best weights of the whole
    run, not of its resumed part)."""

    def __init__(self, patience: int, state: dict[str, Any] | None = None):
        super().__init__(monitor="val_loss", patience=patience, restore_best_weights=True)
        self._resumed = state

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        if self._resumed:
            self.wait = self._resumed["wait"]
            self.best = self._resumed["best"]
            self.best_epoch = self._resumed["best_epoch"]
            self.best_weights = self._resumed["best_weights"]

    def state(self) -> dict[str, Any]:
        return {
            "wait": self.wait,
            "best": None if self.best is None else float(self.best),
            "best_epoch": self.best_epoch,
            "best_weights": self.best_weights,
        }


def early_stopping(cfg: dict[str, Any], resume: Resume | None = None) -> EarlyStopping:
    """The early stopping `fit` uses for `cfg`, continuing `resume`'s."""
    return EarlyStopping(cfg["early_stopping_patience"], resume.early_stopping if resume else None)


@dataclass
class Fitted:
    """What `fit` returns. `model` (the architecture, without the augmentation layer) is what
    is saved, logged and served; `fitted` is the training model around it, sharing its
    weights. `history` holds every epoch (a resumed training's earlier ones included), with
    the best epoch's weights restored; the times are of this call's epochs."""

    model: keras.Model
    fitted: keras.Model
    history: dict[str, list[float]]
    images_per_epoch: int
    epoch_seconds: list[float]
    build_seconds: float
    fit_seconds: float

    @property
    def best_epoch(self) -> int:
        """1-based epoch of the lowest validation loss (the weights early stopping keeps)."""
        return int(np.argmin(self.history["val_loss"])) + 1


def fit(
    name: str,
    cfg: dict[str, Any],
    builder_cfg: dict[str, Any],
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    n_classes: int,
    accel: dict[str, Any],
    *,
    callbacks: list[keras.callbacks.Callback] = (),
    resume: Resume | None = None,
    steps_per_epoch: int | None = None,
    progress: bool = True,
    stopper: EarlyStopping | None = None,
) -> Fitted:
    """Train architecture `name` with settings `cfg` (`settings_for`) on the uint8 arrays
    `train` and `val` (images, labels). Sets the runtime (`set_runtime`: seed, determinism,
    precision as accel says), balances the training split as cfg's `imbalance` says, builds
    the model (or continues `resume`) and fits up to cfg's `epochs` with early stopping on
    the validation loss, best weights restored. `callbacks` run after the loop's own (early
    stopping, epoch timer, epoch line).
    `steps_per_epoch`: fixed-length epochs over the repeated training data (benchmarks).
    `progress`: one line per epoch on stdout. `stopper`: the `early_stopping(cfg, resume)`
    to use, when a callback (a checkpoint) must see its state."""
    set_runtime(cfg["seed"], accel)
    started = time.perf_counter()
    x_train, y_train = train
    weights = None
    if cfg["imbalance"] == "class_weight":
        weights = class_weights(y_train, n_classes)
    elif cfg["imbalance"] == "oversample":
        keep = oversample(y_train, n_classes, cfg["seed"])
        x_train, y_train = x_train[keep], y_train[keep]
    batch = cfg["batch_size"] * accel["replicas"]
    train_ds = make_dataset(x_train, y_train, batch, True, cfg["seed"], steps_per_epoch or 0)
    val_ds = make_dataset(*val, batch, False, cfg["seed"])
    if resume is None:
        with backend.scope(accel["distribution"]):
            steps = steps_per_epoch or int(np.ceil(len(x_train) / batch))
            fitted = build_for_training(
                name, cfg, builder_cfg, x_train.shape[1:], n_classes, steps, accel
            )
    else:
        fitted = resume.fitted
    build_seconds = time.perf_counter() - started

    from cxr.augment import served_part

    timer = EpochTimer()
    recorder = EpochHistory(resume.history if resume else None)
    started = time.perf_counter()
    fitted.fit(
        train_ds,
        validation_data=val_ds,
        epochs=cfg["epochs"],
        initial_epoch=resume.epochs_done if resume else 0,
        steps_per_epoch=steps_per_epoch,
        class_weight=weights,
        callbacks=[
            stopper or early_stopping(cfg, resume),
            timer,
            recorder,
            *([EpochLine(f"train@{name}", cfg["epochs"], timer, recorder)] if progress else []),
            *callbacks,
        ],
        shuffle=False,  # the dataset shuffles itself (Keras ignores and warns otherwise)
        verbose=0,
    )
    return Fitted(
        model=served_part(fitted),
        fitted=fitted,
        history=recorder.history,
        images_per_epoch=len(x_train),
        epoch_seconds=timer.seconds,
        build_seconds=build_seconds,
        fit_seconds=time.perf_counter() - started,
    )


class EpochHistory(keras.callbacks.Callback):
    """Every epoch's figures, continuing `history`: Keras' logs less the learning rate (a
    setting, not a result). What fit returns and what a checkpoint saves."""

    def __init__(self, history: dict[str, list[float]] | None = None):
        super().__init__()
        self.history = {k: list(v) for k, v in (history or {}).items()}

    def on_epoch_end(self, epoch, logs=None):
        for key, value in (logs or {}).items():
            if key != "learning_rate":
                self.history.setdefault(key, []).append(float(value))


class EpochLine(keras.callbacks.Callback):
    """One line per epoch: `train@cnn epoch 3/20: loss 1.0421, accuracy 0.5512, val_loss
    1.1034, val_accuracy 0.5000 (2.1 s)` (Keras' own verbose=2 prints two). Put it after
    the timer and the recorder."""

    def __init__(self, prefix: str, epochs: int, timer: EpochTimer, recorder: EpochHistory):
        super().__init__()
        self.prefix, self.epochs, self.timer, self.recorder = prefix, epochs, timer, recorder

    def on_epoch_end(self, epoch, logs=None):
        figures = ", ".join(f"{k} {v[-1]:.4f}" for k, v in self.recorder.history.items())
        seconds = self.timer.seconds[-1] if self.timer.seconds else float("nan")
        print(
            f"{self.prefix} epoch {epoch + 1}/{self.epochs}: {figures} ({seconds:.1f} s)",
            flush=True,
        )


class EpochTimer(keras.callbacks.Callback):
    """Wall seconds of each epoch."""

    def __init__(self):
        super().__init__()
        self.seconds: list[float] = []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self._start)
