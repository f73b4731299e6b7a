"""GPU check of the train stage, sized for one short session on a GPU (under 8 minutes).

Needs only what a GPU machine without TensorFlow may have (Python 3.12, JAX with CUDA,
numpy, scipy, pillow) plus the wheels `make gpu-wheels` downloads to carry there (Keras,
PyYAML and what they import; docs/benchmarks.md, "GPU check", has the recipe); it imports
the project from src/ without installing it (no TensorFlow, MLflow or DVC):

    KERAS_BACKEND=jax python benchmarks/gpu_check.py OUT.json [--size 224] [--batch 256]
        [--steps 96] [--models resnet50v2 cnn4_bn ...] [--float32 resnet50v2 ...]
        [--budget 420]

For each architecture (params.yaml's builder settings, transfer models from scratch):
1. the bare-model ceiling: `model.fit` on
   uint8 images in host memory, no augmentation, no input iterator;
2. the train stage's own step: cxr.fit.fit with params.yaml's `train` settings resolved for
   this machine (mixed precision, XLA, steps per execution, determinism: `auto`), the
   augmentation layer, and the stage's input iterator over a uint8 cache of phantoms;
both at the same batch size, timed over the second epoch (the first compiles), and their
ratio. Then one short real training (cnn4_bn, phantoms) to a learned state, and the
training time of the six models on the full database estimated from the measured rates
(the Kaggle set undersampled to 12,193 images, params.yaml's split, 30 epochs; compiles
apart). The JSON is rewritten after every step; models past `--budget` seconds are skipped.

Why mixed precision did not speed ResNet50V2 up: the `--float32` models'
bare-model ceiling is measured again in float32, and every row carries a summary of XLA's
optimised training step of the bare model (`hlo`: convolutions by element type, layout and
cuDNN math type -- tensor cores or not --, transposes and layout copies, fusions by kind),
from XLA's own dump; the `--float32` models' modules are kept next to OUT.json, gzipped.
"""

from __future__ import annotations

import argparse
import atexit
import gzip
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
ORDER = ["resnet50v2", "cnn4_bn", "cnn", "cnn6_bn", "vgg16", "vgg19"]
FULL_IMAGES, FULL_EPOCHS = 12_193, 30  # the study: undersampled to COVID's count


