"""Hyper-parameter search with Optuna: `cxr tune <model>`.

One study per architecture, prepared data and search space (params.yaml's `tune:`), in
Optuna's storage: a journal file under `tuning/` by default (safe for several processes on
one machine), or a database URL (`tune.storage`, or $CXR_TUNE_STORAGE, which wins) that
workers on several machines fill together. Each trial fits one configuration with
`cxr.fit.fit` on the train split and scores it on the validation split (the test split is
never read): the objective is the best validation loss, the validation accuracy of that
epoch beside it. A pruner stops a trial whose per-epoch validation loss falls behind. The
workers that run the trials: cxr.tune_worker.

MLflow: one parent run per study (found again when the study resumes), one nested run per
trial (its params, per-epoch validation metrics, its state). The best configuration goes to
`tuned/<model>.yaml`; `cxr tune <model> --apply` trains it through the pipeline as a DVC
experiment.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import yaml

from cxr.errors import CxrError
from cxr.params import ParamsError, check_params, with_overrides
from cxr.tune_worker import fail_dead_trials, make_pruner, open_storage, run_worker

STORAGE_ENV = "CXR_TUNE_STORAGE"
RANGE_KEYS = {"low", "high", "log", "step"}


# --- the search space --------------------------------------------------------------------


def check_space(params: dict[str, Any], model: str) -> dict[str, Any]:
    """tune.space.<model>, validated: each key a setting of the model (builder argument,
    learning_rate, batch_size, schedule or augment.<key>); each value a list of choices or
    {low, high[, log, step]}; every choice and both ends give valid params."""
    from cxr.models import check_settings

    space = params["tune"]["space"].get(model)
    if not space:
        raise ParamsError(
            f"params.yaml: tune.space has no search space for {model!r} (has "
            f"{sorted(params['tune']['space'])}); add tune.space.{model}."
        )
    check_settings(model, params["models"][model], params["prepare"]["image_size"])
    for key, spec in space.items():
        where = f"tune.space.{model}.{key}"
        if key == "epochs":
            raise ParamsError(f"params.yaml: {where}: the budget is tune.epochs, not searched.")
        if isinstance(spec, list):
            values = spec
            if not values:
                raise ParamsError(f"params.yaml: {where} lists no choices.")
        elif isinstance(spec, dict) and {"low", "high"} <= set(spec) <= RANGE_KEYS:
            low, high = spec["low"], spec["high"]
            if not all(isinstance(v, int | float) for v in (low, high)) or not low < high:
                raise ParamsError(f"params.yaml: {where} needs numbers low < high, got {spec}.")
            if spec.get("log") and low <= 0:
                raise ParamsError(f"params.yaml: {where} is log-scaled: low must be > 0.")
            values = [low, high]
        else:
            raise ParamsError(
                f"params.yaml: {where} is {spec!r}; expected a list of choices or a mapping "
                "with low and high (and optionally log: true, step)."
            )
        for value in values:  # every choice, both ends: valid params, known keys
            trial_params = with_overrides(params, {f"models.{model}.{key}": value})
            try:
                check_params(trial_params)
                check_settings(
                    model, trial_params["models"][model], trial_params["prepare"]["image_size"]
                )
            except ParamsError as err:
                raise ParamsError(f"params.yaml: {where}: {value!r} would give: {err}") from err
    return space


def study_name(model: str, fingerprint: str, space: dict, base: dict[str, Any]) -> str:
    """The study a search belongs to: the model, the data, the space and every setting a
    trial starts from (a different profile or space is a new study, never a mix)."""
    digest = hashlib.sha256(
        json.dumps([space, base], sort_keys=True, default=str).encode()
    ).hexdigest()
    return f"cxr-{model}-{fingerprint[:8]}-{digest[:8]}"


def storage_url(params: dict[str, Any]) -> str | None:
    return os.environ.get(STORAGE_ENV) or params["tune"]["storage"]


# --- the command -------------------------------------------------------------------------


def cores() -> int:
    return len(os.sched_getaffinity(0))


def tune(
    params: dict[str, Any],
    model: str,
    prepared: Path,
    trials: int | None = None,
    workers: int = 1,
    profile: str | None = None,
    tuned_dir: Path = Path("tuned"),
    journal_dir: Path = Path("tuning"),
) -> dict[str, Any]:
    """Run (or continue) the study of `model` until it holds `trials` finished trials, with
    `workers` processes splitting this machine's cores; log it to MLflow; write the best
    configuration to tuned_dir/<model>.yaml. `params`: params.yaml with the profile applied."""
    import mlflow
    import optuna

    from cxr import tracking
    from cxr.files import read_json

    space = check_space(params, model)
    cfg = params["tune"]
    trials = cfg["trials"] if trials is None else trials
    if trials < 1 or workers < 1:
        raise CxrError(f"tune: trials ({trials}) and workers ({workers}) must be 1 or more.")
    if not (prepared / "dataset.json").is_file():
        raise CxrError(
            f"{prepared}/ is missing: tuning reads the prepared train and validation splits; "
            "run `dvc repro prepare` first."
        )
    dataset = read_json(prepared / "dataset.json")
    want = (params["prepare"]["image_size"], params["data"]["classes"])
    if (dataset["image_size"], dataset["classes"]) != want:
        raise CxrError(
            f"{prepared}/ holds {dataset['image_size']} px images of {dataset['classes']}, "
            f"but these params train on {want[0]} px images of {want[1]}: run "
            "`dvc repro prepare` with the same data and prepare settings first."
        )
    base = {k: v for k, v in params.items() if k in ("train", "models", "prepare", "data")}
    name = study_name(model, dataset["fingerprint"], space, {**base, "tune": cfg["epochs"]})
    url = storage_url(params)
    journal = journal_dir / f"{model}.journal"
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # this module prints its own lines
    storage = open_storage(url, journal)
    mlflow.set_tracking_uri(tracking.tracking_uri())
    study = optuna.create_study(
        study_name=name,
        storage=storage,
        direction="minimize",
        sampler=optuna.samplers.TPESampler(seed=cfg["seed"]),
        pruner=make_pruner(cfg["pruner"], cfg["epochs"]),
        load_if_exists=True,
    )
    if failed := fail_dead_trials(study):
        print(f"tune@{model}: trial(s) {failed} of a worker that was killed marked failed")
    done = _finished(study)
    print(
        f"tune@{model}: study {name} in {tracking.redact(url) if url else journal}: "
        f"{done} of {trials} trials finished; {workers} worker(s)",
        flush=True,
    )

    parent = _parent_run(params, model, name, space, url or str(journal.resolve()), profile)
    with mlflow.start_run(run_id=parent):  # running while its trials run
        if done < trials:
            job = {
                "params": params,
                "model": model,
                "prepared": str(prepared),
                "name": name,
                "url": url,
                "journal": str(journal),
                "trials": trials,
                "parent": parent,
            }
            _run_workers(job, workers, cfg["seed"] + len(study.trials))
        summary = _summarise(study, model, name, profile, parent, params)
        _log_study(study, summary)
    write_tuned(tuned_dir / f"{model}.yaml", summary)
    return summary


def _run_workers(job: dict[str, Any], workers: int, seed: int) -> None:
    """`workers` workers of `job` (this process when one), each with its share of the cores
    and its own seed (the same seed would draw the same random first trials; a resumed
    study passes a new one for the same reason)."""
    job = {**job, "threads": max(1, cores() // workers)}  # the cores split, not oversubscribed
    if workers == 1:
        run_worker({**job, "seed": seed})
    else:
        _spawn_workers([{**job, "seed": seed + k} for k in range(workers)])


def _finished(study) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


def _spawn_workers(jobs: list[dict[str, Any]]) -> None:
    """A process per job (`python -m cxr.tune_worker JOB`); they die with this process."""
    from cxr.processes import worker_dies_with_parent

    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "cxr.tune_worker", json.dumps(job)],
            preexec_fn=worker_dies_with_parent,
        )
        for job in jobs
    ]
    codes = [p.wait() for p in procs]
    if any(codes):
        raise CxrError(f"tuning worker(s) failed (exit status {codes}); see their output above.")


def _parent_run(params, model, name, space, where, profile) -> str:
    """The study's MLflow run: found by the study's name and storage, or started."""
    import mlflow

    from cxr import tracking

    mlflow.set_tracking_uri(tracking.tracking_uri())
    experiment_id = tracking.setup_experiment(params["mlflow"]["experiment"])
    where = tracking.redact(where).replace("'", "")  # a filter value: no quotes
    found = mlflow.search_runs(
        [experiment_id],
        filter_string=f"tags.`cxr.tune.study` = '{name}' and tags.`cxr.tune.parent` = 'true' "
        f"and tags.`cxr.tune.storage` = '{where}'",
        output_format="list",
    )
    if found:
        return found[0].info.run_id
    tags = {
        "cxr.stage": f"tune@{model}",
        "cxr.tune.study": name,
        "cxr.tune.parent": "true",
        "cxr.tune.storage": where,
        "cxr.group": tracking.execution_group(),
    }
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"tune@{model}", tags=tags) as run:
        cfg = params["tune"]
        mlflow.log_params(
            {
                "model": model,
                "sampler": f"TPESampler(seed={cfg['seed']})",
                "pruner": cfg["pruner"],
                "epochs_per_trial": cfg["epochs"],
                "storage": where,
                "profile": profile or "none",
            }
        )
        mlflow.log_dict(space, "search_space.json")
    return run.info.run_id


def _summarise(study, model, name, profile, parent, params) -> dict[str, Any]:
    from optuna.trial import TrialState

    states = {s.name.lower(): 0 for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
    for trial in study.get_trials(deepcopy=False):
        key = trial.state.name.lower()
        states[key] = states.get(key, 0) + 1
    best = study.best_trial if states["complete"] else None
    space = params["tune"]["space"][model]
    chosen = {}
    if best is not None:  # the values as params keys, choices decoded
        for key, value in best.params.items():
            chosen[f"models.{model}.{key}"] = (
                json.loads(value) if isinstance(space[key], list) else value
            )
    return {
        "model": model,
        "study": name,
        "profile": profile,
        "mlflow_run_id": parent,
        "trials": states,
        "best_trial": best.number if best else None,
        "val_loss": best.value if best else None,
        "val_accuracy": best.user_attrs.get("val_accuracy") if best else None,
        "params": chosen,
    }


def _log_study(study, summary) -> None:
    """The parent run: best value and params, trial counts, Optuna's figures."""
    import mlflow

    from cxr.figures import pyplot

    if summary["best_trial"] is not None:
        mlflow.log_metrics(
            {"best_val_loss": summary["val_loss"], "best_val_accuracy": summary["val_accuracy"]}
        )
        mlflow.set_tag("cxr.tune.best_trial", str(summary["best_trial"]))
        mlflow.log_dict(summary["params"], "best_params.json")
    mlflow.log_metrics({f"trials_{k}": v for k, v in summary["trials"].items()})
    import optuna
    import optuna.visualization.matplotlib as vis

    plt = pyplot()
    for figure, draw in (
        ("optimization_history", vis.plot_optimization_history),
        ("param_importances", vis.plot_param_importances),
        ("intermediate_values", vis.plot_intermediate_values),
    ):
        try:
            with warnings.catch_warnings():  # "experimental": the figures' look may change
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                axes = draw(study)
        except (ValueError, RuntimeError):  # too few trials for it
            continue
        fig = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
        mlflow.log_figure(fig, f"figures/{figure}.png")
        plt.close(fig)


def write_tuned(path: Path, summary: dict[str, Any]) -> None:
    """tuned/<model>.yaml: the best configuration as params keys, with where it came from."""
    from cxr.files import atomic_path

    path.parent.mkdir(parents=True, exist_ok=True)
    model = summary["model"]
    header = (
        f"# Written by `cxr tune {model}`: the best of study {summary['study']} (validation\n"
        f"# loss; MLflow run {summary['mlflow_run_id']}). Train it through the pipeline:\n"
        f"#   cxr tune {model} --apply"
        + (f" --profile {summary['profile']}" if summary["profile"] else "")
        + "\n"
    )
    with atomic_path(path) as tmp:
        tmp.write_text(header + yaml.safe_dump(summary, sort_keys=False))


def read_tuned(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CxrError(f"{path} not found: run `cxr tune {path.stem}` first.")
    return yaml.safe_load(path.read_text())
