"""End-to-end: the real pipeline through DVC, tracked in MLflow, as a user runs it.

Two tiny pipeline executions are shared by the tests here (test_experiments.py has the ones
that need a repository of their own):
- `demo`: `cxr demo` (dvc exp run --temp) with the default store (sqlite at the repo root);
- `repro`: `dvc repro` in the workspace against a real `mlflow server`.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections import defaultdict

import pytest
import yaml

from tests.conftest import ROOT, TINY, copy_repo, run, set_params

pytestmark = pytest.mark.e2e


def _runs(uri: str, experiment: str = "cxr-classification"):
    import mlflow

    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"experiment {experiment} not in {uri}"
    return exp, client.search_runs([exp.experiment_id])


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    repo = copy_repo(tmp_path_factory.mktemp("demo"))
    # The demo's overrides, made tiny (in params.yaml's demo section, as a user could).
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["demo"].update({**TINY, "train.models": ["cnn"]})  # these tests read cnn's runs
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "commit", "-qam", "tiny demo"], repo)
    before = (repo / "params.yaml").read_text()
    env = {"MLFLOW_TRACKING_URI": ""}
    first = run(["cxr", "demo"], repo, env=env)
    second = run(["cxr", "demo"], repo, env=env)
    return {"repo": repo, "params_before": before, "first": first, "second": second}


def test_demo_leaves_params_and_git_unchanged(demo):
    repo = demo["repo"]
    assert (repo / "params.yaml").read_text() == demo["params_before"]
    status = run(["git", "status", "--porcelain"], repo).stdout
    assert status.strip() == "", status


def test_demo_drops_dvcs_warnings_about_its_temporary_copy(demo):
    """DVC warns once per output that the fresh copy of `--temp` has none yet: cxr's filter
    (cxr.console) drops exactly those; DVC's other warnings stay."""
    out = demo["first"].stdout + demo["first"].stderr
    assert "Running stage 'train@cnn'" in out
    assert "No file hash info found" not in out
    assert "WARNING: 'data' is empty." in out


def test_demo_writes_runs_to_the_store_at_the_repo_root(demo):
    import mlflow

    repo = demo["repo"]
    assert (repo / "mlflow.db").is_file()
    exp, runs = _runs(f"sqlite:///{repo / 'mlflow.db'}")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    assert exp.artifact_location == (repo / "mlartifacts" / "cxr-classification").as_uri()
    # MLflow's Default experiment too keeps its artefacts under the repository, not in the
    # DVC temp copy the first stage ran in (deleted after `dvc exp run --temp`).
    default = mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}").get_experiment("0")
    assert default.artifact_location == str(repo / "mlruns" / "0"), default.artifact_location
    # Nothing leaked into DVC's temporary copy.
    assert not list((repo / ".dvc" / "tmp").rglob("mlflow.db"))
    # Two demos = two DVC experiments, each with its own training run grouped under its name;
    # prepare ran (and logged its data report) only in the first: the second restored it.
    train = [r for r in runs if r.data.tags["cxr.stage"] == "train@cnn"]
    groups = sorted(r.data.tags["cxr.group"] for r in train)
    names = sorted(r.data.tags["cxr.dvc_experiment"] for r in train)
    assert len(train) == 2 and groups == names and groups[0] != groups[1]
    assert all(n.startswith("demo-20") for n in names), names  # dated, not DVC's random name
    prepare = [r for r in runs if r.data.tags["cxr.stage"] == "prepare"]
    assert len(prepare) == 1 and prepare[0].data.tags["cxr.group"] in names
    shown = run(["dvc", "exp", "show", "--json"], repo).stdout
    for name in names:
        assert name in shown


def _changed(params: dict) -> list[str]:
    """The demo's overrides that differ from params.yaml's values."""
    from cxr.params import flatten

    defaults = flatten({k: v for k, v in params.items() if k != "demo"})
    return [k for k, v in params["demo"].items() if defaults.get(k) != v]


