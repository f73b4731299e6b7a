"""evaluate, compare, register and serving: on the shared tiny `dvc repro` run against the
test `mlflow server`, as a user would see them."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import urllib.error
import urllib.request
from types import SimpleNamespace

import pytest

from tests.conftest import (
    BIN,
    GIT_IDENTITY,
    REAL_SAMPLE,
    TINY,
    _free_port,
    run,
    set_params,
    wait_until_up,
)

MODEL = "cxr-classifier"
e2e = pytest.mark.e2e


def test_gate_decisions():
    from cxr.register import gate

    classes = ["a", "b"]
    champion = SimpleNamespace(version="3", tags={"cxr.classes": "a,b"})
    assert gate(0.5, classes, None, None, False)[0]
    assert gate(0.8, classes, champion, 0.8, False)[0]  # as good is enough
    moved, why = gate(0.7, classes, champion, 0.8, False)
    assert not moved and "kept version 3" in why
    assert gate(0.7, classes, champion, 0.8, True)[0]
    other = SimpleNamespace(version="3", tags={"cxr.classes": "a,b,c"})
    moved, why = gate(0.99, classes, other, None, False)
    assert not moved and "register.force" in why
    assert gate(0.99, classes, other, None, True)[0]


def _json(path):
    return json.loads(path.read_text())


@e2e
def test_evaluation_is_in_dvc_and_in_the_training_run(repro):
    import mlflow

    repo = repro["repo"]
    test = _json(repo / "evaluation" / "cnn" / "test.json")
    assert test["n_test"] == sum(
        _json(repo / "prepared" / "dataset.json")["counts"]["test"].values()
    )
    assert test["accuracy_ci_low"] <= test["accuracy"] <= test["accuracy_ci_high"]
    assert set(test["per_class"]) == {"covid", "lung_opacity", "normal", "pneumonia"}
    for name in ("confusion.png", "reliability.png", "gradcam.png"):
        assert (repo / "evaluation" / "cnn" / "figures" / name).stat().st_size > 1000

    shown = json.loads(run(["dvc", "metrics", "show", "--json"], repo).stdout)
    assert "evaluation/cnn/test.json" in json.dumps(shown)
    plots = run(["dvc", "plots", "show", "--json"], repo).stdout
    assert "evaluation/cnn/predictions.csv" in plots and '"predicted"' in plots

    record = _json(repo / "reports" / "cnn" / "mlflow_run.json")
    client = mlflow.MlflowClient(repro["uri"])
    r = client.get_run(record["run_id"])
    assert r.data.metrics["test_accuracy"] == pytest.approx(test["accuracy"])
    assert "test_recall_covid" in r.data.metrics
    files = {f.path for f in client.list_artifacts(record["run_id"], "evaluation/figures")}
    assert "evaluation/figures/gradcam.png" in files
    assert {i.dataset.name for i in r.inputs.dataset_inputs} >= {"prepared-test"}
    logged = client.get_logged_model(record["model_id"])
    assert "test_macro_f1" in {m.key for m in logged.metrics}


@e2e
def test_compare_picks_the_champion_and_logs_the_table(repro):
    import mlflow

    repo = repro["repo"]
    summary = _json(repo / "reports" / "compare" / "summary.json")
    scores = {
        m: _json(repo / "evaluation" / m / "test.json")["macro_f1"] for m in TINY["train.models"]
    }
    assert summary["metric"] == "macro_f1" and summary["value"] == max(scores.values())
    assert scores[summary["champion"]] == summary["value"]
    table = (repo / "reports" / "compare" / "table.md").read_text()
    assert all(f"| {m} |" in table for m in scores) and "McNemar" in table
    runs = mlflow.MlflowClient(repro["uri"]).search_runs(
        [summary_experiment(repro)], "tags.`cxr.stage` = 'compare'"
    )
    assert len(runs) == 1 and runs[0].data.tags["cxr.champion"] == summary["champion"]


def summary_experiment(repro) -> str:
    return _json(repro["repo"] / "reports" / "cnn" / "mlflow_run.json")["experiment_id"]


def _register(repro):
    return run(["python", "stages/register.py"], repro["repo"], env=repro["env"]).stdout


@e2e
def test_champion_alias_gate_and_no_duplicate_versions(repro):
    import mlflow

    repo = repro["repo"]
    client = mlflow.MlflowClient(repro["uri"])
    summary_path = repo / "reports" / "compare" / "summary.json"
    summary = _json(summary_path)
    champion = client.get_model_version_by_alias(MODEL, "champion")
    assert champion.tags["cxr.run_id"] == summary["run_id"]
    assert _json(repo / "reports" / "champion" / "champion.json")["version"] == champion.version
    card = (repo / "reports" / "champion" / "model_card.md").read_text()
    assert "Not for clinical use" in card and "bootstrap" in card
    assert client.get_model_version(MODEL, champion.version).description == card

    run(["dvc", "repro", "-f", "-s", "register"], repo, env=repro["env"])  # no new version
    assert len(client.search_model_versions(f"name='{MODEL}'")) == 1

    original = summary_path.read_text()
    try:
        # A worse newcomer (the runner-up, claiming a score below the champion's) is
        # registered but does not take the alias.
        runner = summary["runner_up"]
        worse_run = _json(repo / "evaluation" / runner / "run.json")["run_id"]
        worse = {**summary, "champion": runner, "run_id": worse_run, "value": -1.0}
        summary_path.write_text(json.dumps(worse))
        _register(repro)
        result = _json(repo / "reports" / "champion" / "champion.json")
        assert result["decision"].startswith("kept version") and not result["alias_moved"]
        assert client.get_model_version_by_alias(MODEL, "champion").version == champion.version
        # Other classes: refused, whatever the score.
        summary_path.write_text(json.dumps({**worse, "value": 1.0, "classes": ["covid", "normal"]}))
        _register(repro)
        result = _json(repo / "reports" / "champion" / "champion.json")
        assert result["decision"].startswith("refused") and not result["alias_moved"]
        # force overrides the gate; still no duplicate versions.
        set_params(repo, {"register.force": True})
        _register(repro)
        assert client.get_model_version_by_alias(MODEL, "champion").tags["cxr.run_id"] == worse_run
        assert len(client.search_model_versions(f"name='{MODEL}'")) == 2
    finally:  # back to the pipeline's own state, recorded in dvc.lock for the other tests
        summary_path.write_text(original)
        set_params(repo, {"register.force": False})
        run(["dvc", "repro", "-f", "-s", "register"], repo, env=repro["env"])
    assert client.get_model_version_by_alias(MODEL, "champion").version == champion.version
    assert json.loads(run(["dvc", "status", "--json"], repo).stdout) == {}


def _real_images():
    if not REAL_SAMPLE.is_dir():
        pytest.skip(f"the real radiograph sample is absent ({REAL_SAMPLE})")
    return sorted(REAL_SAMPLE.rglob("*.png"))[:2]


def _post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@e2e
def test_served_champion_answers_real_radiographs_and_refuses_bad_requests(repro, tmp_path):
    images = _real_images()
    port = _free_port()
    env = {
        **os.environ,
        **GIT_IDENTITY,
        **repro["env"],
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
    }
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        server = subprocess.Popen(
            [str(BIN / "mlflow"), "models", "serve", "-m", f"models:/{MODEL}@champion"]
            + ["--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
            cwd=repro["repo"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(f"{url}/ping", server, log, timeout=180)
        encoded = [base64.b64encode(p.read_bytes()).decode() for p in images]
        status, body = _post(
            f"{url}/invocations", {"dataframe_records": [{"image": e} for e in encoded]}
        )
        assert status == 200, body
        assert len(body["predictions"]) == 2
        for answer in body["predictions"]:
            assert sum(answer["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
            assert answer["label"] == max(answer["probabilities"], key=answer["probabilities"].get)
        status, body = _post(f"{url}/invocations", {"inputs": [[[0, 128], [255, 64]]]})
        assert status == 200 and len(body["predictions"]) == 1
        for bad, reason in (
            (
                {"dataframe_records": [{"image": base64.b64encode(b"GIF? no").decode()}]},
                "not an image",
            ),
            ({"inputs": [[1, 2, 3]]}, "2-D grey image"),
            ({"inputs": []}, "no images"),
        ):
            status, body = _post(f"{url}/invocations", bad)
            assert 400 <= status < 500 and reason in body["message"], (status, body)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


@e2e
def test_cxr_predict_classifies_files_and_names_a_bad_one(repro, tmp_path):
    images = _real_images()
    bad = tmp_path / "notes.png"
    bad.write_text("not a radiograph")
    proc = run(
        ["cxr", "predict", *map(str, images), str(bad)],
        repro["repo"],
        env=repro["env"],
        check=False,
    )
    assert proc.returncode == 1, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [line["file"] for line in lines] == [*map(str, images), str(bad)]
    for line in lines[:2]:
        assert sum(line["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
    assert "not an image" in lines[2]["error"]
    local = run(
        ["cxr", "predict", "--model", "models/cnn/model.keras", str(images[0])], repro["repo"]
    )
    assert json.loads(local.stdout)["label"] in ("covid", "lung_opacity", "normal", "pneumonia")
