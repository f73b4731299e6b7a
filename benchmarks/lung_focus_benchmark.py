"""Lung focus on real radiographs, judged on the validation split (the test split is not read).

    python benchmarks/lung_focus_benchmark.py --archive real-dev \
        [--profile real_cpu] [--models cnn4_bn cnn] [--focus none template] \
        [--margins 0.04 0.0] [--out FILE.json]

Prepares the archive as the profile does (classes present in it), then for each model and
each lung focus (none; the template with each margin asked for) fits the
train stage's loop (`cxr.fit.fit`, the profile's settings) and scores the validation split
three ways, as the evaluate stage's lung audit does on test: intact, lungs hidden, lungs
only, with the Grad-CAM heat inside the lungs. Logistic regression on the pixels
(`cxr.baselines`) is scored the same way, on plain and on lung-focused pixels.

The audit's lungs are each image's own mask file where the archive has them, else the
template. An audit with the template of a model focused by the same template is circular
(hiding the template hides nearly all it sees), so each model is also audited with
`shifted` lungs: per film the template moved by up to 0.04 of the image side, each lung's
semi-axes scaled by 0.85-1.15, drawn with a fixed seed. That stands in, roughly, for the
films' own lungs (which sit where each patient's pose puts them): a focus that still reads
the lungs when the region it is audited with is not its own.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from cxr import machine
from cxr.baselines import fit_predict
from cxr.classes import DATASET_DIR, FOLDER_TO_LABEL
from cxr.lungs import TEMPLATE, audit_inputs, focus_array
from cxr.metrics import intervals, mcnemar
from cxr.params import check_params, load_params, parse_yaml, with_overrides
from cxr.prepared import split_arrays, split_masks


def accuracy(y: np.ndarray, pred: np.ndarray, k: int) -> list[float]:
    ci = intervals(y, pred, k)["accuracy"]
    return [float(np.mean(pred == y)), *ci]


def shifted_masks(n: int, size: int, seed: int = 0) -> np.ndarray:
    """(n, size, size) bool: the template per film moved by up to 0.04 of the side (both
    lungs together) and each lung's semi-axes scaled by 0.85-1.15 (each on its own)."""
    rng = np.random.default_rng(seed)
    centres = (np.arange(size) + 0.5) / size
    ys, xs = centres[:, None], centres[None, :]
    masks = np.zeros((n, size, size), bool)
    for i in range(n):
        dx, dy = rng.uniform(-0.04, 0.04, 2)
        for cx, cy, rx, ry in TEMPLATE:
            sx, sy = rng.uniform(0.85, 1.15, 2)
            masks[i] |= ((xs - cx - dx) / (rx * sx)) ** 2 + ((ys - cy - dy) / (ry * sy)) ** 2 <= 1
    return masks


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--archive", type=Path, required=True)
    parser.add_argument("--profile", default="real_cpu")
    parser.add_argument("--models", nargs="+", default=["cnn4_bn"])
    parser.add_argument("--focus", nargs="+", default=["none", "template"])
    parser.add_argument("--margins", nargs="+", type=float, help="default: the profile's")
    parser.add_argument("--epochs", type=int, help="cap every model's epochs (a quick look)")
    parser.add_argument(
        "-S",
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a params override on top of the profile's, as `dvc exp run -S`",
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    import keras  # after argparse: --help stays fast

    root = args.archive / DATASET_DIR if (args.archive / DATASET_DIR).is_dir() else args.archive
    present = sorted(FOLDER_TO_LABEL[p.name] for p in root.iterdir() if p.name in FOLDER_TO_LABEL)
    params = with_overrides(load_params(), load_params()[args.profile])
    params = with_overrides(params, {"data.classes": present})
    for item in args.set:
        key, _, value = item.partition("=")
        params = with_overrides(params, {key: parse_yaml(value)})
    params = check_params(params)  # a bad override: one line now, not in the builder
    data = prepared_splits(args.archive, present, params)
    x_train, x_val, summary = data["x_train"], data["x_val"], data["summary"]
    region = "own masks" if all(w == "file" for w in data["mask_from"]) else "template"
    facts = machine.facts()  # read once: the printed header and the JSON say the same
    print(f"# {machine.header(f=facts)}; overrides: {args.set or 'none'}")
    print(
        f"# {args.archive}: {len(x_train)} train / {len(x_val)} validation images at "
        f"{summary['image_size']} px, classes {summary['classes']}; audit lungs: {region}\n"
    )
    # (label, margin): None is no focus.
    focuses = [("none", None)] * ("none" in args.focus) + [
        (f"margin {m:+.2f}", m)
        for m in (args.margins or [params["train"]["lung_focus_margin"]])
        if "template" in args.focus
    ]
    data["regions"] = {"": data["masks"], "shifted_": shifted_masks(len(x_val), x_val.shape[1])}
    rows = []
    for label, margin in focuses:
        rows.append(baseline_row(data, label, margin))
        for name in args.models:
            print(f"# fitting {name}, lung focus {label}", flush=True)
            rows.append(model_row(name, params, data, label, margin, args.epochs))
            keras.backend.clear_session()
    print_table(rows, data["y_val"], region)
    if args.out:
        for r in rows:
            r["pred"] = r["pred"].tolist()
        args.out.write_text(
            json.dumps({"machine": facts, "region": region, "rows": rows}, indent=2)
        )


def prepared_splits(archive: Path, classes: list[str], params: dict) -> dict:
    """The archive prepared as the profile prepares it (in a temporary folder, removed):
    train and validation images and labels, the validation lung masks and where each came
    from, the prepared data's summary."""
    from cxr.prepare import prepare

    work = Path(tempfile.mkdtemp(prefix="lung-focus-"))
    try:
        prepare(archive, [], classes, params["prepare"], work / "prepared")
        x_train, y_train, summary = split_arrays(work / "prepared", "train")
        x_val, y_val, _ = split_arrays(work / "prepared", "val")
        masks, mask_from = split_masks(work / "prepared", "val")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "x_train": x_train, "y_train": y_train, "x_val": x_val, "y_val": y_val,
        "masks": masks, "mask_from": mask_from, "summary": summary,
    }  # fmt: skip


