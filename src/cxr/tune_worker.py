"""A tuning worker (`cxr tune`'s own process, or one of its `--workers N` processes:
`python -m cxr.tune_worker JOB`): it draws trials of one Optuna study from the shared
storage, fits each (`cxr.fit.fit` on the train split, scored on the validation split),
reports every epoch's validation loss to the pruner and logs the trial as a nested MLflow
run under the study's run, until the study holds the trials asked for."""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

import keras
import numpy as np

from cxr.params import with_overrides

# --- the trial's values and the study's storage ------------------------------------------


def suggest(trial, model: str, space: dict[str, Any]) -> dict[str, Any]:
    """The trial's values, as dotted params keys (models.<model>.<key>)."""
    chosen = {}
    for key, spec in space.items():
        if isinstance(spec, list):  # Optuna's choices must be scalars: lists go as JSON
            texts = [json.dumps(c) for c in spec]
            value = json.loads(trial.suggest_categorical(key, texts))
        elif all(isinstance(spec[k], int) for k in ("low", "high")) and not spec.get("log"):
            value = trial.suggest_int(key, spec["low"], spec["high"], step=spec.get("step", 1))
        else:
            value = trial.suggest_float(
                key, spec["low"], spec["high"], log=spec.get("log", False), step=spec.get("step")
            )
        chosen[f"models.{model}.{key}"] = value
    return chosen


def open_storage(url: str | None, journal: Path):
    """Optuna's storage: a database URL (with heartbeats: a dead worker's trial is failed
    after 3 minutes), or the journal file (one machine: see fail_dead_trials)."""
    import optuna
    from optuna.storages.journal import JournalFileBackend

    if url:
        return optuna.storages.RDBStorage(url, heartbeat_interval=30, grace_period=180)
    journal.parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(JournalFileBackend(str(journal)))


def fail_dead_trials(study) -> list[int]:
    """Trials left running by a worker of this machine that no longer runs (killed): failed,
    so that the study goes on without them, and their MLflow runs ended KILLED. Another
    machine's are its own (a database's heartbeats fail them)."""
    import mlflow
    from optuna.trial import TrialState

    from cxr.processes import alive

    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        host, _, pid = str(trial.user_attrs.get("worker", "")).rpartition(":")
        if host == socket.gethostname() and pid.isdigit() and not alive(int(pid)):
            # private: pinned by tests/test_private_apis.py
            study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
            failed.append(trial.number)
            if run_id := trial.user_attrs.get("mlflow_run_id"):
                client = mlflow.MlflowClient()
                client.set_tag(run_id, "cxr.tune.state", "killed")
                client.set_terminated(run_id, "KILLED")
    return failed


def make_pruner(name: str, epochs: int):
    import optuna

    if name == "median":  # from epoch 2 on (one epoch says little), against finished trials
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=2)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=epochs)
    return optuna.pruners.NopPruner()


# --- a worker ----------------------------------------------------------------------------


class Reporter(keras.callbacks.Callback):
    """Each epoch's validation loss to the trial (pruning it when the pruner says so), and
    the epoch's figures to the trial's MLflow run."""

    def __init__(self, trial):
        super().__init__()
        self.trial = trial

    def on_epoch_end(self, epoch, logs=None):
        import mlflow
        import optuna

        logs = {k: float(v) for k, v in (logs or {}).items() if k != "learning_rate"}
        mlflow.log_metrics(logs, step=epoch + 1)
        self.trial.report(logs["val_loss"], epoch + 1)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned after epoch {epoch + 1}")


