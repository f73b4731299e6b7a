"""The DVC <-> MLflow contract, used by every stage that logs to MLflow.

- Store: `MLFLOW_TRACKING_URI` when set; otherwise `sqlite:///<root>/mlflow.db` with artefacts
  in `<root>/mlartifacts`, where <root> is `$DVC_ROOT` (DVC sets it to the user's repository,
  also for `dvc exp run --temp/--queue`, which run in a copy under .dvc/tmp) or the folder
  holding `.dvc/`. So `mlflow ui` started in the repository root shows every run.
- Group: the runs of one pipeline execution share the tag `cxr.group`: the DVC experiment
  name (`DVC_EXP_NAME`) when DVC sets one, else `repro-<hash of the git commit, dvc.yaml,
  params.yaml and data.dvc>` (what decides a plain `dvc repro`'s results; dvc.lock is left
  out because each finished stage rewrites it).
- Parent: `mlflow run` exports `MLFLOW_RUN_ID`, which would make `mlflow.start_run()` resume
  that one run in every stage. We take it as the parent of the pipeline's runs instead.
- Run-cache: DVC may restore a stage's outputs from its run-cache without running it; then no
  MLflow code would run. Stages that log to MLflow therefore write their run record
  (`mlflow_run.json`) as an output with `cache: false`, which turns the run-cache off for
  that stage (DVC skips it for stages with uncached outputs): whenever DVC's results of such
  a stage change, the stage really ran and logged its run. `find_recorded_run` tells whether
  a record's run is in the current store (a clone may point at another one).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from cxr.io import read_json, write_json

LOCK_FILE = Path("requirements.lock")  # stages run in the repository root
# What a logged model needs to load and serve; exact versions come from the lock file.
MODEL_REQUIREMENTS = ("mlflow", "keras", "tensorflow", "numpy")

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
GROUP_FILES = ("dvc.yaml", "params.yaml", "data.dvc")


def repo_root(start: Path | None = None) -> Path:
    """The user's repository root: `$DVC_ROOT`, else the nearest folder with `.dvc/`."""
    if os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"]).resolve()
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / ".dvc").is_dir():
            return folder
    return here


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repo_root() / 'mlflow.db'}"


def redact(uri: str) -> str:
    """Drop a password from a URI so it never reaches a tag, a param or a file."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    user = f"{parts.username}:***@" if parts.username else ""
    return urlunsplit((parts.scheme, user + host, parts.path, parts.query, parts.fragment))


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return ""
    return out.stdout.strip()


def git_commit() -> str:
    return _git("rev-parse", "HEAD") or "unknown"


def execution_group() -> str:
    if os.environ.get("DVC_EXP_NAME"):
        return os.environ["DVC_EXP_NAME"]
    digest = hashlib.sha256(git_commit().encode())
    for name in GROUP_FILES:
        path = Path(name)
        digest.update(path.read_bytes() if path.is_file() else b"-")
    return f"repro-{digest.hexdigest()[:12]}"


def setup_experiment(name: str) -> str:
    """Point MLflow at the project's store; return the id of experiment `name`, made if new."""
    import mlflow

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        artifact_location = None
        if not uri.startswith(("http://", "https://", "databricks")):
            # A database store with no server: keep artefacts beside it, not under the
            # current folder (a DVC temp copy in .dvc/tmp for `dvc exp run --temp`).
            artifact_location = (repo_root() / "mlartifacts" / name).as_uri()
        try:
            experiment_id = client.create_experiment(name, artifact_location=artifact_location)
        except Exception:  # another stage made it first (parallel `dvc queue` workers)
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
            experiment_id = experiment.experiment_id
    else:
        experiment_id = experiment.experiment_id
    if experiment is None or experiment.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
        client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return experiment_id


def run_tags(stage: str, data_fingerprint: str) -> dict[str, str]:
    tags = {
        "cxr.group": execution_group(),
        "cxr.stage": stage,
        "cxr.data_fingerprint": data_fingerprint,
        "mlflow.source.git.commit": git_commit(),
    }
    if os.environ.get("DVC_EXP_NAME"):
        tags["cxr.dvc_experiment"] = os.environ["DVC_EXP_NAME"]
    return tags


@contextlib.contextmanager
def start_run(
    experiment: str, run_name: str, tags: dict[str, str], run_id: str | None = None
) -> Iterator[Any]:
    """Start this stage's own run in the group (or resume `run_id`, a killed training's run);
    an `mlflow run` parent becomes its parent."""
    import mlflow

    experiment_id = setup_experiment(experiment)
    parent = os.environ.pop("MLFLOW_RUN_ID", None)
    try:
        if run_id is not None:
            with mlflow.start_run(run_id=run_id) as run:
                yield run
            return
        with mlflow.start_run(
            experiment_id=experiment_id, run_name=run_name, tags=tags, parent_run_id=parent
        ) as run:
            yield run
    finally:
        if parent is not None:
            os.environ["MLFLOW_RUN_ID"] = parent


def write_run_record(path: Path, run: Any, **extra: Any) -> None:
    write_json(
        path,
        {
            "run_id": run.info.run_id,
            "experiment_id": run.info.experiment_id,
            "run_name": run.info.run_name,
            "tracking_uri": redact(tracking_uri()),
            "group": run.data.tags.get("cxr.group"),
            **extra,
        },
    )


def find_run(run_id: str) -> Any | None:
    """The run `run_id` in the current store, or None when the store does not hold it."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    try:
        return mlflow.MlflowClient().get_run(run_id)
    except mlflow.exceptions.MlflowException:
        return None


def find_recorded_run(path: Path) -> Any | None:
    """The MLflow run named by a run record, or None when the current store does not hold it
    (a clone may point at another store)."""
    return find_run(read_json(path)["run_id"])


def log_data_report(params: dict[str, Any], report: dict[str, Any], report_dir: Path) -> None:
    """Log prepare's report as this execution's `prepare` run (params, counts, files)."""
    import mlflow

    from cxr.params import flatten

    tags = run_tags(stage="prepare", data_fingerprint=report["fingerprint"])
    with start_run(params["mlflow"]["experiment"], "prepare", tags):
        mlflow.log_params({f"prepare.{k}": v for k, v in flatten(params["prepare"]).items()})
        mlflow.log_params(
            {"data.classes": ",".join(report["classes"]), "data.topup": params["data"]["topup"]}
        )
        counts = {
            f"n_{split}_{label}": n
            for split, per in report["counts"].items()
            for label, n in per.items()
        }
        mlflow.log_metrics(
            {
                "n_images": report["n_images"],
                "n_rejected": len(report["rejects"]),
                "n_conflicts": len(report["conflicts"]),
                **counts,
            }
        )
        mlflow.log_artifacts(str(report_dir), artifact_path="data_report")


def pinned_requirements(
    names: tuple[str, ...] = MODEL_REQUIREMENTS, lock: Path = LOCK_FILE
) -> list[str] | None:
    """`name==version` lines of `names` from the lock file (None if absent)."""
    if not lock.is_file():
        return None
    pins = {}
    for line in lock.read_text().splitlines():
        name, sep, _ = line.partition("==")
        if sep and name.strip().lower() in names:
            pins[name.strip().lower()] = line.strip()
    return [pins[name] for name in names if name in pins]
