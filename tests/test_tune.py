"""`cxr tune`: the search space's checks (unit), and a study on phantoms at 32 px run as a
user would (e2e): two workers sharing the journal, a killed worker's study resumed, pruning,
the MLflow parent and trial runs, and the best configuration trained by `dvc exp run`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
import yaml

from cxr.params import ParamsError, load_params, with_overrides
from tests.conftest import BIN, GIT_IDENTITY, ROOT, TINY, copy_repo, run, set_params

e2e = pytest.mark.e2e


@pytest.mark.parametrize(
    ("key", "spec", "message"),
    [
        ("dropuot", {"low": 0.0, "high": 0.5}, "did you mean 'dropout'"),
        ("dropout", {"low": 0.5, "high": 0.1}, "low < high"),
        ("learning_rate", {"low": 0.0, "high": 0.1, "log": True}, "log-scaled"),
        ("augment.zoom", {"low": 0.0, "high": 2.0}, "models.cnn.augment.zoom is 2.0"),
        ("batch_size", [], "no choices"),
        ("schedule", ["constant", "linear"], "models.cnn.schedule is 'linear'"),
        ("epochs", [5, 10], "tune.epochs"),
        ("dropout", 0.3, "a list of choices or a mapping"),
    ],
)
def test_a_bad_search_space_is_named_before_any_trial(key, spec, message):
    from cxr.tune import check_space

    params = with_overrides(load_params(ROOT / "params.yaml"), {"tune.space.cnn": {key: spec}})
    with pytest.raises(ParamsError, match=message):
        check_space(params, "cnn")


def test_every_shipped_search_space_is_valid_and_suggests_params_keys():
    import optuna

    from cxr.tune import check_space
    from cxr.tune_worker import suggest

    params = load_params(ROOT / "params.yaml")
    for model in params["tune"]["space"]:
        space = check_space(params, model)
        trial = optuna.create_study().ask()
        chosen = suggest(trial, model, space)
        assert set(chosen) == {f"models.{model}.{key}" for key in space}
        with_overrides(params, chosen)  # a valid configuration (checked by check_space)
    filters = suggest(optuna.create_study().ask(), "cnn", check_space(params, "cnn"))
    assert isinstance(filters["models.cnn.filters"], list)  # choices of lists come back


TUNE = {
    **TINY,
    "tune.epochs": 3,
    "tune.pruner": "median",
    "tune.seed": 0,
}


@pytest.fixture(scope="module")
def tune_repo(tmp_path_factory):
    repo = copy_repo(tmp_path_factory.mktemp("tune"))
    set_params(repo, TUNE)
    run(["git", "commit", "-qam", "tiny"], repo, env=GIT_IDENTITY)
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{repo / 'mlflow.db'}"}
    run(["dvc", "repro", "-q", "prepare"], repo, env=env)
    return repo, env


def _study(repo):
    import optuna
    from optuna.storages.journal import JournalFileBackend

    journal = repo / "tuning" / "cnn.journal"
    storage = optuna.storages.JournalStorage(JournalFileBackend(str(journal)))
    (summary,) = optuna.get_all_study_summaries(storage)
    return optuna.load_study(study_name=summary.study_name, storage=storage)


def _tune(repo, env, *args, check=True):
    return run([str(BIN / "cxr"), "tune", "cnn", *args], repo, env=env, check=check)


@e2e
def test_a_study_shared_killed_resumed_pruned_tracked_and_applied(tune_repo):
    import mlflow
    from optuna.trial import TrialState

    repo, env = tune_repo
    finished = (TrialState.COMPLETE, TrialState.PRUNED)
    # Two workers share the journal file.
    out = _tune(repo, env, "--trials", "3", "--workers", "2").stdout
    study = _study(repo)
    workers = {t.user_attrs["worker"] for t in study.trials}
    assert len(workers) == 2, workers
    assert len(study.get_trials(states=finished)) >= 3
    assert "tune@cnn trial 0:" in out and "best: trial" in out

    # A worker killed mid-trial: the rerun fails its trial and finishes the rest.
    before = len(study.get_trials(states=finished))
    proc = subprocess.Popen(
        [str(BIN / "cxr"), "tune", "cnn", "--trials", "8"],
        cwd=repo,
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    deadline = time.time() + 300
    while len(_study(repo).get_trials(states=finished)) == before:
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
        time.sleep(0.5)
    while not _study(repo).get_trials(states=(TrialState.RUNNING,)):
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed = _study(repo).get_trials(states=(TrialState.RUNNING,))
    out = _tune(repo, env, "--trials", "8").stdout
    assert "marked failed" in out
    study = _study(repo)
    assert [t.state for t in study.trials if t.number == killed[0].number] == [TrialState.FAIL]
    assert len(study.get_trials(states=finished)) >= 8
    assert study.get_trials(states=(TrialState.PRUNED,)), "the median pruner stopped none"
    numbers = [t.number for t in study.trials]
    assert len(numbers) == len(set(numbers))

    # MLflow: one parent run for the study, one child per trial, each with its state.
    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs(
        [client.get_experiment_by_name("cxr-classification").experiment_id],
        filter_string=f"tags.`cxr.tune.study` = '{study.study_name}'",
    )
    (parent,) = [r for r in runs if r.data.tags.get("cxr.tune.parent") == "true"]
    children = [r for r in runs if r is not parent]
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent.info.run_id}
    trial_tags = [r.data.tags["cxr.tune.trial"] for r in children]
    assert len(trial_tags) == len(set(trial_tags))  # no duplicate runs
    assert {str(t.number) for t in study.get_trials(states=finished)} <= set(trial_tags)
    states = {r.data.tags["cxr.tune.trial"]: r.data.tags.get("cxr.tune.state") for r in children}
    assert {states[str(t.number)] for t in study.get_trials(states=(TrialState.PRUNED,))} == {
        "pruned"
    }
    assert parent.data.metrics["best_val_loss"] == pytest.approx(study.best_value)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "figures")}
    assert "figures/optimization_history.png" in artifacts
    best_child = next(
        r for r in children if r.data.tags["cxr.tune.trial"] == str(study.best_trial.number)
    )
    assert "val_loss" in best_child.data.metrics  # per-epoch validation figures

    # The best configuration: tuned/cnn.yaml, trained through the pipeline by `dvc exp run`.
    tuned = yaml.safe_load((repo / "tuned" / "cnn.yaml").read_text())
    assert tuned["best_trial"] == study.best_trial.number
    assert set(tuned["params"]) == {f"models.cnn.{k}" for k in study.best_trial.params}
    _tune(repo, env, "--apply", "--", "train@cnn")
    diff = json.loads(run(["dvc", "exp", "diff", "HEAD", "tuned-cnn", "--json"], repo).stdout)
    changed = {k: v["new"] for k, v in diff["params"]["params.yaml"].items()}
    assert changed == {k: v for k, v in tuned["params"].items() if _committed(repo, k) != v}
    params_diff = run(["dvc", "params", "diff", "HEAD", "tuned-cnn"], repo).stdout
    assert "models.cnn.learning_rate" in params_diff
    # the train stage with the tuned values reproduces the best trial (same seed, epochs)
    trained = diff["metrics"]["reports/cnn/train.json"]["val_loss"]["new"]
    assert trained == pytest.approx(tuned["val_loss"], rel=1e-5)


def _committed(repo, key):
    node = yaml.safe_load(run(["git", "show", "HEAD:params.yaml"], repo).stdout)
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


@e2e
@pytest.mark.skipif(
    not os.environ.get("CXR_TEST_TUNE_STORAGE"),
    reason="needs a database URL in CXR_TEST_TUNE_STORAGE (.ci/with-postgres sets one)",
)
def test_workers_fill_one_study_in_a_database(tune_repo):
    """The team's database as Optuna's storage ($CXR_TUNE_STORAGE): two workers, one study."""
    import optuna

    repo, env = tune_repo
    url = os.environ["CXR_TEST_TUNE_STORAGE"]
    journal = repo / "tuning" / "cnn.journal"  # the local study (the test above may have run)
    before = journal.read_bytes() if journal.exists() else None
    _tune(repo, {**env, "CXR_TUNE_STORAGE": url}, "--trials", "3", "--workers", "2")
    (summary,) = optuna.get_all_study_summaries(url)
    study = optuna.load_study(study_name=summary.study_name, storage=url)
    finished = [t for t in study.trials if t.state.is_finished()]
    assert len(finished) >= 3 and len({t.user_attrs["worker"] for t in study.trials}) == 2
    # Nothing went to the local journal.
    assert (journal.read_bytes() if journal.exists() else None) == before
