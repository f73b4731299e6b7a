"""End-to-end: a user's own experiments, each in a fresh tiny copy of the repository against
the test `mlflow server`: a killed run resumed, `mlflow run`, queued DVC experiments, and
`dvc params diff` / `dvc metrics diff` after a rerun."""

from __future__ import annotations

import json

import pytest

from tests.conftest import TINY, copy_repo, run, set_params

pytestmark = pytest.mark.e2e


def test_killed_training_resumes_into_the_same_run(tmp_path, mlflow_server):
    import os
    import signal
    import subprocess
    import time

    import mlflow

    repo = copy_repo(tmp_path / "repo")
    epochs = 40
    set_params(
        repo,
        {
            **TINY,
            "train.models": ["cnn"],
            "train.epochs": epochs,
            "train.early_stopping_patience": 100,
            "train.checkpoint_seconds": 0,
        },
    )
    env = {"MLFLOW_TRACKING_URI": mlflow_server}
    run(["dvc", "repro", "prepare"], repo, env=env)

    from tests.conftest import BIN, GIT_IDENTITY

    proc = subprocess.Popen(
        [str(BIN / "python"), "stages/train.py", "cnn"],
        cwd=repo,
        start_new_session=True,
        env={**os.environ, **GIT_IDENTITY, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    backups = repo / ".cache" / "checkpoints"
    while not list(backups.glob("cnn-*/state.json")):
        assert proc.poll() is None and time.time() < deadline, "no checkpoint was written"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # as a crash or a pre-empted machine would
    proc.wait()
    killed_run = next(backups.glob("cnn-*/run_id")).read_text()
    assert not (repo / "models" / "cnn" / "model.keras").exists()

    out = run(["dvc", "repro", "train@cnn"], repo, env=env).stdout
    assert f"resuming MLflow run {killed_run}" in out, out
    assert f"Epoch 1/{epochs}\n" not in out  # it did not start over
    record = json.loads((repo / "reports" / "cnn" / "mlflow_run.json").read_text())
    assert record["run_id"] == killed_run
    history = mlflow.MlflowClient(mlflow_server).get_metric_history(killed_run, "val_loss")
    assert sorted({m.step for m in history}) == list(range(epochs))
    lines = (repo / "reports" / "cnn" / "history.csv").read_text().splitlines()
    assert len(lines) == epochs + 1
    assert not list(backups.iterdir())  # the checkpoint is removed after success


def test_mlflow_run_entry_point_makes_the_parent_of_the_stage_runs(tmp_path, mlflow_server):
    import mlflow

    repo = copy_repo(tmp_path / "repo")
    set_params(repo, {**TINY, "train.models": ["cnn"]})
    run(["git", "commit", "-qam", "tiny"], repo)
    env = {"MLFLOW_TRACKING_URI": mlflow_server}
    cmd = ["mlflow", "run", ".", "-e", "train", "-P", "model=cnn", "--env-manager", "local"]
    out = run([*cmd, "--experiment-name", "cxr-project-runs"], repo, env=env)
    client = mlflow.MlflowClient(mlflow_server)
    project = client.get_experiment_by_name("cxr-project-runs")
    (parent,) = client.search_runs([project.experiment_id])
    assert parent.info.status == "FINISHED", out.stdout[-2000:]
    exp = client.get_experiment_by_name("cxr-classification")
    children = client.search_runs(
        [exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    assert {r.data.tags["cxr.stage"] for r in children} == {"prepare", "train@cnn"}
    # Each stage wrote into its own run, not into the parent.
    assert "val_accuracy" not in parent.data.metrics


def test_queued_experiments_run_in_parallel_and_both_reach_the_server(tmp_path, mlflow_server):
    import time

    import mlflow

    repo = copy_repo(tmp_path / "repo")
    set_params(repo, {**TINY, "train.models": ["cnn"]})
    run(["git", "commit", "-qam", "tiny"], repo)
    env = {"MLFLOW_TRACKING_URI": mlflow_server}
    names = {"lr1": 0.001, "lr3": 0.003}
    for name, lr in names.items():
        run(["dvc", "exp", "run", "--queue", "-n", name, "-S", f"train.learning_rate={lr}"], repo)
    run(["dvc", "queue", "start", "-j", "2"], repo, env=env)
    deadline = time.time() + 900
    while True:
        status = run(["dvc", "queue", "status"], repo).stdout
        if "Queued" not in status and "Running" not in status:
            break
        assert time.time() < deadline, status
        time.sleep(5)
    assert status.count("Success") == 2, status + run(["dvc", "queue", "logs", "lr1"], repo).stdout

    shown = json.loads(run(["dvc", "exp", "show", "--json"], repo).stdout)
    assert set(names) <= set(json.dumps(shown).replace('"', " ").split())
    client = mlflow.MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("cxr-classification")
    for name, lr in names.items():
        runs = client.search_runs([exp.experiment_id], f"tags.`cxr.dvc_experiment` = '{name}'")
        by_stage = {r.data.tags["cxr.stage"]: r for r in runs}
        assert {"train@cnn", "compare"} <= set(by_stage), (name, sorted(by_stage))
        train = by_stage["train@cnn"]
        assert train.info.status == "FINISHED"
        assert float(train.data.params["train.learning_rate"]) == lr
        assert "test_macro_f1" in train.data.metrics  # its evaluation arrived too
        history = client.get_metric_history(train.info.run_id, "val_loss")
        assert [m.step for m in history] == list(range(TINY["train.epochs"]))


def test_params_and_metrics_diff_after_a_one_param_rerun(tmp_path, mlflow_server):
    repo = copy_repo(tmp_path / "repo")
    set_params(repo, {**TINY, "train.models": ["cnn"]})
    env = {"MLFLOW_TRACKING_URI": mlflow_server}
    run(["dvc", "repro"], repo, env=env)
    run(["git", "add", "-A", "params.yaml", "dvc.lock", "reports", "evaluation"], repo)
    run(["git", "commit", "-qm", "baseline"], repo)
    set_params(repo, {"models.cnn.dropout": 0.6, "models.cnn.dense_units": 32})
    rerun = run(["dvc", "repro"], repo, env=env).stdout
    assert "Stage 'prepare' didn't change" in rerun and "Running stage 'train@cnn'" in rerun

    params = json.loads(run(["dvc", "params", "diff", "--json"], repo).stdout)["params.yaml"]
    assert params["models.cnn.dropout"]["old"] == 0.3 and params["models.cnn.dropout"]["new"] == 0.6
    metrics = json.loads(run(["dvc", "metrics", "diff", "--json"], repo).stdout)
    changed = {path for path, values in metrics.items() if values}
    assert {"reports/cnn/train.json"} <= changed, metrics
    assert metrics["reports/cnn/train.json"]["val_loss"]["diff"] != 0