def baseline_row(data: dict, label: str, margin: float | None) -> dict:
    """Logistic regression on the pixels (lung-focused with `margin`; None: no focus), scored
    on the validation images intact and in each region's audit views."""
    x_val, y_val, k = data["x_val"], data["y_val"], len(data["summary"]["classes"])
    views = {
        f"{r}{v}": a for r, m in data["regions"].items() for v, a in audit_inputs(x_val, m).items()
    }
    del views["shifted_intact"]

    def prep(a):
        return a if margin is None else focus_array(a, margin)

    x_train = prep(data["x_train"])
    preds = fit_predict(
        "logistic_regression", x_train, data["y_train"], list(map(prep, views.values()))
    )
    return {
        "name": "logistic_regression",
        "focus": label,
        "pred": preds[0],
        **{v: accuracy(y_val, p, k) for v, p in zip(views, preds, strict=True)},
    }


def model_row(name, params, data, label, margin, epochs) -> dict:
    """`name` fitted as the train stage fits it with the focus asked for, scored on the
    validation images intact and audited (cxr.lung_audit) with each region's lungs."""
    from cxr.fit import accelerator_settings, fit, settings_for
    from cxr.lung_audit import lung_audit

    x_val, y_val = data["x_val"], data["y_val"]
    classes = data["summary"]["classes"]
    k = len(classes)
    focus = {"train.lung_focus": "none" if margin is None else "template"}
    p = with_overrides(params, focus | {"train.lung_focus_margin": margin or 0.0})
    cfg, builder = settings_for(name, p)
    if epochs:
        cfg["epochs"] = min(cfg["epochs"], epochs)
    accel = accelerator_settings(cfg)
    t0 = time.perf_counter()
    result = fit(
        name, cfg, builder, (data["x_train"], data["y_train"]), (x_val, y_val), k, accel,
        progress=False,
    )  # fmt: skip
    seconds = time.perf_counter() - t0
    pred = result.model.predict(x_val, verbose=0).argmax(axis=1)
    row = {
        "name": name,
        "focus": label,
        "pred": pred,
        "seconds": seconds,
        "epochs": len(result.history["loss"]),
        "train_accuracy": result.history["accuracy"][-1],
        "intact": accuracy(y_val, pred, k),
    }
    for where, lungs in data["regions"].items():
        audit, audit_probs, _ = lung_audit(
            result.model, x_val, y_val, lungs, classes, params["evaluate"]
        )
        row[f"{where}gradcam_lung_share"] = audit["gradcam_lung_share"]
        for v in ("lungs_hidden", "lungs_only"):
            row[f"{where}{v}"] = accuracy(y_val, audit_probs[v].argmax(axis=1), k)
    return row


def print_table(rows: list[dict], y_val: np.ndarray, region: str) -> None:
    lr = {r["focus"]: r for r in rows if r["name"] == "logistic_regression"}

    def cell(v):
        return f"{v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]"

    print(
        f"| model | lung focus | val accuracy | lungs hidden ({region}) | lungs only ({region}) "
        "| lungs hidden (shifted) | lungs only (shifted) | Grad-CAM in lungs (shifted) "
        "| vs LR (same focus): McNemar p | epochs | fit s |"
    )
    print("|---|---|---|---|---|---|---|---:|---|---:|---:|")
    for r in rows:
        test = mcnemar(y_val, r["pred"], lr[r["focus"]]["pred"])
        versus = "" if r["name"] == "logistic_regression" else f"{test['p_value']:.3g}"
        share = r.get("shifted_gradcam_lung_share")
        print(
            f"| {r['name']} | {r['focus']} | {cell(r['intact'])} | {cell(r['lungs_hidden'])} "
            f"| {cell(r['lungs_only'])} | {cell(r['shifted_lungs_hidden'])} "
            f"| {cell(r['shifted_lungs_only'])} | {'' if share is None else f'{share:.2f}'} "
            f"| {versus} | {r.get('epochs', '')} | {r.get('seconds', 0):.0f} |"
        )


if __name__ == "__main__":
    main()
