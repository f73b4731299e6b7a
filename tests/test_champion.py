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
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from cxr import machine
from cxr.evaluate import dvc_metrics
from cxr.images import resize
from cxr.lungs import audit_inputs
from cxr.metrics import scores
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
    # Chosen on other data: re-scored all the same (a bias in its favour only); a newcomer
    # that still wins moves in, one that loses is kept out with the caveat.
    moved, why = gate(0.9, classes, champion, 0.8, False, other_data="ab" * 32)
    assert moved and "chosen on other data (fingerprint abababababab)" in why
    moved, why = gate(0.7, classes, champion, 0.8, False, other_data="ab" * 32)
    assert not moved and "may have trained on some of these images" in why
    assert "register.force" in why


def test_a_champion_that_cannot_be_scored_is_replaced_and_says_why():
    from cxr.register import gate

    champion = SimpleNamespace(version="3", tags={"cxr.classes": "a,b"})
    moved, why = gate(0.1, ["a", "b"], champion, None, False, broken="no MLmodel")
    assert moved and why.startswith("replaced the current champion (version 3)")
    assert why.endswith("cannot be loaded or scored: no MLmodel")
    other = SimpleNamespace(version="3", tags={"cxr.classes": "a,b,c"})  # classes first
    assert not gate(0.1, ["a", "b"], other, None, False, broken="no MLmodel")[0]


def _register_inputs(root: Path, run_id: str, value: float, fingerprint: str = "f" * 64) -> Path:
    """What prepare, train, evaluate and compare leave for register (a tiny model of run
    `run_id` claiming `value`); returns the summary's path."""
    import keras
    import numpy as np

    from cxr.files import write_json
    from tests.test_reports import CLASSES, evaluation_json, predictions

    (root / "models" / "cnn").mkdir(parents=True, exist_ok=True)
    keras.Sequential(
        [keras.Input((8, 8, 1)), keras.layers.Flatten(), keras.layers.Dense(3, "softmax")]
    ).save(root / "models" / "cnn" / "model.keras")
    y, probs = predictions(0.8)
    write_json(root / "evaluation" / "cnn" / "test.json", evaluation_json(y, probs, 0.8))
    write_json(root / "evaluation" / "cnn" / "per_source.json", {})
    prepared = root / "prepared"
    prepared.mkdir(exist_ok=True)
    np.save(prepared / "images.npy", np.zeros((12, 8, 8), np.uint8))
    rows = [f"{i},{'val' if i < 6 else 'test'},{CLASSES[i % 3]}" for i in range(12)]
    (prepared / "manifest.csv").write_text("index,split,label\n" + "\n".join(rows) + "\n")
    counts = {split: dict.fromkeys(CLASSES, 2) for split in ("val", "test")}
    dataset = {"classes": CLASSES, "n_images": 12, "image_size": 8, "counts": counts}
    write_json(prepared / "dataset.json", {**dataset, "fingerprint": fingerprint})
    summary = {"champion": "cnn", "run_id": run_id, "metric": "macro_f1", "value": value}
    summary |= {"split": "val", "test_value": 0.5}
    summary |= {"classes": CLASSES, "data_fingerprint": fingerprint, "ranking": [{}]}
    write_json(root / "summary.json", summary)
    return root / "summary.json"


