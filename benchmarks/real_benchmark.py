"""The pipeline on real radiographs against pixel baselines, on the pipeline's own test split.

    python benchmarks/real_benchmark.py --archive real-dev
        [--profile real_cpu] [--classes covid normal pneumonia] [-S key=value ...]
        [--workdir DIR] [--out FILE.json] [--keep]

Runs the whole pipeline on the archive (a zip or folder in the Kaggle layout) with the
overrides of a params.yaml profile (`real_cpu:` by default; `demo:` gives the demo's
settings), through `dvc exp run --temp --force` against a throw-away MLflow store in
--workdir; params.yaml, dvc.lock and the workspace stay as they are. Then, on the same test
images, it scores pixel baselines fitted on the same training split (`cxr.baselines`:
logistic regression on 64x64 pixels, C=0.1, the bar; PCA + RBF SVM) and prints one table:
accuracy and macro-F1 of every model and baseline with 95 % intervals (Wilson; bootstrap, the
evaluate stage's method and seed on both sides), an exact McNemar test of each model against
the logistic regression, and each model's training time (the train stage's fit phase) and
stage wall time. The lung audit too: every model's accuracy with the lungs hidden and with
only the lungs visible (its evaluate stage's), and the baselines' on the same views of the
same test images; with `train.lung_focus: template` the baselines fit and predict on the
lung-focused pixels (`cxr.lungs.focus_array`), the bar a lung-focused model must beat.
The experiment's outputs (Grad-CAM overlays included) are copied to --workdir/<experiment>/
before the experiment is removed (unless --keep).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipeline_benchmark import add_experiment_arguments, run_experiment, stage_table  # noqa: E402

from cxr import machine  # noqa: E402
from cxr.baselines import BASELINES, fit_predict  # noqa: E402
from cxr.cli import check_data_folder  # noqa: E402
from cxr.download import download  # noqa: E402
from cxr.lungs import audit_inputs, focus_array  # noqa: E402
from cxr.metrics import intervals, macro_f1, mcnemar  # noqa: E402
from cxr.params import load_params, parse_yaml, with_overrides  # noqa: E402
from cxr.prepare import prepare  # noqa: E402
from cxr.prepared import load_prepared, split_arrays, split_masks  # noqa: E402

REFERENCE = "logistic_regression"


def overrides(args: argparse.Namespace) -> dict:
    chosen = dict(load_params()[args.profile])
    chosen.update(
        {
            "data.source": "archive",
            "data.archive": str(args.archive.resolve()),
            "data.classes": list(args.classes),
        }
    )
    for item in args.set:
        key, _, value = item.partition("=")
        chosen[key] = parse_yaml(value)  # as DVC reads it (YAML 1.2): numbers, lists, booleans
    return chosen


def experiment_ref(name: str) -> str:
    refs = subprocess.run(
        ["git", "for-each-ref", "--format=%(refname)", "refs/exps"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    found = [r for r in refs if r.endswith(f"/{name}")]
    if not found:
        sys.exit(f"real_benchmark: no DVC experiment named {name} (did the pipeline fail?)")
    return found[0]


def git_show(ref: str, path: str) -> bytes:
    return subprocess.run(["git", "show", f"{ref}:{path}"], capture_output=True, check=True).stdout


def export_outputs(ref: str, dest: Path) -> None:
    """The experiment's git-tracked outputs (metrics, predictions, figures, reports)."""
    paths = subprocess.run(
        ["git", "ls-tree", "-r", "--name-only", ref, "evaluation", "reports"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for path in paths:
        (dest / path).parent.mkdir(parents=True, exist_ok=True)
        (dest / path).write_bytes(git_show(ref, path))


def model_predictions(ref: str, model: str, classes: list[str]) -> tuple[list[str], np.ndarray]:
    """(test image paths, predicted class indices) from the experiment's predictions.csv."""
    text = git_show(ref, f"evaluation/{model}/predictions.csv").decode()
    rows = list(csv.DictReader(io.StringIO(text)))
    index = {c: i for i, c in enumerate(classes)}
    return [r["path"] for r in rows], np.array([index[r["predicted"]] for r in rows])


def same_split(params: dict, scratch: Path) -> tuple:
    """(x_train, y_train, x_test, y_test, test image paths from raw/ on, dataset summary) of
    the archive prepared again in `scratch` with the experiment's settings: prepare is
    deterministic, so this is the experiment's split (the caller checks the test paths)."""
    data = params["data"]
    download(data, scratch / "raw", scratch / "download.json", cache_dir=scratch / "cache")
    prepare(
        scratch / "raw",
        [],
        data["classes"],
        params["prepare"],
        scratch / "prepared",
        topup=data["topup"],
    )
    x_train, y_train, summary = split_arrays(scratch / "prepared", "train")
    x_test, y_test, _ = split_arrays(scratch / "prepared", "test")
    summary["test_masks"], where = split_masks(scratch / "prepared", "test")
    summary["lung_masks"] = all(w == "file" for w in where)  # else the template, somewhere
    # Manifest paths are relative to the working folder: compare them from raw/ on.
    raw = (scratch / "raw").resolve()
    test_paths = [
        Path(r["path"]).resolve().relative_to(raw).as_posix()
        for r in load_prepared(scratch / "prepared")[1]
        if r["split"] == "test"
    ]
    return x_train, y_train, x_test, y_test, test_paths, summary


def interval(values: tuple[float, float, float]) -> str:
    return f"{values[0]:.3f} [{values[1]:.3f}, {values[2]:.3f}]"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--archive", type=Path, required=True, help="zip or folder, Kaggle layout")
    parser.add_argument("--profile", default="real_cpu", help="params.yaml section of overrides")
    parser.add_argument("--classes", nargs="+", default=["covid", "normal", "pneumonia"])
    add_experiment_arguments(parser, "cxr-real-bench")
    args = parser.parse_args()
    if not args.archive.exists():
        sys.exit(f"real_benchmark: {args.archive} does not exist; pass --archive DIR_OR_ZIP.")
    check_data_folder()

    chosen = overrides(args)
    params = with_overrides(load_params(), chosen)
    name, command, code, lines = run_experiment(chosen, args.workdir, "real")
    if code:
        sys.exit(f"real_benchmark: the pipeline failed (exit code {code}); see its output above.")
    stages = {row["stage"]: row for row in stage_table(lines)}
    ref = experiment_ref(name)
    outputs = args.workdir / name
    export_outputs(ref, outputs)

    scratch = args.workdir / f"{name}-prepare"
    x_train, y_train, x_test, y_test, test_paths, summary = same_split(params, scratch)
    classes = summary["classes"]
    rows, predictions = baseline_rows(params, x_train, y_train, x_test, y_test, summary)
    for model in params["train"]["models"]:
        row, predictions[model] = model_row(ref, model, classes, test_paths, stages)
        rows.append(row)
    add_scores(rows, predictions, y_test, len(classes), params["evaluate"])
    shutil.rmtree(scratch, ignore_errors=True)

    total = lines[-1][0]
    champion = json.loads(git_show(ref, "reports/compare/summary.json"))["champion"]
    print(f"\n# real radiographs: {args.archive}, profile {args.profile}, classes {classes}")
    print(
        f"# {len(x_train)} train / {len(y_test)} test images at {summary['image_size']} px; "
        f"pipeline {total / 60:.1f} min\n# {machine.header()}\n"
    )
    print(
        f"# lung focus: {params['train']['lung_focus']}; audit lungs: "
        f"{'the test images own masks' if summary['lung_masks'] else 'the lung template'}\n"
    )
    print_table(rows, champion)
    verdict = say_verdict(rows, champion)
    print(f"Outputs (Grad-CAM overlays included): {outputs}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        figures = {"experiment": name, "command": command, "seconds": total, "rows": rows}
        args.out.write_text(json.dumps({**figures, "verdict": verdict}, indent=2))
    if not args.keep:
        subprocess.run(["dvc", "exp", "remove", name], check=False, capture_output=True)


def baseline_rows(params, x_train, y_train, x_test, y_test, summary) -> tuple[list, dict]:
    """(a row per pixel baseline, their test predictions): each fitted on the training split
    and scored on the test images intact and in the audit's views (lung-focused as the
    models are, with `train.lung_focus: template`)."""
    ev = params["evaluate"]
    n_classes = len(summary["classes"])
    rows, predictions = [], {}
    views = audit_inputs(x_test, summary["test_masks"])
    if params["train"]["lung_focus"] == "template":  # the baselines see what the models see
        margin = params["train"]["lung_focus_margin"]
        x_train = focus_array(x_train, margin)
        views = {k: focus_array(v, margin) for k, v in views.items()}
    for baseline in BASELINES:
        t0 = time.perf_counter()
        seen = fit_predict(baseline, x_train, y_train, list(views.values()), seed=ev["seed"])
        predictions[baseline] = seen[0]
        audit = {}
        for view, pred in zip(list(views)[1:], seen[1:], strict=True):
            ci = intervals(y_test, pred, n_classes, ev["bootstrap"], ev["ci_level"], ev["seed"])
            audit[view] = (float((pred == y_test).mean()), *ci["accuracy"])
        row = {"name": baseline, "kind": "baseline", "fit_seconds": time.perf_counter() - t0}
        rows.append({**row, **audit})
    return rows, predictions


def model_row(ref, model, classes, test_paths, stages) -> tuple[dict, np.ndarray]:
    """(the row of a model the experiment trained, its test predictions), its audit figures
    from its evaluate stage, its times from the train stage's."""
    paths, pred = model_predictions(ref, model, classes)
    if [Path(p).relative_to("raw").as_posix() for p in paths] != test_paths:
        sys.exit(f"real_benchmark: {model}'s test images differ from the baselines' split.")
    phases = stages.get(f"train@{model}", {}).get("phases") or {}
    test = json.loads(git_show(ref, f"evaluation/{model}/test.json"))
    row = {
        "name": model,
        "kind": "model",
        "fit_seconds": phases.get("fit"),
        "stage_seconds": stages.get(f"train@{model}", {}).get("seconds"),
        **{
            view: tuple(test[f"{view}_accuracy{end}"] for end in ("", "_ci_low", "_ci_high"))
            for view in ("lungs_hidden", "lungs_only")
        },
    }
    return row, pred


def add_scores(rows: list, predictions: dict, y_test, n_classes: int, ev: dict) -> None:
    """Each row's accuracy and macro-F1 with intervals, and McNemar against the reference."""
    for row in rows:
        pred = predictions[row["name"]]
        ci = intervals(y_test, pred, n_classes, ev["bootstrap"], ev["ci_level"], ev["seed"])
        row["accuracy"] = (float((pred == y_test).mean()), *ci["accuracy"])
        row["macro_f1"] = (macro_f1(y_test, pred, n_classes), *ci["macro_f1"])
        row["mcnemar_vs_lr"] = mcnemar(y_test, pred, predictions[REFERENCE])


def print_table(rows: list, champion: str) -> None:
    print(
        "| model | accuracy [95 % CI] | macro-F1 [95 % CI] "
        "| vs LR: McNemar p (only it / only LR correct) | accuracy, lungs hidden "
        "| accuracy, lungs only | fit s | stage s |"
    )
    print("|---|---|---|---|---|---|---:|---:|")
    for row in rows:
        test = row["mcnemar_vs_lr"]
        versus = (
            ""
            if row["name"] == REFERENCE
            else (f"{test['p_value']:.3g} ({test['a_only_correct']} / {test['b_only_correct']})")
        )
        fit = f"{row['fit_seconds']:.0f}" if row.get("fit_seconds") is not None else ""
        stage = f"{row['stage_seconds']:.0f}" if row.get("stage_seconds") is not None else ""
        mark = " (champion)" if row["name"] == champion else ""
        print(
            f"| {row['name']}{mark} | {interval(row['accuracy'])} | {interval(row['macro_f1'])} "
            f"| {versus} | {interval(row['lungs_hidden'])} | {interval(row['lungs_only'])} "
            f"| {fit} | {stage} |"
        )


def say_verdict(rows: list, champion: str) -> dict:
    """Whether the champion beats the logistic regression (above its interval, McNemar), and
    whether every model beats its point estimate: printed, and returned."""
    lr = next(r for r in rows if r["name"] == REFERENCE)
    best = next(r for r in rows if r["name"] == champion)
    models = [r for r in rows if r["kind"] == "model"]
    verdict = {
        "champion": champion,
        "champion_above_lr_ci": best["accuracy"][0] > lr["accuracy"][2],
        "champion_mcnemar_p": best["mcnemar_vs_lr"]["p_value"],
        "all_above_lr_point": all(r["accuracy"][0] > lr["accuracy"][0] for r in models),
    }
    above = "above" if verdict["champion_above_lr_ci"] else "NOT above"
    print(
        f"\nchampion {champion}: accuracy {best['accuracy'][0]:.3f}, {above} the logistic "
        f"regression's upper bound {lr['accuracy'][2]:.3f}; McNemar p = "
        f"{verdict['champion_mcnemar_p']:.3g}; every model above the LR's point estimate: "
        f"{verdict['all_above_lr_point']}."
    )
    return verdict


if __name__ == "__main__":
    main()
