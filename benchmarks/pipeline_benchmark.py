"""Wall time of the whole pipeline, stage by stage, and where each stage's time goes.

    python benchmarks/pipeline_benchmark.py            # the offline demo (params.yaml's demo:)
    python benchmarks/pipeline_benchmark.py --full --epochs 10    # database-sized, e.g. on a GPU
        [-S key=value ...] [--workdir DIR] [--out FILE.json] [--keep]

Runs `dvc exp run --temp --force` (every stage really runs; your workspace, dvc.lock and
params.yaml stay as they are) against a throw-away MLflow store in --workdir, stamps the time
of each of DVC's "Running stage" lines, and collects the phase line that the train and
evaluate stages print (start-up, data, build, fit, checkpoints, logging, ...). Prints one
table: start-to-start wall time of every stage (DVC's own work between stages included) and
its phases. The experiment is removed afterwards unless --keep.

--full: 21,165 phantoms at 299 px with the database's class counts (written once into
--workdir), read as an archive in the Kaggle layout, balanced to 4 x 3,616 by the default
prepare settings (224 px), all six models for --epochs epochs each (early stopping off, so
every epoch runs), transfer models with --weights (default none: no download needed).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cxr import machine
from cxr.classes import DATABASE_COUNTS
from cxr.cli import environment_first_on_path, exp_run_command
from cxr.params import load_params
from cxr.synthetic import write_dataset
from cxr.timing import parse

STAGE = re.compile(r"Running stage '(?P<stage>[^']+)'")
TRANSFER = ("vgg16", "vgg19", "resnet50v2")


def database_phantoms(workdir: Path) -> Path:
    """A folder in the Kaggle layout with the database's class counts (written once)."""
    root = workdir / "database"
    if not (root / ".complete").exists():
        for label, n in DATABASE_COUNTS.items():
            write_dataset(root, per_class=n, size=299, seed=0, labels=(label,))
        (root / ".complete").touch()
    return root


def overrides(args: argparse.Namespace) -> dict:
    params = load_params()
    if not args.full:
        chosen = dict(params["demo"])
    else:
        chosen = {
            "data.source": "archive",
            "data.archive": str(database_phantoms(args.workdir).resolve()),
            "train.epochs": args.epochs,
            "train.early_stopping_patience": args.epochs,
            **{f"models.{name}.weights": args.weights for name in TRANSFER},
        }
    for item in args.set:
        key, _, value = item.partition("=")
        chosen[key] = value
    return chosen


def run(command: list[str], env: dict) -> tuple[int, list[tuple[float, str]]]:
    """Run `command`, echo its output, return (exit code, [(seconds since start, line)])."""
    started = time.perf_counter()
    lines = []
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    for line in proc.stdout:
        lines.append((time.perf_counter() - started, line.rstrip("\n")))
        sys.stdout.write(line)
    code = proc.wait()
    lines.append((time.perf_counter() - started, ""))
    return code, lines


def stage_table(lines: list[tuple[float, str]]) -> list[dict]:
    """Per stage: start-to-start seconds and the phases the stage printed."""
    starts = [(t, m["stage"]) for t, line in lines if (m := STAGE.search(line))]
    end = lines[-1][0]
    phases = {}
    for _, line in lines:
        if parsed := parse(line):
            phases[parsed[0]] = parsed[2]
    rows = []
    for i, (t, stage) in enumerate(starts):
        until = starts[i + 1][0] if i + 1 < len(starts) else end
        rows.append({"stage": stage, "seconds": round(until - t, 1), "phases": phases.get(stage)})
    return rows


def run_seconds(store: Path) -> dict[str, float]:
    """Per stage, the duration MLflow shows for its run (end - start): a training run ends
    when training ends, so it should be its stage's wall time less the start-up."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{store.resolve()}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    return {
        r.data.tags["cxr.stage"]: (r.info.end_time - r.info.start_time) / 1000
        for r in runs
        if "cxr.stage" in r.data.tags and r.info.end_time
    }


def add_experiment_arguments(parser: argparse.ArgumentParser, workdir: str) -> None:
    """The options of a benchmark that runs the pipeline as one throw-away DVC experiment."""
    parser.add_argument("-S", "--set", action="append", default=[], help="extra key=value")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / workdir)
    parser.add_argument("--out", type=Path, help="also write the figures as JSON here")
    parser.add_argument("--keep", action="store_true", help="keep the DVC experiment")


def run_experiment(
    overrides: dict, workdir: Path, prefix: str
) -> tuple[str, list[str], int, list[tuple[float, str]]]:
    """`dvc exp run --temp --force` of `overrides` against a throw-away sqlite MLflow store
    in `workdir`; return (experiment name, command, exit code, timed output lines)."""
    environment_first_on_path()  # dvc and the stages' python: this venv's, activated or not
    workdir.mkdir(parents=True, exist_ok=True)
    name = f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"
    command = [*exp_run_command(overrides), "--force", "--name", name]
    store = workdir / f"{name}.db"
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store.resolve()}"}
    print("+", " ".join(command), flush=True)
    code, lines = run(command, env)
    return name, command, code, lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--full", action="store_true", help="21,165 phantoms, all six models")
    parser.add_argument("--epochs", type=int, default=10, help="with --full")
    parser.add_argument("--weights", default="none", help="with --full: transfer models' weights")
    add_experiment_arguments(parser, "cxr-pipeline-bench")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)

    name, command, code, lines = run_experiment(overrides(args), args.workdir, "bench")
    rows = stage_table(lines)
    total = lines[-1][0]
    durations = run_seconds(args.workdir / f"{name}.db")
    for row in rows:
        row["mlflow_run_seconds"] = durations.get(row["stage"])

    print(f"\n# {'full' if args.full else 'demo'} pipeline: {total:.0f} s, exit code {code}")
    facts = machine.facts()  # read once: the printed header and the JSON say the same
    print(f"# {machine.header(f=facts)}\n")
    print("| stage | wall s | its MLflow run s | phases (s) |")
    print("|---|---:|---:|---|")
    for row in rows:
        phases = ", ".join(f"{k} {v:.1f}" for k, v in (row["phases"] or {}).items())
        logged = row["mlflow_run_seconds"]
        logged = "" if logged is None else f"{logged:.1f}"
        print(f"| {row['stage']} | {row['seconds']:.1f} | {logged} | {phases} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            json.dumps(
                {"machine": facts, "command": command, "seconds": total, "stages": rows},
                indent=2,
            )
        )
    if not args.keep:
        subprocess.run(["dvc", "exp", "remove", name], check=False, capture_output=True)
    sys.exit(code)


if __name__ == "__main__":
    main()