def test_a_champion_whose_files_are_gone_is_replaced_not_failed_on(tmp_path, monkeypatch):
    """The champion's artefacts deleted from the store: the next register replaces it, in a
    one-line decision naming the version and why, instead of failing on every run; and a
    failure before the gate decides registers no version."""
    import shutil

    import mlflow
    from mlflow.exceptions import MlflowException

    from cxr import register as register_module
    from cxr import tracking

    monkeypatch.setenv("DVC_ROOT", str(tmp_path))  # a throw-away MLflow store
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    params = {
        "register": {"model_name": "m", "force": False},
        "mlflow": {"experiment": "t"},
        "prepare": {"min_size": 1},
    }
    runs = []
    for _ in range(3):
        with tracking.start_run("t", "cnn", {}) as training:
            runs.append(training.info.run_id)

    def register(run_id: str, value: float, fingerprint: str = "f" * 64) -> dict:
        summary = _register_inputs(tmp_path, run_id, value, fingerprint)
        return register_module.register(
            params,
            summary,
            tmp_path / "evaluation",
            tmp_path / "models",
            tmp_path / "prepared",
            tmp_path / "reports",
        )

    try:
        assert register(runs[0], 0.9)["decision"] == "no champion yet"
        for model_file in list((tmp_path / "mlartifacts").rglob("MLmodel")):
            shutil.rmtree(model_file.parent)  # version 1's files, gone from the store
        # A worse newcomer, which a champion that could be scored would keep out.
        result = register(runs[1], 0.0)
        decision = result["decision"]
        assert decision.startswith("replaced the current champion (version 1), which cannot")
        assert "models:/m/1 has no files in the artifact store" in decision
        assert "\n" not in decision
        assert result["alias_moved"]
        assert str(result["champion_version"]) == str(result["version"]) == "2"
        client = mlflow.MlflowClient()
        assert client.get_model_version("m", "2").tags["cxr.gate"] == decision
        assert decision in (tmp_path / "reports" / "model_card.md").read_text()

        # A store that fails while the champion is loaded, or a scoring that fails after it
        # loaded: raised (not taken for a broken champion, which a worse model would then
        # replace), and no version is left registered without a gate decision.
        def store_down(*args):
            raise MlflowException("API request to the store failed")

        def out_of_memory(*args):
            raise MemoryError("scoring ran out of memory")

        for where, failure, error in (
            ("load_registered", store_down, MlflowException),
            ("scores", out_of_memory, MemoryError),
        ):
            with monkeypatch.context() as patch:
                patch.setattr(register_module, where, failure)
                with pytest.raises(error):
                    register(runs[2], 0.0)
        versions = client.search_model_versions("name='m'")
        assert sorted(str(v.version) for v in versions) == ["1", "2"]
        assert all("cxr.gate" in v.tags for v in versions)

        # A newcomer on other data: the champion is re-scored on the newcomer's validation
        # split (never its test split), and the decision names the other data.
        splits = []
        real_split_arrays = register_module.split_arrays
        monkeypatch.setattr(
            register_module,
            "split_arrays",
            lambda prepared, split: splits.append(split) or real_split_arrays(prepared, split),
        )
        result = register(runs[2], 1.0, fingerprint="e" * 64)
        assert splits == ["val"]
        assert result["alias_moved"] and str(result["champion_version"]) == "3"
        assert "chosen on other data (fingerprint ffffffffffff)" in result["decision"]
    finally:
        mlflow.set_tracking_uri(None)


def _json(path):
    return json.loads(path.read_text())


@e2e
def test_evaluation_is_in_dvc_and_in_the_training_run(repro, tmp_path):
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
    assert shown[""]["data"]["evaluation/cnn/metrics.json"]["data"] == dvc_metrics(
        test, _json(repo / "evaluation" / "cnn" / "val.json")
    )
    out = ["-o", str(tmp_path / "plots")]
    plots = json.loads(run(["dvc", "plots", "show", "--json", *out], repo).stdout)["data"]
    assert "reports/compare/curves.png" in plots  # every model's learning curves
    assert all(p["type"] == "image" for ps in plots.values() for p in ps), plots  # offline
    assert sorted(p for p in plots if "confusion" in p) == sorted(
        f"evaluation/{m}/figures/confusion.png" for m in TINY["train.models"]
    )  # one confusion matrix per model
    run(["dvc", "plots", "show", *out], repo)
    assert "<script" not in (tmp_path / "plots" / "index.html").read_text()  # no internet

    record = _json(repo / "reports" / "cnn" / "mlflow_run.json")
    client = mlflow.MlflowClient(repro["uri"])
    r = client.get_run(record["run_id"])
    assert r.data.metrics["test_accuracy"] == pytest.approx(test["accuracy"])
    assert "test_recall_covid" in r.data.metrics
    files = {f.path for f in client.list_artifacts(record["run_id"], "evaluation/figures")}
    assert "evaluation/figures/gradcam.png" in files
    assert {i.dataset.name for i in r.inputs.dataset_inputs} >= {"prepared-test"}
    (tested,) = [i.dataset for i in r.inputs.dataset_inputs if i.dataset.name == "prepared-test"]
    assert "features_shape" in tested.profile and "targets_shape" in tested.profile
    logged = client.get_logged_model(record["model_id"])
    assert "test_macro_f1" in {m.key for m in logged.metrics}
    val = _json(repo / "evaluation" / "cnn" / "val.json")
    assert r.data.metrics["val_split_macro_f1"] == pytest.approx(val["macro_f1"])
    # The run's duration is the training's: evaluate and register added to it afterwards.
    evaluated_ms = (repo / "evaluation" / "cnn" / "test.json").stat().st_mtime * 1000
    assert r.info.status == "FINISHED" and r.info.end_time < evaluated_ms
    # One record of each figure: Keras' per-epoch val_* only, no step-0 validation_* copies
    # and no optimizer config as params (train logs its own settings).
    assert not [k for k in r.data.metrics if k.startswith("validation_")]
    assert not [k for k in r.data.params if k.startswith("optimizer_")]
    assert "val_accuracy" in r.data.metrics