def test_exps_shows_params_and_metrics_without_hash_columns_under_80(demo):
    """`cxr exps` (the demo's "Done" names it): the demo's params, each model's few metrics
    and nothing else; the same count for the real demo's six models stays under 80."""
    from cxr.cli import dependency_columns
    from cxr.evaluate import dvc_metrics
    from cxr.train import DVC_METRICS

    repo = demo["repo"]
    assert "cxr exps" in demo["first"].stdout
    table = run(["cxr", "exps", "--", "--csv"], repo).stdout
    header = next(csv.reader(io.StringIO(table)))
    fixed = ["Experiment", "rev", "typ", "Created"]  # the table merges the first three
    assert header[:4] == fixed, header
    params = yaml.safe_load((repo / "params.yaml").read_text())
    changed = _changed(params)
    metrics = [h for h in header[4:] if h not in changed]
    assert set(header[4:]) - set(metrics) == set(changed)
    deps = re.compile(dependency_columns(repo / "dvc.yaml"))
    assert not [m for m in metrics if deps.match(m)], metrics  # no file hashes
    per_model = len(DVC_METRICS) + len(dvc_metrics(defaultdict(float), defaultdict(float)))
    models = params["demo"]["train.models"]
    shared = len(metrics) - per_model * len(models)  # prepare's
    assert shared >= 0 and all(m.isidentifier() for m in metrics), metrics
    real = yaml.safe_load((ROOT / "params.yaml").read_text())
    count = 2 + len(_changed(real)) + shared + per_model * len(real["train"]["models"])
    assert count < 80, count


def test_second_demo_restores_data_stages_from_run_cache(demo):
    out = demo["second"].stdout + demo["second"].stderr
    assert "Stage 'download' is cached" in out
    assert "Stage 'prepare' is cached" in out
    # Training is never restored from the run-cache: its run record is an uncached output.
    assert "Running stage 'train@cnn'" in out


def test_repro_twice_second_does_nothing(repro):
    assert "Running stage 'train@cnn'" in repro["first"].stdout
    second = repro["second"].stdout
    assert "Running stage" not in second
    assert "Data and pipelines are up to date" in second


def test_run_on_the_server_has_params_curves_and_model(repro):
    import mlflow
    import numpy as np

    repo = repro["repo"]
    record = json.loads((repo / "reports" / "cnn" / "mlflow_run.json").read_text())
    exp, runs = _runs(repro["uri"])
    by_stage = {r.data.tags["cxr.stage"]: r for r in runs}
    # evaluate adds to the training runs; compare has its own run (register: the registry)
    assert sorted(by_stage) == ["compare", "prepare", "train@cnn", "train@cnn4_bn"]
    assert len(runs) == 4
    r = by_stage["train@cnn"]
    assert r.info.run_id == record["run_id"]
    assert by_stage["prepare"].data.tags["cxr.group"] == r.data.tags["cxr.group"]
    assert record["tracking_uri"] == repro["uri"]
    assert r.data.params["train.epochs"] == str(TINY["train.epochs"])
    assert r.data.params["model.pooling"] == "max"
    assert r.data.tags["cxr.group"].startswith("repro-")
    assert r.data.tags["cxr.stage"] == "train@cnn"
    dataset = json.loads((repo / "prepared" / "dataset.json").read_text())
    assert r.data.tags["cxr.data_fingerprint"] == dataset["fingerprint"]

    client = mlflow.MlflowClient(repro["uri"])
    history = client.get_metric_history(r.info.run_id, "val_accuracy")
    assert [m.step for m in history] == list(range(TINY["train.epochs"]))
    files = {f.path for f in client.list_artifacts(r.info.run_id)}
    assert {"curves.png", "history.csv"} <= files
    report = {f.path for f in client.list_artifacts(by_stage["prepare"].info.run_id, "data_report")}
    assert {"data_report/report.md", "data_report/sample_grid.png"} <= report

    mlflow.set_tracking_uri(repro["uri"])
    model = mlflow.keras.load_model(f"runs:/{r.info.run_id}/cnn")  # named by architecture
    x = np.load(repo / "prepared" / "images.npy")[:3][..., None]
    probs = np.asarray(model.predict(x, verbose=0))
    assert probs.shape == (3, 4) and np.allclose(probs.sum(axis=1), 1, atol=1e-4)


def test_run_record_is_checked_against_the_current_store(repro, monkeypatch, tmp_path):
    from cxr.tracking import find_recorded_run

    record = repro["repo"] / "reports" / "cnn" / "mlflow_run.json"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", repro["uri"])
    assert find_recorded_run(record) is not None
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'other.db'}")
    assert find_recorded_run(record) is None


