"""Where training time goes, per architecture: images/s of four ways to feed the same model.

    python benchmarks/train_benchmark.py [--models cnn cnn4_bn ...] [--image-size 224]
        [--batch-size 32] [--steps 12] [--warmup 3] [--augment | --no-augment]
        [--workdir DIR] [--out docs/benchmarks.json]

(a) input pipeline alone: the train stage's input (cached uint8 arrays, shuffle, batch:
    tf.data on TensorFlow, cxr.fit.ArrayBatches on JAX), iterated without a model;
(b) compute ceiling: training steps on one batch already in memory (no pipeline);
(c) the train stage's loop: cxr.fit.fit, as `stages/train.py` calls it;
(d) the study's way: PNG files decoded and resized every epoch by
    keras.utils.image_dataset_from_directory, then the same model.fit.
(b)-(d) train the same training model (augmentation is its first layer, inside the step, see
cxr.augment), built as the stage builds it, with the stage's precision, XLA, steps per
execution and threads and the same batch size. Each side is timed in steady state, after
`--warmup` steps (tracing, XLA). Prints a markdown table with (c)/(b), the pipeline's
efficiency, (c)/(d), the speed-up over decoding files every epoch, and how busy
the CPU cores were during (c). Phantoms are written once into --workdir and reused.
The Keras backend is KERAS_BACKEND's (tensorflow or jax): run it once with each to compare.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import cxr  # noqa: E402, F401  (first: TensorFlow with oneDNN on every x86-64 CPU)

# isort: split
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402  (the study's PNG loader, (d); TensorFlow's own (b))

from cxr import backend, machine  # noqa: E402
from cxr.classes import DATASET_DIR, LABELS  # noqa: E402
from cxr.fit import (  # noqa: E402
    accelerator_settings,
    build_for_training,
    fit,
    make_dataset,
    set_runtime,
    settings_for,
)
from cxr.params import load_params  # noqa: E402
from cxr.prepare import prepare  # noqa: E402
from cxr.prepared import split_arrays  # noqa: E402
from cxr.synthetic import write_dataset  # noqa: E402


class BatchTimer(keras.callbacks.Callback):
    """Wall time and the process's CPU time at the end of every compiled call (one batch,
    or `steps_per_execution` batches)."""

    def __init__(self):
        super().__init__()
        self.ends: list[float] = []
        self.cpu: list[float] = []

    def on_train_batch_end(self, batch, logs=None):
        self.ends.append(time.perf_counter())
        self.cpu.append(time.process_time())


def steady_rate(ends: list[float], images: int, warmup: int) -> float:
    """Images/s between the end of call `warmup` and the last call, `images` per call."""
    timed = ends[warmup:]
    return images * (len(timed) - 1) / (timed[-1] - timed[0])


def data(workdir: Path, size: int, n_train: int) -> tuple[Path, Path]:
    """(PNG class root, prepared cache) with at least `n_train` training images."""
    per_class = int(np.ceil(n_train / 0.7 / len(LABELS))) + 4
    raw = workdir / f"raw-{per_class}"
    if not (raw / ".complete").exists():
        write_dataset(raw, per_class=per_class, size=299)
        (raw / ".complete").touch()
    prepared = workdir / f"prepared-{per_class}-{size}"
    if not (prepared / "dataset.json").exists():
        cfg = {**load_params()["prepare"], "image_size": size, "balance": "none"}
        prepare(raw, [], list(LABELS), cfg, prepared)
    return raw / DATASET_DIR, prepared


def timed(timer: BatchTimer, warmup: int, images: int) -> tuple[float, float]:
    """(images/s, fraction of the CPU cores busy) of the calls after `warmup`."""
    wall = timer.ends[-1] - timer.ends[warmup]
    busy = (timer.cpu[-1] - timer.cpu[warmup]) / wall / len(os.sched_getaffinity(0))
    return steady_rate(timer.ends, images, warmup), busy


def fit_rate(model, dataset, steps: int, warmup: int, batch: int) -> tuple[float, float]:
    """(images/s, fraction of the CPU cores busy) of `steps` timed calls after `warmup`."""
    timer = BatchTimer()
    per_call = model.steps_per_execution
    calls = (steps + warmup) * per_call
    model.fit(dataset, epochs=1, steps_per_epoch=calls, callbacks=[timer], verbose=0)
    return timed(timer, warmup, batch * per_call)


def one_batch(x: np.ndarray, y: np.ndarray):
    """The same batch, already on the device, for ever: a dataset with no input cost."""
    if backend.name() == "tensorflow":
        return tf.data.Dataset.from_tensors((tf.constant(x), tf.constant(y))).repeat()
    xb, yb = keras.ops.convert_to_tensor(x), keras.ops.convert_to_tensor(y)

    class Same(keras.utils.PyDataset):
        def __len__(self):
            return 1_000_000

        def __getitem__(self, index):
            return xb, yb

    return Same()


def bench_model(name, params, png_root, prepared, args) -> dict:
    cfg, builder_cfg = settings_for(name, params)
    accel = accelerator_settings(cfg)
    augment = cfg["augment"] if args.augment else dict.fromkeys(cfg["augment"], 0)
    # One epoch of the timed steps, the same start for every side: seed 0, lr 1e-4, batch.
    cfg = {**cfg, "augment": augment, "seed": 0, "learning_rate": 1e-4, "epochs": 1}
    cfg["batch_size"] = batch = args.batch_size
    x, y, summary = split_arrays(prepared, "train")
    val = split_arrays(prepared, "val")[:2]
    n_classes = len(summary["classes"])
    per_call = accel["steps_per_execution"]
    n_steps = (args.steps + args.warmup) * per_call

    def fresh_model():
        set_runtime(0, accel)  # the stage's seed, determinism and precision
        return build_for_training(name, cfg, builder_cfg, x.shape[1:], n_classes, n_steps, accel)

    # (a) the stage's input pipeline alone
    pipeline = make_dataset(x, y, batch, True, 0, steps=n_steps * 2)
    ends = []
    if hasattr(pipeline, "take"):  # tf.data
        batches = pipeline.take(n_steps * 2)
    else:
        batches = (pipeline[i] for i in range(n_steps * 2))
    for _ in batches:
        ends.append(time.perf_counter())
    a = steady_rate(ends, batch, args.warmup)
    # (b) compute ceiling: one batch in memory (on the device), no pipeline
    b, _ = fit_rate(fresh_model(), one_batch(x[:batch], y[:batch]), args.steps, args.warmup, batch)
    # (c) the train stage's loop: cxr.fit.fit, as the stage calls it
    timer = BatchTimer()
    fit(
        name,
        cfg,
        builder_cfg,
        (x, y),
        val,
        n_classes,
        accel,
        callbacks=[timer],
        steps_per_epoch=n_steps,
        progress=False,
    )
    c, busy = timed(timer, args.warmup, batch * per_call)
    # (d) the study's way: decode and resize PNG files every epoch
    files = keras.utils.image_dataset_from_directory(
        png_root,
        labels="inferred",
        color_mode="grayscale",
        image_size=(x.shape[1], x.shape[2]),
        batch_size=batch,
        shuffle=True,
        seed=0,
        verbose=False,
    )
    d, _ = fit_rate(
        fresh_model(), files.prefetch(tf.data.AUTOTUNE).repeat(), args.steps, args.warmup, batch
    )
    return {
        "model": name,
        "input_pipeline": round(a, 1),
        "in_memory": round(b, 1),
        "train_stage": round(c, 1),
        "decode_every_epoch": round(d, 1),
        "efficiency": round(c / b, 3),
        "speedup": round(c / d, 2),
        "cpu_busy": round(busy, 2),
        "backend": accel["backend"],
        "policy": accel["policy"],
        "deterministic": accel["deterministic"],
        "jit_compile": accel["jit_compile"],
        "steps_per_execution": accel["steps_per_execution"],
        "threads": accel["threads"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--models", nargs="+", default=None, help="default: params.yaml's train.models"
    )
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--steps", type=int, default=12, help="timed calls (of steps_per_execution batches)"
    )
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls first")
    parser.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument(
        "--weights", default="none", help="transfer models' weights (offline: none)"
    )
    parser.add_argument(
        "--workdir", type=Path, default=Path(tempfile.gettempdir()) / "cxr-train-bench"
    )
    parser.add_argument("--out", type=Path, help="also write the figures as JSON here")
    args = parser.parse_args()

    params = load_params()
    models = args.models or params["train"]["models"]
    for name in ("vgg16", "vgg19", "resnet50v2"):
        params["models"][name]["weights"] = args.weights
    png_root, prepared = data(
        args.workdir, args.image_size, args.batch_size * (args.steps + args.warmup) * 2
    )
    if backend.name() == "jax":
        import jax

        devices = [d.platform for d in jax.devices()]
    else:
        devices = [d.device_type for d in tf.config.list_physical_devices()]
    print(
        f"# {machine.header()}\n# Keras on "
        f"{backend.name()}, devices {devices}, {args.image_size} px, "
        f"batch {args.batch_size}, {args.steps} timed steps after "
        f"{args.warmup}, augmentation {'on' if args.augment else 'off'}\n"
    )
    columns = ["(a) pipeline", "(b) in memory", "(c) train stage", "(d) PNG every epoch"]
    print("| model | " + " | ".join(columns) + " | (c)/(b) | (c)/(d) | cores busy (c) |")
    print("|---|" + "---:|" * 7)
    rows = []
    for name in models:
        row = bench_model(name, params, png_root, prepared, args)
        rows.append(row)
        rates = [row[k] for k in ("input_pipeline", "in_memory", "train_stage")]
        rates.append(row["decode_every_epoch"])
        print(
            f"| {name} | "
            + " | ".join(f"{r:.1f}" for r in rates)
            + f" | {row['efficiency']:.2f} | {row['speedup']:.2f} | {row['cpu_busy']:.2f} |",
            flush=True,
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=2)
        )


if __name__ == "__main__":
    main()