@e2e
def test_compare_picks_the_champion_and_logs_the_table(repro):
    import mlflow

    repo = repro["repo"]
    summary = _json(repo / "reports" / "compare" / "summary.json")
    scores = {  # chosen on validation; the test score reported beside it
        m: _json(repo / "evaluation" / m / "val.json")["macro_f1"] for m in TINY["train.models"]
    }
    assert summary["metric"] == "macro_f1" and summary["value"] == max(scores.values())
    assert scores[summary["champion"]] == summary["value"]
    champion_test = _json(repo / "evaluation" / summary["champion"] / "test.json")
    assert summary["test_value"] == champion_test["macro_f1"]
    table = (repo / "reports" / "compare" / "table.md").read_text()
    assert all(f"| {m} |" in table for m in scores) and "McNemar" in table
    # Its timings name the CPU they came from, as the training runs logged it.
    assert (
        f"Timings come from the training runs in MLflow, on {machine.header(dated=False)}." in table
    )
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
    mlflow.set_tracking_uri(repro["uri"])  # the registered pyfunc: its schema and example
    info = mlflow.models.get_model_info(f"models:/{MODEL}@champion")
    assert [c.name for c in info.signature.inputs.inputs] == ["image", "pixels"]
    assert info.saved_input_example_info["type"] == "dataframe"
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


