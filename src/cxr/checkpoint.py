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
import time
from pathlib import Path
from typing import Any

import keras

from cxr.fit import Resume
from cxr.io import atomic_path, read_json, write_json


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
        model cannot be read (then the training starts over). Call under the strategy's
        scope the training runs in."""
        state_path = self.folder / "state.json"
        if not state_path.is_file():
            return None
        state = read_json(state_path)
        import cxr.augment  # noqa: F401  registers the training model's augmentation layer

        try:
            fitted = keras.saving.load_model(self.folder / state["model"])
        except Exception as err:  # an unreadable checkpoint means: start over
            print(f"checkpoint {self.folder} unreadable ({err}); training from the start")
            return None
        return Resume(fitted, state["epochs_done"], state["history"])

    def saver(self, history: dict[str, list[float]], interval: float) -> EpochCheckpoint:
        """The callback that saves this training, continuing `history`."""
        return EpochCheckpoint(self.folder, history, interval)

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


class EpochCheckpoint(keras.callbacks.Callback):
    """At the end of an epoch, once `interval` seconds have passed since the last save (or
    the start), save the model (with its optimizer state) and the history so far, each
    atomically: a kill at any moment leaves a complete epoch to resume from, and loses at
    most `interval` seconds plus one epoch of training. `interval` 0: every epoch."""

    def __init__(self, folder: Path, history: dict[str, list[float]], interval: float):
        super().__init__()
        self.folder, self.interval = folder, interval
        self.history = {k: list(v) for k, v in history.items()}
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
