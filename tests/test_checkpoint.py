from pathlib import Path

import keras
import numpy as np
import pytest

from cxr.checkpoint import Checkpoint
from cxr.files import read_json
from cxr.models import build_model


def compiled_model():
    model = build_model("cnn", (16, 16, 1), 4, filters=[4], dense_units=4)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    return model


X = np.random.default_rng(0).integers(0, 256, (8, 16, 16, 1)).astype(np.uint8)
Y = np.arange(8) % 4


def test_the_folder_is_keyed_by_everything_that_shapes_the_training(tmp_path):
    cfg = {"epochs": 3, "seed": 0}
    a = Checkpoint(tmp_path, "cnn", [cfg, {"filters": [4]}, "fingerprint"])
    assert (
        a.folder
        == Checkpoint(
            tmp_path, "cnn", [dict(reversed(cfg.items())), {"filters": [4]}, "fingerprint"]
        ).folder
    )
    assert a.folder.parent == tmp_path and a.folder.name.startswith("cnn-")
    for other in (
        Checkpoint(tmp_path, "cnn4_bn", [cfg, {"filters": [4]}, "fingerprint"]),
        Checkpoint(tmp_path, "cnn", [{**cfg, "seed": 1}, {"filters": [4]}, "fingerprint"]),
        Checkpoint(tmp_path, "cnn", [cfg, {"filters": [8]}, "fingerprint"]),
        Checkpoint(tmp_path, "cnn", [cfg, {"filters": [4]}, "other data"]),
    ):
        assert other.folder != a.folder


@pytest.mark.parametrize("interval, saves", [(0, True), (3600, False)])
def test_checkpoints_are_saved_once_their_interval_has_passed(tmp_path, interval, saves):
    checkpoint = Checkpoint(tmp_path, "cnn", [])
    checkpoint.start("run-1")
    saver = checkpoint.saver({"loss": [9.0]}, interval)  # one epoch done before
    model = compiled_model()
    model.fit(X, Y, epochs=3, initial_epoch=1, callbacks=[saver], verbose=0)
    assert len(saver.history["loss"]) == 3  # the history is kept every epoch either way
    files = sorted(p.name for p in checkpoint.folder.iterdir())
    if saves:
        assert read_json(checkpoint.folder / "state.json")["epochs_done"] == 3
        assert files == ["epoch-3.keras", "run_id", "state.json"]
        assert saver.seconds > 0
        resume = checkpoint.load()
        assert resume.epochs_done == 3 and resume.history["loss"][0] == 9.0
        np.testing.assert_allclose(resume.fitted.predict(X, verbose=0), model.predict(X, verbose=0))
        assert resume.fitted.optimizer.iterations.numpy() == model.optimizer.iterations.numpy()
    else:
        assert files == ["run_id"] and saver.seconds == 0
        assert checkpoint.load() is None
    assert checkpoint.run_id == "run-1"


def test_an_unreadable_checkpoint_means_starting_over(tmp_path, capsys):
    checkpoint = Checkpoint(tmp_path, "cnn", [])
    assert checkpoint.run_id is None and checkpoint.load() is None
    checkpoint.start("run-1")
    saver = checkpoint.saver({}, 0)
    compiled_model().fit(X, Y, epochs=1, callbacks=[saver], verbose=0)
    (checkpoint.folder / "epoch-1.keras").write_bytes(b"cut short")
    assert checkpoint.load() is None
    assert "unreadable" in capsys.readouterr().out
    checkpoint.remove()
    assert not checkpoint.folder.exists()
    checkpoint.remove()  # removing twice is fine


def test_a_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    """A kill while saving leaves the previous epoch's checkpoint whole."""
    checkpoint = Checkpoint(tmp_path, "cnn", [])
    checkpoint.start("run-1")
    model = compiled_model()
    model.fit(X, Y, epochs=1, callbacks=[checkpoint.saver({}, 0)], verbose=0)

    def killed(self, path, *args, **kwargs):
        Path(path).write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(keras.Model, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        model.fit(X, Y, epochs=2, initial_epoch=1, callbacks=[checkpoint.saver({}, 0)], verbose=0)
    monkeypatch.undo()
    assert checkpoint.load().epochs_done == 1
    assert sorted(p.name for p in checkpoint.folder.iterdir()) == [
        "epoch-1.keras",
        "run_id",
        "state.json",
    ]


def test_a_resumed_training_keeps_the_best_weights_of_the_whole_run(tmp_path):
    """Early stopping's best weights and state survive a resume: the final model is the
    reported best epoch's, also when that epoch came before the kill."""
    from cxr.fit import early_stopping, fit
    from tests.test_fit import CFG, CPU, TINY, tiny_split

    accel = dict(CPU)
    train, val = tiny_split(48, 0), tiny_split(12, 1)
    cfg = {**CFG, "epochs": 3, "early_stopping_patience": 10}
    checkpoint = Checkpoint(tmp_path, "cnn", [])
    checkpoint.start("run-1")
    stopper = early_stopping(cfg)
    saver = checkpoint.saver({}, 0, stopper)
    fit("cnn", cfg, TINY, train, val, 3, accel, callbacks=[saver], stopper=stopper, progress=False)
    resume = checkpoint.load()
    assert resume.epochs_done == 3 and resume.early_stopping["best_epoch"] <= 2
    assert len(list(checkpoint.folder.glob("best-*.npz"))) == 1
    # after the "kill", a learning rate that wrecks the model: the best epoch stays early
    resume.fitted.optimizer.learning_rate.assign(50.0)
    more = {**cfg, "epochs": 5}
    result = fit("cnn", more, TINY, train, val, 3, accel, resume=resume, progress=False)
    assert result.best_epoch <= 3 and len(result.history["val_loss"]) == 5
    loss, _ = result.fitted.evaluate(*val, verbose=0)
    assert loss == pytest.approx(result.history["val_loss"][result.best_epoch - 1], rel=1e-4)