def _post(url: str, body: dict | bytes) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _peak_rss_mb(pid: int) -> float:
    """The process's peak resident memory so far (Linux VmHWM), MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def _over_cap(url: str, size: int, chunked: bool) -> tuple[int, dict]:
    """POST `size` bytes (a multiple of 1 MiB; declared, or chunked without a length); the
    server may answer before the body is sent: read its answer whatever the upload does."""
    import http.client
    from urllib.parse import urlparse

    where = urlparse(url)
    connection = http.client.HTTPConnection(where.hostname, where.port, timeout=60)
    connection.putrequest("POST", "/invocations")
    connection.putheader("Content-Type", "application/json")
    connection.putheader(
        *(("Transfer-Encoding", "chunked") if chunked else ("Content-Length", str(size)))
    )
    connection.endheaders()
    piece = b"0," * (1 << 19)
    try:
        for _ in range(size // len(piece)):
            connection.send(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
        connection.send(b"0\r\n\r\n" if chunked else b"")
    except OSError:  # the server answered and closed: what it said is in the reply
        pass
    response = connection.getresponse()
    return response.status, json.loads(response.read())


@e2e
def test_served_champion_answers_real_radiographs_and_refuses_bad_requests(repro, tmp_path):
    """`cxr serve` (MLflow's scoring app behind the guard): real radiographs in both request
    forms; bad requests get a 400 with the reason and without the request; a body over the
    cap is refused before the server holds it (peak memory <= idle + 200 MB)."""
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
            [str(BIN / "cxr"), "serve", "--port", str(port), "--max-body-mb", "8"],
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
        ramp = [[(r + c) % 256 for c in range(128)] for r in range(128)]  # prepare.min_size
        status, body = _post(f"{url}/invocations", {"dataframe_records": [{"pixels": ramp}]})
        assert status == 200 and len(body["predictions"]) == 1, body
        secret = base64.b64encode(b"GIF? no; SECRET-PAYLOAD").decode()
        for bad, reason in (
            ({"dataframe_records": [{"image": secret}]}, "not an image"),
            ({"dataframe_records": [{"pixels": [1, 2, 3]}]}, "pixels"),
            ({"dataframe_records": [{"pixels": [[0, 128], [255, 64]]}]}, "too small: 2x2 <"),
            (b"[" * 100_000, "nests arrays and objects 100,000 deep"),
            ({"dataframe_records": [{"image": e} for e in encoded * 65]}, "limit of 128"),
            ({"inputs": [[[0, 1], [2, 3]]]}, "2-d input"),
        ):
            status, body = _post(f"{url}/invocations", bad)
            assert status == 400 and reason in body["message"], (status, body)
            assert set(body) == {"error_code", "message"} and secret not in body["message"]
        idle = _peak_rss_mb(server.pid)
        for chunked in (False, True):
            status, body = _over_cap(url, 64 << 20, chunked)
            assert status == 400 and "over the limit of 8,388,608 bytes" in body["message"]
        assert _peak_rss_mb(server.pid) <= idle + 200, (idle, _peak_rss_mb(server.pid))
        status, _ = _post(f"{url}/invocations", {"dataframe_records": [{"image": encoded[0]}]})
        assert status == 200  # still serving
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


@e2e
def test_cxr_predict_classifies_files_and_names_a_bad_one(repro, tmp_path):
    images = _real_images()
    bad = tmp_path / "notes.png"
    bad.write_text("not a radiograph")
    dot = tmp_path / "dot.png"
    Image.new("L", (1, 1)).save(dot)
    proc = run(
        ["cxr", "predict", *map(str, images), str(bad), str(dot)],
        repro["repo"],
        env=repro["env"],
        check=False,
    )
    assert proc.returncode == 1, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [line["file"] for line in lines] == [*map(str, images), str(bad), str(dot)]
    for line in lines[:2]:
        assert sum(line["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
    assert "not an image" in lines[2]["error"]
    assert "too small: 1x1 < 128 px" in lines[3]["error"]  # prepare's minimum, not a label
    local = run(
        ["cxr", "predict", "--model", "models/cnn/model.keras", str(images[0])], repro["repo"]
    )
    assert json.loads(local.stdout)["label"] in ("covid", "lung_opacity", "normal", "pneumonia")


def test_rescoring_the_champion_never_runs_the_code_it_ships(tmp_path, monkeypatch):
    """The gate re-scores the current champion from its Keras file: a version whose pyfunc
    code plants a file when loaded is scored without that code running."""
    import keras
    import mlflow
    import numpy as np

    from cxr.register import rescore

    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    model = keras.Sequential(
        [keras.Input((8, 8, 1)), keras.layers.Flatten(), keras.layers.Dense(2, "softmax")]
    )
    model.save(tmp_path / "model.keras")
    planted = tmp_path / "planted"
    evil = tmp_path / "evil_model.py"
    evil.write_text(
        "import pathlib, mlflow\n"
        f"pathlib.Path({str(planted)!r}).write_text('ran')\n"
        "from cxr.pyfunc_classifier import Classifier\n"
        "mlflow.models.set_model(Classifier())\n"
    )
    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(
            name="classifier",
            python_model=str(evil),
            artifacts={"keras_model": str(tmp_path / "model.keras")},
            model_config={"classes": ["a", "b"]},
            pip_requirements=[],  # no inference of requirements (a subprocess import)
        )
    planted.unlink(missing_ok=True)  # logging may load it once, on the author's machine
    version = mlflow.register_model(info.model_uri, "planted").version
    x = np.random.default_rng(0).integers(0, 256, (6, 16, 16, 1)).astype(np.uint8)
    y = np.array([0, 1] * 3)
    probs = model.predict(np.stack([resize(i[..., 0], 8) for i in x])[..., None], verbose=0)
    expected = scores(y, probs, ["a", "b"])["accuracy"]
    assert rescore(f"models:/planted/{version}", x, y, ["a", "b"], "accuracy") == expected
    # A lung metric scores the images with only their lungs visible, as evaluate did.
    masks = np.zeros((6, 16, 16), bool)
    masks[:, 4:12, 4:12] = True
    only = audit_inputs(x, masks)["lungs_only"]
    probs = model.predict(np.stack([resize(i[..., 0], 8) for i in only])[..., None], verbose=0)
    expected = scores(y, probs, ["a", "b"])["macro_f1"]
    got = rescore(f"models:/planted/{version}", x, y, ["a", "b"], "lungs_only_macro_f1", masks)
    assert got == expected
    assert not planted.exists()
    mlflow.pyfunc.load_model(f"models:/planted/{version}")  # what the gate used to do
    assert planted.read_text() == "ran"