class Objective:
    """One trial of the study: its values drawn, fitted, scored on the validation split, and
    logged as a nested MLflow run (state complete, pruned or failed)."""

    def __init__(self, job: dict[str, Any]):
        import mlflow

        from cxr import tracking
        from cxr.fit import accelerator_settings, settings_for
        from cxr.prepared import split_arrays

        self.job, self.params, self.model = job, job["params"], job["model"]
        self.space = self.params["tune"]["space"][self.model]
        base_cfg, _ = settings_for(self.model, self.params)
        self.accel = accelerator_settings({**base_cfg, "threads": job["threads"]})
        prepared = Path(job["prepared"])
        self.train = split_arrays(prepared, "train")[:2]
        x_val, y_val, summary = split_arrays(prepared, "val")
        self.val, self.n_classes = (x_val, y_val), len(summary["classes"])
        mlflow.set_tracking_uri(tracking.tracking_uri())
        self.experiment_id = tracking.setup_experiment(self.params["mlflow"]["experiment"])

    def __call__(self, trial) -> float:
        import mlflow
        import optuna

        from cxr import tracking

        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        overrides = suggest(trial, self.model, self.space)
        keras.backend.clear_session()
        tags = {
            "cxr.stage": f"tune@{self.model}",
            "cxr.tune.study": self.job["name"],
            "cxr.tune.trial": str(trial.number),
            "cxr.group": tracking.execution_group(),
        }
        pruned = None
        with mlflow.start_run(
            experiment_id=self.experiment_id,
            run_name=f"tune@{self.model} trial {trial.number}",
            tags=tags,
            parent_run_id=self.job["parent"],
            nested=True,  # under the parent, active in `tune`'s process
        ) as run:  # an exception ends it FAILED; a pruned trial's run ends FINISHED
            trial.set_user_attr("mlflow_run_id", run.info.run_id)
            mlflow.log_params({k.split(".", 2)[2]: v for k, v in overrides.items()})
            mlflow.set_tag("cxr.tune.state", "failed")  # until it ends otherwise
            try:
                history = self._fit(trial, overrides)
            except optuna.TrialPruned as err:
                mlflow.set_tag("cxr.tune.state", "pruned")
                pruned = err
            else:
                best = int(np.argmin(history["val_loss"]))
                trial.set_user_attr("val_accuracy", history["val_accuracy"][best])
                trial.set_user_attr("epochs", len(history["val_loss"]))
                mlflow.log_metrics(
                    {
                        "best_val_loss": history["val_loss"][best],
                        "best_val_accuracy": history["val_accuracy"][best],
                    }
                )
                mlflow.set_tag("cxr.tune.state", "complete")
        if pruned is not None:
            raise pruned  # after the run ended FINISHED
        return history["val_loss"][best]

    def _fit(self, trial, overrides: dict[str, Any]) -> dict[str, list[float]]:
        from cxr.fit import fit, settings_for

        cfg, builder_cfg = settings_for(self.model, with_overrides(self.params, overrides))
        cfg["epochs"] = self.params["tune"]["epochs"]
        fitted = fit(
            self.model, cfg, builder_cfg, self.train, self.val, self.n_classes, self.accel,
            callbacks=[Reporter(trial)], progress=False,
        )  # fmt: skip
        return fitted.history


def run_worker(job: dict[str, Any]) -> None:
    """Run trials of study job["name"] until it holds job["trials"] finished (complete or
    pruned). `job`: what `tune` hands each worker (JSON, for worker processes): params,
    model, prepared, name, url, journal, trials, parent (MLflow run), threads, seed."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    params = job["params"]
    study = optuna.load_study(
        study_name=job["name"],
        storage=open_storage(job["url"], Path(job["journal"])),
        sampler=optuna.samplers.TPESampler(seed=job["seed"]),
        pruner=make_pruner(params["tune"]["pruner"], params["tune"]["epochs"]),
    )
    study.optimize(
        Objective(job),
        callbacks=[
            optuna.study.MaxTrialsCallback(
                job["trials"],
                states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED),
            ),
            progress_line(job["model"]),
        ],
        catch=(),
    )


def progress_line(model: str):
    """An Optuna callback: one line per finished trial, and the best so far."""

    def line(study, trial) -> None:
        from optuna.trial import TrialState

        params = ", ".join(f"{k} {_short(v)}" for k, v in trial.params.items())
        if trial.state == TrialState.COMPLETE:
            what = (
                f"val_loss {trial.value:.4f}, val_accuracy "
                f"{trial.user_attrs.get('val_accuracy', float('nan')):.4f}"
            )
        else:
            what = trial.state.name.lower()
            if trial.state == TrialState.PRUNED and trial.intermediate_values:
                last = max(trial.intermediate_values)
                what += f" after epoch {last} (val_loss {trial.intermediate_values[last]:.4f})"
        try:
            best = f"best: trial {study.best_trial.number}, {study.best_value:.4f}"
        except ValueError:
            best = "best: none yet"
        print(f"tune@{model} trial {trial.number}: {what} | {params} | {best}", flush=True)

    return line


def _short(value: Any) -> str:
    if isinstance(value, str):  # a choice, JSON-encoded for Optuna
        value = json.loads(value)
    return f"{value:.4g}" if isinstance(value, float) else str(value)


if __name__ == "__main__":  # a worker of `cxr tune --workers N`
    from cxr.console import quiet

    quiet()
    run_worker(json.loads(sys.argv[1]))