def test_editing_a_settings_help_or_range_reruns_no_stage(repro):
    """The settings table only says what is accepted: a new help line (or a wider range)
    leaves every stage up to date (`dvc status`), while params.py, read by every stage, would
    not."""
    table = repro["repo"] / "src" / "cxr" / "settings.py"
    before = table.read_text()
    edited = before.replace('"images per batch"', '"images in each batch"', 1)
    wider = 'number(0, 2, open_low=True), "Adam'  # train.learning_rate's range
    edited = edited.replace('number(0, 1, open_low=True), "Adam', wider)
    assert edited.count("images in each batch") == 1 and "number(0, 2, open_low" in edited
    table.write_text(edited)
    try:
        assert json.loads(run(["dvc", "status", "--json"], repro["repo"]).stdout) == {}
    finally:
        table.write_text(before)


def test_train_param_change_reruns_only_training(repro):
    repo = repro["repo"]
    set_params(repo, {"train.epochs": TINY["train.epochs"] + 1})
    try:
        status = json.loads(run(["dvc", "status", "--json"], repo).stdout)
        assert set(status) == {"train@cnn", "train@cnn4_bn"}, status
    finally:
        set_params(repo, {"train.epochs": TINY["train.epochs"]})


def test_one_models_param_reruns_only_its_stage(repro):
    repo = repro["repo"]
    set_params(repo, {"models.cnn4_bn.dropout": 0.5})
    try:
        status = json.loads(run(["dvc", "status", "--json"], repo).stdout)
        assert set(status) == {"train@cnn4_bn"}, status
    finally:
        set_params(repo, {"models.cnn4_bn.dropout": 0.3})


def test_training_logs_its_dataset_speed_and_tensorboard(repro):
    import mlflow

    repo = repro["repo"]
    record = json.loads((repo / "reports" / "cnn4_bn" / "mlflow_run.json").read_text())
    client = mlflow.MlflowClient(repro["uri"])
    r = client.get_run(record["run_id"])
    assert r.data.metrics["param_count"] > 0 and r.data.metrics["train_images_per_second"] > 0
    dataset = json.loads((repo / "prepared" / "dataset.json").read_text())
    inputs = r.inputs.dataset_inputs
    assert inputs and inputs[0].dataset.digest == dataset["fingerprint"][:16]
    assert list((repo / "models" / "cnn4_bn" / "tensorboard").rglob("events.out.tfevents.*"))
    assert r.data.params["runtime.dtype_policy"] == "float32"
    assert r.data.metrics["epochs_run"] == TINY["train.epochs"]


def test_a_training_runs_duration_is_its_stages(repro):
    """A training run starts when its stage's process starts and ends when the training is
    logged: its MLflow duration is within 10 % of the stage's own wall time (the total of
    the stage's timing line, start-up included), for every model, not stretched by evaluate
    and register adding to it afterwards."""
    import mlflow

    from cxr.timing import parse

    repo, client = repro["repo"], mlflow.MlflowClient(repro["uri"])
    totals = {}
    for line in repro["first"].stdout.splitlines():
        parsed = parse(line)
        if parsed and parsed[0].startswith("train@"):
            totals[parsed[0].removeprefix("train@")] = parsed[1]
    assert set(totals) == set(TINY["train.models"]), repro["first"].stdout
    for model, total in totals.items():
        record = json.loads((repo / "reports" / model / "mlflow_run.json").read_text())
        info = client.get_run(record["run_id"]).info
        duration = (info.end_time - info.start_time) / 1000
        assert abs(duration - total) <= 0.1 * total, (model, duration, total)


def test_kaggle_without_credentials_fails_with_a_clear_message(tmp_path):
    repo = copy_repo(tmp_path / "repo")
    env = {  # no credentials anywhere the client looks, the home folder included
        "HOME": str(tmp_path / "home"),
        "XDG_CONFIG_HOME": str(tmp_path / "home" / ".config"),
        "KAGGLE_CONFIG_DIR": str(tmp_path / "no-kaggle"),
        "KAGGLE_API_TOKEN": "",
        "KAGGLE_USERNAME": "",
        "KAGGLE_KEY": "",
    }
    proc = run(["dvc", "repro", "download"], repo, env=env, check=False)
    assert proc.returncode != 0
    assert "error: No Kaggle credentials found" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (repo / "raw").exists()
