"""Resume a killed training: its checkpoint folder, what it holds and how it is saved.

A training saves, at an epoch's end once `checkpoint_seconds` have passed, its training model
(with the optimizer's state) and the history so far, each atomically; the folder also names
the MLflow run the training logs to, so a resumed training continues that run. The folder
lives under the user's repository (`.cache/checkpoints/`, not in the stage's outputs, which a
`dvc exp run --temp` copy would take with it), keyed by everything that shapes the training.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import keras
import numpy as np

from cxr.files import atomic_path, read_json, write_json
from cxr.fit import EarlyStopping, EpochHistory, Resume


class Checkpoint:
    """The checkpoint folder of one training configuration."""

    def __init__(self, root: Path, name: str, key_parts: list[Any]):
        key = hashlib.sha256(json.dumps([name, *key_parts], sort_keys=True).encode()).hexdigest()
        self.folder = root / f"{name}-{key[:16]}"

    @property
    def run_id(self) -> str | None:
        """The MLflow run this training logs to, once it has started one."""
        path = self.folder / "run_id"
        return path.read_text() if path.is_file() else None

    def start(self, run_id: str) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "run_id").write_text(run_id)

    def load(self) -> Resume | None:
        """Where the killed training stopped, or None when nothing was saved or the saved
        model cannot be read (then the training starts over). Call under the distribution's
        scope the training runs in."""
        state_path = self.folder / "state.json"
        if not state_path.is_file():
            return None
        state = read_json(state_path)
        import cxr.augment  # noqa: F401  registers the training model's augmentation layer

        try:
            fitted = keras.saving.load_model(self.folder / state["model"])
            stopping = state.get("early_stopping")
            if stopping and stopping["best_weights"]:
                with np.load(self.folder / stopping["best_weights"]) as saved:
                    stopping["best_weights"] = [saved[f"w{i}"] for i in range(len(saved.files))]
        except Exception as err:  # an unreadable checkpoint means: start over
            print(f"checkpoint {self.folder} unreadable ({err}); training from the start")
            return None
        return Resume(fitted, state["epochs_done"], state["history"], stopping)

    def saver(
        self,
        history: dict[str, list[float]],
        interval: float,
        stopper: EarlyStopping | None = None,
    ) -> EpochCheckpoint:
        """The callback that saves this training, continuing `history`, with `stopper`'s
        state (put it before the saver in the callbacks)."""
        return EpochCheckpoint(self.folder, history, interval, stopper)

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


class EpochCheckpoint(EpochHistory):
    """At the end of an epoch, once `interval` seconds have passed since the last save (or
    the start), save the model (with its optimizer state), the history so far and early
    stopping's state (with its best weights), each atomically: a kill at any moment leaves
    a complete epoch to resume from, and loses at most `interval` seconds plus one epoch of
    training. `interval` 0: every epoch."""

    def __init__(
        self,
        folder: Path,
        history: dict[str, list[float]],
        interval: float,
        stopper: EarlyStopping | None = None,
    ):
        super().__init__(history)
        self.folder, self.interval, self.stopper = folder, interval, stopper
        self.seconds = 0.0  # spent saving, in all
        self._last = time.perf_counter()

    def on_train_begin(self, logs=None):
        self._last = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch, logs)
        started = time.perf_counter()
        if started - self._last < self.interval:
            return
        path = self.folder / f"epoch-{epoch + 1}.keras"
        with atomic_path(path) as tmp:
            self.model.save(tmp)
        state = {"epochs_done": epoch + 1, "model": path.name, "history": self.history}
        if self.stopper is not None:
            stopping = self.stopper.state()
            if stopping["best_weights"] is not None:
                # the best epoch's weights, written once per best epoch
                best = self.folder / f"best-{stopping['best_epoch'] + 1}.npz"
                if not best.exists():
                    with atomic_path(best) as tmp, open(tmp, "wb") as f:
                        weights = stopping["best_weights"]
                        np.savez(f, **{f"w{i}": w for i, w in enumerate(weights)})
                stopping["best_weights"] = best.name
            state["early_stopping"] = stopping
        mlflow = sys.modules.get("mlflow")
        if mlflow is not None:  # MlflowCallback (before this one) logs asynchronously: the
            mlflow.flush_async_logging()  # epoch's metrics reach MLflow before it is "done"
        write_json(self.folder / "state.json", state)  # the commit point: all of it or none
        for old in [*self.folder.glob("epoch-*.keras"), *self.folder.glob("best-*.npz")]:
            if old.name not in (path.name, state.get("early_stopping", {}).get("best_weights")):
                old.unlink()
        self._last = time.perf_counter()
        self.seconds += self._last - started
