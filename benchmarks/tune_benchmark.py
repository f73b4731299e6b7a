"""The hyper-parameter search on real radiographs: speed, what it finds, what pruning saves.

    python benchmarks/tune_benchmark.py --archive real-dev
        [--model cnn4_bn] [--profile real_cpu] [--trials 20] [--epochs 15]
        [--pruners median none] [--workdir DIR]

Prepares the archive with the profile's data and prepare settings (train and validation
splits only are used), then, for each pruner, runs a fresh study of --trials trials of
--epochs each (`cxr.tune.tune`, the same seed, its own journal and MLflow store in
--workdir) and trains the profile's hand-picked settings with the same epoch budget
(`cxr.fit.fit`). Prints one table: trials per hour, epochs trained, wall time, the best
validation loss and accuracy, against the hand-picked configuration's.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from cxr import machine

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--archive", type=Path, required=True, help="real films (benchmarks/real_subset.py)"
    )
    parser.add_argument("--model", default="cnn4_bn")
    parser.add_argument("--profile", default="real_cpu")
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--pruners", nargs="+", default=["median", "none"])
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="tune-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"

    from cxr.download import download
    from cxr.params import check_params, load_params, with_overrides
    from cxr.prepare import prepare
    from cxr.prepared import split_arrays
    from cxr.tune import tune

    base = load_params(ROOT / "params.yaml")
    overrides = {
        **base[args.profile],
        "data.source": "archive",
        "data.archive": str(args.archive.resolve()),
        "tune.epochs": args.epochs,
    }
    params = check_params(with_overrides(base, overrides))
    data = params["data"]
    if not (work / "prepared" / "dataset.json").is_file():
        download(data, work / "raw", work / "download.json", cache_dir=work / "cache")
        prepare(work / "raw", [], data["classes"], params["prepare"], work / "prepared")

    rows = []
    for pruner in args.pruners:
        run_params = with_overrides(params, {"tune.pruner": pruner})
        start = time.perf_counter()
        summary = tune(
            run_params,
            args.model,
            work / "prepared",
            trials=args.trials,
            profile=args.profile,
            tuned_dir=work / f"tuned-{pruner}",
            journal_dir=work / f"tuning-{pruner}",
        )
        wall = time.perf_counter() - start
        epochs = _epochs(work / f"tuning-{pruner}" / f"{args.model}.journal", summary["study"])
        rows.append((f"search, pruner {pruner}", summary, wall, epochs))

    rows.append(hand_picked(args.model, params, work / "prepared", args.epochs))
    train = split_arrays(work / "prepared", "train")[0]
    x_val = split_arrays(work / "prepared", "val")[0]

    print(
        f"\n{args.model}, profile {args.profile} ({params['prepare']['image_size']} px, "
        f"{len(train)} training / {len(x_val)} validation images of {args.archive.name}), "
        f"{args.trials} trials of up to {args.epochs} epochs\n# {machine.header()}\n"
    )
    print("| run | trials (complete/pruned/failed) | epochs trained | wall | trials per hour "
          "| best val_loss | its val_accuracy |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---:|")
    for name, s, seconds, epochs in rows:
        t = s["trials"]
        n = sum(t.values())
        print(
            f"| {name} | {t.get('complete', 0)}/{t.get('pruned', 0)}/{t.get('fail', 0)} | "
            f"{epochs} | {seconds / 60:.1f} min | "
            f"{'' if name.startswith('hand') else f'{n / seconds * 3600:.0f}'} | "
            f"{s['val_loss']:.4f} | {s['val_accuracy']:.4f} |"
        )
    if len(rows) > 2 and "none" in args.pruners:
        with_pruning = next(r for r in rows if "none" not in r[0])
        without = next(r for r in rows if "pruner none" in r[0])
        print(
            f"\npruning saved {1 - with_pruning[3] / without[3]:.0%} of the epochs and "
            f"{1 - with_pruning[2] / without[2]:.0%} of the wall time"
        )


def hand_picked(model: str, params: dict, prepared: Path, epochs: int) -> tuple:
    """The hand-picked settings (the profile's), the same epoch budget, the same splits: a
    row of the table."""
    from cxr.fit import accelerator_settings, fit, settings_for
    from cxr.prepared import split_arrays

    cfg, builder_cfg = settings_for(model, params)
    cfg["epochs"] = epochs
    accel = accelerator_settings(cfg)
    train = split_arrays(prepared, "train")[:2]
    x_val, y_val, dataset = split_arrays(prepared, "val")
    start = time.perf_counter()
    fitted = fit(model, cfg, builder_cfg, train, (x_val, y_val), len(dataset["classes"]),
                 accel, progress=False)  # fmt: skip
    wall = time.perf_counter() - start
    best = int(np.argmin(fitted.history["val_loss"]))
    hand = {
        "val_loss": fitted.history["val_loss"][best],
        "val_accuracy": fitted.history["val_accuracy"][best],
        "trials": {"complete": 1},
    }
    return "hand-picked (profile)", hand, wall, len(fitted.history["val_loss"])


def _epochs(journal: Path, name: str) -> int:
    """Epochs trained in all trials of the study (the intermediate values reported)."""
    import optuna
    from optuna.storages.journal import JournalFileBackend

    storage = optuna.storages.JournalStorage(JournalFileBackend(str(journal)))
    study = optuna.load_study(study_name=name, storage=storage)
    return sum(len(t.intermediate_values) for t in study.trials)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