def phantoms(n: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """n phantom radiographs (size x size x 1, uint8), the four classes in turn. Made in
    worker processes before JAX starts (a process running JAX must not fork)."""
    from cxr.classes import LABELS

    jobs = [(LABELS[i % 4], i // 4, size) for i in range(n)]
    with ProcessPoolExecutor(min(16, os.cpu_count() or 1)) as pool:
        images = list(pool.map(_phantom, jobs, chunksize=16))
    return np.stack(images)[..., None], np.arange(n) % 4


def _phantom(job):
    from cxr.synthetic import phantom

    label, index, size = job
    return phantom(label, index, size=size, seed=1)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out", type=Path)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=96, help="timed steps per side")
    parser.add_argument("--images", type=int, default=2048, help="phantoms in the cache")
    parser.add_argument("--models", nargs="+", default=ORDER)
    parser.add_argument("--budget", type=float, default=420, help="seconds; then skip")
    parser.add_argument("--float32", nargs="*", default=["resnet50v2"],
                        help="models whose ceiling is measured in float32 too")  # fmt: skip
    args = parser.parse_args()
    started = time.time()
    hlo = HloDump()  # before JAX starts: XLA reads its flags once
    x, y = phantoms(args.images, args.size)
    made = time.time() - started

    import keras

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for name in ("vgg16", "vgg19", "resnet50v2"):
        params["models"][name]["weights"] = "none"  # no weight hub here: from scratch
    from cxr import machine

    facts = machine.facts()
    print(f"# {machine.header(f=facts)}", flush=True)
    report = {
        "machine": facts,
        "keras": keras.__version__,
        "backend": keras.backend.backend(),
        "size": args.size,
        "batch": args.batch,
        "phantoms": {"images": len(x), "seconds": round(made, 1)},
        "models": [],
    }
    if report["backend"] == "jax":
        import jax

        report["jax"] = jax.__version__
        report["devices"] = [f"{d.platform}:{d.device_kind}" for d in jax.devices()]

    def save() -> None:
        args.out.write_text(json.dumps(report, indent=1))

    split = 1 - params["prepare"]["val_fraction"] - params["prepare"]["test_fraction"]
    n_val = len(x) // 8
    data = (x[n_val:], y[n_val:]), (x[:n_val], y[:n_val])
    runs = [(name, "auto") for name in args.models]
    runs += [(name, False) for name in args.float32 if name in args.models]
    for name, precision in runs:
        if time.time() - started > args.budget:
            report["models"].append({"model": name, "skipped": "time budget"})
        else:
            row = measure(name, precision, params, data, args, hlo, stage=precision == "auto")
            if "stage_images_per_s" in row:
                row["full_database_train_s"] = round(
                    FULL_IMAGES * split * FULL_EPOCHS / row["stage_images_per_s"], 1
                )
            report["models"].append(row)
            print(json.dumps(row), flush=True)
        save()
    rates = [r for r in report["models"] if "stage_images_per_s" in r]
    report["full_database_estimate"] = {
        "models": [r["model"] for r in rates],
        "train_images_per_epoch": round(FULL_IMAGES * split),
        "epochs": FULL_EPOCHS,
        "training_steps_minutes": round(sum(r["full_database_train_s"] for r in rates) / 60, 2),
        "compiles_minutes": round(sum(r["stage_compile_s"] for r in rates) / 60, 2),
        "note": "training steps at the measured stage rate; validation passes not included",
    }
    save()
    if time.time() - started < args.budget + 60:
        report["learned"] = learned(params, *data)
        save()
    report["seconds"] = round(time.time() - started, 1)
    save()
    print(json.dumps({k: v for k, v in report.items() if k != "models"}, indent=1))


def measure(name, precision, params, data, args, hlo, stage=True) -> dict:
    """One architecture at `--batch` with the `train` settings resolved for this machine
    (`precision`: the stage's `mixed_precision`): the bare-model ceiling and XLA's summary
    of its training step, then (`stage`) the train stage's step; each timed over its
    second epoch."""
    import keras

    from cxr.fit import accelerator_settings, fit, set_runtime, settings_for
    from cxr.models import build_model

    train, val = data
    cfg, builder_cfg = settings_for(name, params)
    cfg = {**cfg, "batch_size": args.batch, "epochs": 2, "seed": 0, "mixed_precision": precision}
    cfg["early_stopping_patience"] = 10
    accel = accelerator_settings(cfg)
    spe = accel["steps_per_execution"]
    steps = max(args.steps // spe, 3) * spe
    # (1) bare model: no augmentation, numpy arrays through Keras' own adapter
    set_runtime(0, accel)
    keras.utils.clear_session()
    bare = build_model(name, train[0].shape[1:], 4, **builder_cfg)
    bare.compile(
        optimizer=keras.optimizers.Adam(1e-4),
        loss="sparse_categorical_crossentropy",
        jit_compile=accel["jit_compile"],
        steps_per_execution=spe,
    )
    reps = int(np.ceil(steps * args.batch / len(train[0])))
    xs = np.concatenate([train[0]] * reps)[: steps * args.batch]
    ys = np.concatenate([train[1]] * reps)[: steps * args.batch]
    clock = Clock()
    hlo.mark()
    bare.fit(xs, ys, batch_size=args.batch, epochs=2, shuffle=False, verbose=0,
             callbacks=[clock])  # fmt: skip
    label = "off" if precision is False else precision
    keep = args.out.with_name(f"hlo_{name}_{label}.txt.gz") if name in args.float32 else None
    row = {
        "model": name,
        "precision": label,
        "policy": accel["policy"],
        "deterministic": accel["deterministic"],
        "steps_per_execution": spe,
        "ceiling_images_per_s": round(clock.rate(args.batch * spe), 1),
        "ceiling_compile_s": round(clock.first_epoch - clock.epoch_seconds, 1),
        "hlo": hlo.summary(keep),
    }
    del bare, xs, ys
    if not stage:
        return row
    # (2) the train stage's step: fit as the stage calls it
    keras.utils.clear_session()
    clock = Clock()
    result = fit(name, cfg, builder_cfg, train, val, 4, accel, callbacks=[clock],
                 steps_per_epoch=steps, progress=False)  # fmt: skip
    row["jit_compile"] = bool(result.fitted.jit_compile)
    row["stage_images_per_s"] = round(clock.rate(args.batch * spe), 1)
    row["ratio"] = round(row["stage_images_per_s"] / row["ceiling_images_per_s"], 3)
    row["stage_compile_s"] = round(clock.first_epoch - clock.epoch_seconds, 1)
    return row


def learned(params, train, val) -> dict:
    """One short real training of cnn4_bn on the phantoms, as the stage runs it."""
    import keras

    from cxr.fit import accelerator_settings, fit, settings_for

    keras.utils.clear_session()
    cfg, builder_cfg = settings_for("cnn4_bn", params)
    cfg = {**cfg, "batch_size": 64, "epochs": 12, "seed": 0, "schedule": "cosine"}
    accel = accelerator_settings(cfg)
    t0 = time.perf_counter()
    result = fit("cnn4_bn", cfg, builder_cfg, train, val, 4, accel, progress=True)
    best = result.best_epoch - 1
    return {
        "model": "cnn4_bn",
        "epochs": len(result.history["loss"]),
        "train_images": len(train[0]),
        "val_images": len(val[0]),
        "best_val_accuracy": round(result.history["val_accuracy"][best], 3),
        "chance": 0.25,
        "seconds": round(time.perf_counter() - t0, 1),
    }


class HloDump:
    """XLA's optimised HLO of each training step, dumped by XLA itself (`--xla_dump_to`, set
    before JAX starts; only the modules of Keras' jitted `train_step`), and summarised:
    what precision and layout the convolutions run in, whether cuDNN runs them on tensor
    cores (`math_type`), how many transposes and layout copies and fusions of each kind
    XLA made around them. A dump that cannot be read gives an `error`, not a failed check."""

    # `name = shape op(...)`: the shape a tuple `(bf16[...]{...}, u8[0]{0})` or one array
    INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(\([^)]*\)|\S+)\s+([\w\-]+)\(")

    def __init__(self):
        self.where = where = Path(tempfile.mkdtemp(prefix="gpu_check_hlo_"))
        atexit.register(shutil.rmtree, where, True)  # tens of MB; `summary(keep)` keeps one
        flags = f"--xla_dump_to={where} --xla_dump_hlo_module_re=.*train_step.*"
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip()
        self.seen: set[Path] = set()

    def mark(self) -> None:
        """What is there now is not the next summary's."""
        self.seen = set(self.where.glob("*after_optimizations.txt"))

    def summary(self, keep: Path | None = None) -> dict:
        """The summary of the largest train_step module dumped since `mark`; `keep`: a
        path to save that module to, gzipped (for a closer look away from the machine)."""
        try:
            new = set(self.where.glob("*after_optimizations.txt")) - self.seen
            if not new:
                return {"error": f"no train_step module dumped in {self.where}"}
            module = max(new, key=lambda f: f.stat().st_size)
            text = module.read_text()
            out = self.summarise(text) | {"module": module.name}
            if keep is not None:
                keep.write_bytes(gzip.compress(text.encode()))
                out["saved"] = keep.name
            return out
        except Exception as error:  # a diagnostic: never the reason the check stops
            return {"error": f"{type(error).__name__}: {error}"}

    @classmethod
    def summarise(cls, text: str) -> dict:
        convs, fusions = Counter(), Counter()
        transposes = copies = 0
        for line in text.splitlines():
            found = cls.INSTRUCTION.match(line)
            if not found:
                continue
            shape, op = found.groups()
            target = re.search(r'custom_call_target="([^"]+)"', line)
            if op == "fusion":
                fusions[_field(line, "kind")] += 1
            elif op in ("transpose", "copy"):
                transposes += op == "transpose"
                copies += op == "copy"
            elif op == "convolution" or (target and "conv" in target.group(1).lower()):
                math = re.search(r'"math_type":"(\w+)"', line)
                convs[" ".join([
                    target.group(1) if target else "convolution",
                    re.match(r"\(?(\w+)", shape).group(1),
                    _field(line, "dim_labels"),
                    math.group(1) if math else "",
                ]).strip()] += 1  # fmt: skip
        return {
            "convolutions": dict(convs.most_common()),
            "transposes": transposes,
            "copies": copies,
            "fusions": dict(fusions.most_common()),
        }


def _field(line: str, key: str) -> str:
    found = re.search(rf"\b{key}=([\w>\-]+)", line)
    return found.group(1) if found else "?"


def Clock():  # noqa: N802 (a class, made once Keras may be imported)
    """A Keras callback timing the calls of the second epoch: steady state, compiled."""
    import keras

    class EpochClock(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.ends, self.begin = [], time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            self.ends.append(time.perf_counter())

        def on_epoch_end(self, epoch, logs=None):
            if epoch == 0:
                self.first_epoch = time.perf_counter() - self.begin
            else:
                self.epoch_seconds = self.ends[-1] - self.begin
                self.timed = list(self.ends)

        def rate(self, images_per_call: int) -> float:
            """images/s from the end of the first call to the end of the last."""
            return images_per_call * (len(self.timed) - 1) / (self.timed[-1] - self.timed[0])

    return EpochClock()


if __name__ == "__main__":
    main()
