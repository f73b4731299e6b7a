import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

from cxr.augment import RandomRadiograph, served_part
from cxr.fit import (
    Resume,
    accelerator_settings,
    class_weights,
    fit,
    make_dataset,
    settings_for,
)
from tests.conftest import ROOT
from tests.test_augment import NO_AUGMENT

BACKEND = keras.backend.backend()
TENSORFLOW_ONLY = pytest.mark.skipif(BACKEND != "tensorflow", reason="TensorFlow's own API")
JAX_ONLY = pytest.mark.skipif(BACKEND != "jax", reason="JAX's own API")


def test_balanced_class_weights_equalise_the_classes():
    y = np.array([0] * 60 + [1] * 30 + [2] * 10)
    w = class_weights(y, 3)
    totals = [w[k] * np.sum(y == k) for k in range(3)]
    assert np.allclose(totals, totals[0])
    assert w[2] > w[1] > w[0]


def test_model_overrides_win_for_that_model_only():
    params = {
        "train": {
            "epochs": 30,
            "learning_rate": 1e-3,
            "batch_size": 32,
            "augment": {"zoom": 0.1, "shift": 0.05},
            "lung_focus": "template",
            "lung_focus_margin": -0.02,
        },
        "models": {
            "resnet50v2": {"weights": "none", "epochs": 12, "augment": {"zoom": 0.0}},
            "cnn": {"filters": [8], "epochs": None, "lung_focus": None, "augment": None},
            "cnn4_bn": {
                "filters": [8],
                "lung_focus_margin": 0.05,
                "augment": {"zoom": None, "shift": 0.2},
            },
        },
    }
    focus = {"lung_focus": "template", "lung_focus_margin": -0.02}
    cfg, builder = settings_for("resnet50v2", params)
    assert cfg["epochs"] == 12 and builder == {"weights": "none", **focus}
    assert not set(focus) & set(cfg)  # builder settings, logged once
    assert cfg["augment"] == {"zoom": 0.0, "shift": 0.05}  # the model's keys, train's others
    cfg, builder = settings_for("cnn", params)  # null: train's
    assert cfg["epochs"] == 30 and builder == {"filters": [8], **focus}
    assert cfg["augment"] == {"zoom": 0.1, "shift": 0.05}
    cfg, builder = settings_for("cnn4_bn", params)  # a null key among the model's own
    assert builder == {"filters": [8], "lung_focus": "template", "lung_focus_margin": 0.05}
    assert cfg["augment"] == {"zoom": 0.1, "shift": 0.2}


def test_batches_hold_the_pixels_in_order_or_shuffled_by_their_seed():
    x = np.arange(10 * 4 * 4, dtype=np.uint8).reshape(10, 4, 4, 1)
    y = np.arange(10) % 4
    images, labels = batches(make_dataset(x, y, 4, False, 0))
    assert np.array_equal(images, x) and np.array_equal(labels, y)  # no per-image work
    shuffled, labels = batches(make_dataset(x, y, 4, True, 0))
    assert sorted(shuffled[:, 0, 0, 0]) == sorted(x[:, 0, 0, 0]) and len(shuffled) == 10
    assert not np.array_equal(shuffled, x)
    assert np.array_equal(labels, y[shuffled[:, 0, 0, 0] // 16])  # labels follow the images
    again, _ = batches(make_dataset(x, y, 4, True, 0))
    assert np.array_equal(again, shuffled)


def batches(ds) -> tuple[np.ndarray, np.ndarray]:
    """One epoch of a `make_dataset` as (images, labels), on either backend."""
    if hasattr(ds, "as_numpy_iterator"):
        parts = list(ds.as_numpy_iterator())
    else:
        parts = [ds[i] for i in range(len(ds))]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


AUTO = {
    "mixed_precision": "auto",
    "jit_compile": "auto",
    "deterministic": "auto",
    "steps_per_execution": "auto",
    "threads": "auto",
}


def test_cpu_defaults_to_deterministic_float32():
    accel = accelerator_settings(AUTO)
    assert accel["policy"] == "float32" and accel["deterministic"] is True
    # XLA: off on a CPU with TensorFlow; JAX always compiles (without, it runs op by op)
    assert accel["jit_compile"] is (BACKEND == "jax")
    assert accel["replicas"] == 1 and accel["distribution"] is None
    assert accel["steps_per_execution"] == 1 and accel["backend"] == BACKEND
    assert accel["threads"] >= 1
    forced = {"mixed_precision": True, "jit_compile": True, "steps_per_execution": 4}
    fast = accelerator_settings({**AUTO, **forced, "deterministic": False})
    assert fast["policy"] == "mixed_bfloat16" and fast["jit_compile"] is True
    assert fast["steps_per_execution"] == 4
    # Keras 3 on TensorFlow has no XLA with deterministic ops: say so, do not pretend.
    # JAX keeps XLA: its determinism is XLA's own flag.
    deterministic = accelerator_settings({**AUTO, **forced, "deterministic": True})
    assert deterministic["jit_compile"] is (BACKEND == "jax")


@TENSORFLOW_ONLY
def test_thread_pools_follow_the_cpu_affinity_in_a_fresh_process():
    script = textwrap.dedent("""
        import os, tensorflow as tf
        from cxr.fit import accelerator_settings
        accel = accelerator_settings({"mixed_precision": "auto", "jit_compile": "auto",
                                      "deterministic": "auto", "steps_per_execution": "auto",
                                      "threads": "auto"})
        print("threads", accel["threads"], tf.config.threading.get_intra_op_parallelism_threads(),
              tf.config.threading.get_inter_op_parallelism_threads(), len(os.sched_getaffinity(0)))
    """)
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    threads, intra, inter, cores = out.stdout.split("threads ")[1].split()
    assert threads == intra == inter == cores


# cnn4_bn only: ResNet50V2's XLA compile takes 100 s on 2 CPU cores (TensorFlow; 40 s on
# JAX), a sixth of CI. benchmarks/gpu_check.py trains it with bf16 and XLA on a GPU through
# Keras on JAX; on TensorFlow that pairing is exercised by a GPU run only.
@pytest.mark.parametrize("name", ["cnn4_bn"])
def test_mixed_precision_and_xla_train_as_the_stage_does_on_cpu(name):
    """cxr.fit.fit with a GPU's settings (bf16, XLA, no determinism, several steps per call),
    in a fresh process as the stage (op determinism, once on, stays on in a process)."""
    script = textwrap.dedent(f"""
        import numpy as np
        from cxr.fit import accelerator_settings, fit
        from tests.test_fit import AUTO, CFG, NO_AUGMENT, tiny_split
        accel = accelerator_settings({{**AUTO, "mixed_precision": True, "jit_compile": True,
                                      "deterministic": False, "steps_per_execution": 2}})
        augment = {{"rotation": 0.02, "shift": 0.05, "zoom": 0.1, "brightness": 0.1}}
        cfg = {{**CFG, "epochs": 1, "batch_size": 4, "augment": {{**NO_AUGMENT, **augment}}}}
        train, val = tiny_split(16, 0, size=32), tiny_split(8, 1, size=32)
        result = fit({name!r}, cfg, {{}}, train, val, 3, accel, progress=False)
        print("jit", result.fitted.jit_compile, "loss", np.isfinite(result.history["loss"][0]),
              "output", result.model.output.dtype,
              "bf16", any(layer.compute_dtype == "bfloat16" for layer in result.model.layers))
    """)
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr[-3000:]
    # Keras turns XLA off for layers or settings that cannot take it: it stayed on
    assert "jit True loss True output float32 bf16 True" in out.stdout


@pytest.mark.parametrize("deterministic", [True, False])
def test_the_logged_xla_setting_is_the_compiled_models(deterministic, tmp_path, accel):
    """With deterministic ops Keras turns a requested XLA off: the log says what runs."""
    import mlflow

    from cxr.train import LogRuntime

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    asked = {**accel, "jit_compile": True, "deterministic": deterministic}
    cfg = {**CFG, "epochs": 1}
    try:
        with mlflow.start_run() as run:
            result = fit(
                "cnn",
                cfg,
                TINY,
                tiny_split(24, 0),
                tiny_split(6, 1),
                3,
                asked,
                callbacks=[LogRuntime()],
                progress=False,
            )
        logged = mlflow.get_run(run.info.run_id).data.params
    finally:
        mlflow.set_tracking_uri(None)
    if deterministic and BACKEND == "tensorflow":
        assert result.fitted.jit_compile is False
    assert logged["runtime.jit_compile"] == str(result.fitted.jit_compile)
    assert logged["runtime.dtype_policy"] == "float32"


@TENSORFLOW_ONLY
def test_mirrored_strategy_on_two_logical_cpus_trains_an_epoch():
    # Logical devices must be set before TensorFlow starts: run in a fresh interpreter.
    script = textwrap.dedent("""
        import numpy as np, tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        from cxr.augment import RandomRadiograph, training_model
        from cxr.models import build_model
        from cxr.fit import make_dataset
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        with strategy.scope():
            model = build_model("cnn4_bn", (32, 32, 1), 4, filters=[8, 8, 8, 8])
            model = training_model(model, RandomRadiograph(rotation=0.02, zoom=0.1, seed=0))
            model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
        x = np.random.default_rng(0).integers(0, 256, (64, 32, 32, 1)).astype(np.uint8)
        history = model.fit(make_dataset(x, np.arange(64) % 4, 16, True, 0), epochs=1, verbose=0)
        print("replicas", strategy.num_replicas_in_sync, "loss", history.history["loss"][0])
    """)
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "replicas 2 loss" in out.stdout


@JAX_ONLY
def test_deterministic_training_on_jax_sets_xlas_flag_before_jax_starts():
    script = textwrap.dedent("""
        import os
        from cxr.fit import accelerator_settings
        from tests.test_fit import AUTO
        accel = accelerator_settings({**AUTO, "deterministic": True})
        print("flags", os.environ["XLA_FLAGS"], accel["deterministic"], accel["jit_compile"])
    """)
    env = {**os.environ, "XLA_FLAGS": "--xla_cpu_enable_fast_math=false"}
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT,
        env=env,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    # the user's own flags kept; XLA stays on (determinism is XLA's flag on JAX)
    want = "flags --xla_cpu_enable_fast_math=false --xla_gpu_deterministic_ops=true True True"
    assert want in out.stdout


@JAX_ONLY
def test_data_parallel_over_two_jax_devices_trains_as_the_stage_does():
    """accelerator_settings picks Keras' DataParallel when JAX has several devices (two CPU
    devices here, as XLA makes them when told, before JAX starts: a fresh interpreter)."""
    script = textwrap.dedent("""
        import numpy as np
        from cxr.fit import accelerator_settings, fit
        from tests.test_fit import AUTO, CFG, NO_AUGMENT, tiny_split
        accel = accelerator_settings(AUTO)
        cfg = {**CFG, "epochs": 1, "batch_size": 4, "augment": {**NO_AUGMENT, "zoom": 0.1}}
        result = fit("cnn4_bn", cfg, {"filters": [8, 8, 8, 8]}, tiny_split(32, 0, size=32),
                     tiny_split(8, 1, size=32), 3, accel, progress=False)
        kernel = result.model.layers[2].kernel.value
        print("replicas", accel["replicas"], type(accel["distribution"]).__name__,
              "devices", len(kernel.sharding.device_set), "loss",
              np.isfinite(result.history["loss"][0]))
    """)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    # the weights are replicated on both devices, the batch of 4 per device split across them
    assert "replicas 2 DataParallel devices 2 loss True" in out.stdout


def test_oversampling_draws_smaller_classes_up_from_their_own_images():
    from cxr.fit import oversample

    y = np.array([0] * 50 + [1] * 20 + [2] * 5)
    keep = oversample(y, 3, seed=0)
    assert np.bincount(y[keep]).tolist() == [50, 50, 50]
    assert set(np.flatnonzero(y == 0)) <= set(keep)  # every image at least once
    assert np.array_equal(keep, oversample(y, 3, seed=0))


@TENSORFLOW_ONLY  # its fixture forks workers, which a process running JAX must not do
def test_training_batches_hold_the_decoded_files_and_their_folder_labels(synthetic_raw, tmp_path):
    """The cached pipeline feeds the same pixels and labels as decoding every file."""
    from pathlib import Path

    from cxr.classes import FOLDER_TO_LABEL, LABELS
    from cxr.images import load_grey
    from cxr.prepare import prepare
    from cxr.prepared import load_prepared, split_arrays
    from tests.conftest import prepare_settings

    cfg = prepare_settings(
        image_size=32, min_size=32, balance="none", val_fraction=0.25, test_fraction=0.25, seed=1
    )
    prepare(synthetic_raw, [], list(LABELS), cfg, tmp_path / "p")
    x, y, summary = split_arrays(tmp_path / "p", "train")
    rows = [r for r in load_prepared(tmp_path / "p")[1] if r["split"] == "train"]
    images, labels = batches(make_dataset(x, y, 7, shuffle=False, seed=0))
    assert len(images) == len(rows) == 24
    for image, label, row in zip(images, labels, rows, strict=True):
        path = Path(row["path"])
        assert np.array_equal(image[..., 0], load_grey(path, 32))
        folder = path.parent.parent.name  # <Class>/images/<file>
        assert summary["classes"][label] == FOLDER_TO_LABEL[folder]


CFG = {
    "seed": 3,
    "batch_size": 8,
    "epochs": 3,
    "early_stopping_patience": 5,
    "learning_rate": 1e-3,
    "schedule": "constant",
    "imbalance": "class_weight",
    "augment": NO_AUGMENT,
}
CPU = {
    "policy": "float32",
    "jit_compile": BACKEND == "jax",  # JAX without XLA runs op by op
    "deterministic": True,
    "steps_per_execution": 1,
    "distribution": None,
    "replicas": 1,
}
TINY = {"filters": [4], "dense_units": 4}


def tiny_split(n: int, seed: int, size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Images whose brightness tells their class (so a small CNN learns it), 3 classes."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    x = rng.integers(0, 40, (n, size, size, 1)) + (y * 90)[:, None, None, None]
    return x.astype(np.uint8), y


@pytest.fixture
def accel():
    return dict(CPU)


def test_fit_trains_one_configuration_without_files_or_runs(tmp_path, monkeypatch, accel):
    import mlflow

    monkeypatch.chdir(tmp_path)
    # a step size and a model that learn in 3 epochs from every seed tried, on both backends
    cfg, small = {**CFG, "learning_rate": 1e-2}, {"filters": [8], "dense_units": 8}
    result = fit("cnn", cfg, small, tiny_split(48, 0), tiny_split(12, 1), 3, accel, progress=False)
    assert list(tmp_path.iterdir()) == [] and mlflow.active_run() is None
    assert list(result.history) == ["accuracy", "loss", "val_accuracy", "val_loss"]
    assert all(len(v) == 3 for v in result.history.values())
    assert len(result.epoch_seconds) == 3 and result.images_per_epoch == 48
    assert result.history["val_accuracy"][-1] > 0.5  # it learnt the brightness
    assert result.model is served_part(result.fitted)
    assert not any(isinstance(layer, RandomRadiograph) for layer in result.model.layers)
    # early stopping kept the best epoch's weights: they give the best validation loss
    x_val, y_val = tiny_split(12, 1)
    loss, _ = result.fitted.evaluate(x_val, y_val, verbose=0)
    best = result.best_epoch
    assert best == int(np.argmin(result.history["val_loss"])) + 1
    assert loss == pytest.approx(result.history["val_loss"][best - 1], rel=1e-4)


def test_fit_prints_one_line_per_epoch(accel, capsys):
    fit("cnn", {**CFG, "epochs": 2}, TINY, tiny_split(24, 0), tiny_split(6, 1), 3, accel)
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[1].startswith("train@cnn epoch 2/2: accuracy ")
    assert "val_loss" in lines[1] and lines[1].endswith(" s)")


def test_fit_is_reproducible_and_follows_its_seed(accel):
    def losses(cfg):
        result = fit(
            "cnn", cfg, TINY, tiny_split(48, 0), tiny_split(12, 1), 3, accel, progress=False
        )
        return result.history["loss"]

    assert losses(CFG) == losses(CFG)
    assert losses(CFG) != losses({**CFG, "seed": 4})


def test_fit_oversamples_and_resumes_where_a_checkpoint_stopped(accel):
    x, y = tiny_split(48, 0)
    few = np.flatnonzero(y != 2)[:30].tolist() + np.flatnonzero(y == 2)[:4].tolist()
    cfg = {**CFG, "imbalance": "oversample", "epochs": 2}
    first = fit("cnn", cfg, TINY, (x[few], y[few]), tiny_split(12, 1), 3, accel, progress=False)
    assert first.images_per_epoch == 3 * 15  # every class drawn up to the largest (15)
    resume = Resume(first.fitted, 2, first.history)
    more = fit(
        "cnn",
        {**cfg, "epochs": 4},
        TINY,
        (x[few], y[few]),
        tiny_split(12, 1),
        3,
        accel,
        resume=resume,
        progress=False,
    )
    assert more.fitted is first.fitted and len(more.epoch_seconds) == 2
    assert len(more.history["loss"]) == 4
    assert more.history["loss"][:2] == first.history["loss"]
