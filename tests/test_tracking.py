import os
import time
from pathlib import Path

import mlflow
import pytest

from cxr import repo, tracking


def test_store_is_at_the_repo_root_or_the_env(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.delenv("DVC_ROOT")
    (tmp_path / ".dvc").mkdir()
    (tmp_path / "deep" / "er").mkdir(parents=True)
    assert repo.repo_root(tmp_path / "deep" / "er") == tmp_path
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.tracking_uri() == "http://127.0.0.1:5000"


def test_passwords_never_leave_the_uri():
    uri = "postgresql://ml:s3cret@db.example:5432/mlflow"
    assert tracking.redact(uri) == "postgresql://ml:***@db.example:5432/mlflow"
    assert tracking.redact("http://127.0.0.1:5000") == "http://127.0.0.1:5000"


def test_group_is_the_dvc_experiment_or_a_stable_hash(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DVC_EXP_NAME", "lucky-wren")
    assert tracking.execution_group() == "lucky-wren"
    monkeypatch.delenv("DVC_EXP_NAME")
    (tmp_path / "params.yaml").write_text("a: 1\n")
    first = tracking.execution_group()
    assert first.startswith("repro-") and first == tracking.execution_group()
    (tmp_path / "params.yaml").write_text("a: 2\n")
    assert tracking.execution_group() != first


@pytest.fixture
def local_store(tmp_path, monkeypatch):
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    yield tmp_path
    mlflow.set_tracking_uri(None)


def test_a_stages_run_starts_when_its_process_did(local_store, monkeypatch):
    """The run's duration in MLflow is the stage's, start-up included (cxr.errors.run_stage
    records the process's start), with the tags mlflow.start_run gives a new run."""
    from cxr import errors

    started = int((time.time() - 42) * 1000)
    monkeypatch.setattr(errors, "stage_started_ms", started)
    with tracking.start_run("cxr-test", "cnn", {"cxr.group": "g"}) as run:
        pass
    info, tags = mlflow.get_run(run.info.run_id).info, mlflow.get_run(run.info.run_id).data.tags
    assert info.start_time == started and info.end_time - started >= 42_000
    assert info.run_name == "cnn" and info.status == "FINISHED" and tags["cxr.group"] == "g"
    assert {"mlflow.user", "mlflow.source.name", "mlflow.source.type"} <= set(tags)
    monkeypatch.setattr(errors, "stage_started_ms", None)  # not a stage: the run starts now
    with tracking.start_run("cxr-test", "cnn", {}) as run:
        pass
    assert mlflow.get_run(run.info.run_id).info.start_time > started + 40_000


def test_experiment_kind_and_artifacts_beside_the_store(local_store):
    exp_id = tracking.setup_experiment("cxr-test")
    exp = mlflow.MlflowClient().get_experiment(exp_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    assert exp.artifact_location == (local_store / "mlartifacts" / "cxr-test").as_uri()
    assert tracking.setup_experiment("cxr-test") == exp_id


def test_mlflow_run_id_becomes_the_parent(local_store, monkeypatch):
    exp_id = tracking.setup_experiment("cxr-test")
    parent = mlflow.MlflowClient().create_run(exp_id).info.run_id
    monkeypatch.setenv("MLFLOW_RUN_ID", parent)
    with tracking.start_run("cxr-test", "cnn", {"cxr.group": "g"}) as run:
        assert run.info.run_id != parent
    child = mlflow.get_run(run.info.run_id)
    assert child.data.tags["mlflow.parentRunId"] == parent
    assert child.data.tags["cxr.group"] == "g"
    import os

    assert os.environ["MLFLOW_RUN_ID"] == parent  # restored for the next stage
    mlflow.MlflowClient().delete_run(parent)  # refused as mlflow.start_run refuses it
    refused = pytest.raises(mlflow.exceptions.MlflowException, match="deleted state")
    with refused, tracking.start_run("cxr-test", "cnn", {}):
        pass


def test_training_runs_can_record_system_metrics(local_store, monkeypatch):
    import time

    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.5")
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING", "1")
    started = time.perf_counter()
    with tracking.start_run("cxr-test", "cnn", {}, system_metrics=True) as run:
        while (
            "system/cpu_utilization_percentage" not in mlflow.get_run(run.info.run_id).data.metrics
        ):
            assert time.perf_counter() - started < 60, "no system metrics within 60 s"
            time.sleep(0.1)
    took = time.perf_counter() - started
    # Only when asked: none in twice the time the first run took to log some.
    with tracking.start_run("cxr-test", "other", {}) as other:
        time.sleep(max(2 * took, 1.0))
    assert not mlflow.get_run(other.info.run_id).data.metrics


def _dead_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again: nothing listens there


@pytest.fixture
def no_tracking_credentials(monkeypatch):
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.delenv(name, raising=False)


def test_a_tracking_server_that_is_down_is_one_line_without_the_password(
    monkeypatch, no_tracking_credentials
):
    from cxr.errors import CxrError

    port = _dead_port()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://ml:s3cret@127.0.0.1:{port}")
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    with pytest.raises(CxrError) as caught:
        tracking.check_server()
    message = str(caught.value)
    assert message.startswith(f"the MLflow tracking server at http://127.0.0.1:{port} does")
    assert "does not answer" in message and "unset MLFLOW_TRACKING_URI" in message
    assert "s3cret" not in message and "\n" not in message
    import os

    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "2"  # MLflow's 7 made it minutes


def test_credentials_leave_the_uri_before_mlflow_sees_it(monkeypatch, no_tracking_credentials):
    import os

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://ml:s3cret@mlflow.example:5000/base")
    assert tracking.tracking_uri() == "https://mlflow.example:5000/base"
    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "ml"
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == "s3cret"
    assert tracking.scrub("401 for s3cret at host") == "401 for *** at host"
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tok3n-value@[::1]:5000")
    assert tracking.tracking_uri() == "http://[::1]:5000"
    assert os.environ["MLFLOW_TRACKING_TOKEN"] == "tok3n-value"


@pytest.mark.parametrize(
    ("uri", "shown"),
    [
        ("postgresql://ml:s3cret@db:5432/mlflow", "postgresql://ml:***@db:5432/mlflow"),
        ("http://tok3n@host:5000", "http://***@host:5000"),
        ("https://host/api?token=tok3n&x=1", "https://host/api?token=***&x=1"),
        ("http://ml:s3cret@[fe80::1]:5000/", "http://ml:***@[fe80::1]:5000/"),
        ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
        # Only the secrets change: paths keep their slashes, queries their bytes.
        ("sqlite:////abs/path.db", "sqlite:////abs/path.db"),
        ("sqlite:///rel.db", "sqlite:///rel.db"),
        ("file:///x", "file:///x"),
        (
            "postgresql+psycopg://user:secret@host:5432/db?sslmode=require",
            "postgresql+psycopg://user:***@host:5432/db?sslmode=require",
        ),
        ("http://user:tok@h/", "http://user:***@h/"),
        ("mysql://u:p%40ss@db/x?Password=p&ssl=1", "mysql://u:***@db/x?Password=***&ssl=1"),
        ("https://h/a?x=a%20b&y=1+2&token=t#top", "https://h/a?x=a%20b&y=1+2&token=***#top"),
        ("https://h/a?flag&x=", "https://h/a?flag&x="),
        # Passwords SQLAlchemy or urllib take unencoded: "/", "?", "#" or "@" in them.
        ("postgresql://bob:pa/ss@db:1/mlflow", "postgresql://bob:***@db:1/mlflow"),
        ("postgresql://bob:pa?ss#x@db/mlflow", "postgresql://bob:***@db/mlflow"),
        ("postgresql://bob:p@ss@db/mlflow?x=a@b", "postgresql://bob:***@db/mlflow?x=a@b"),
        (
            "mssql+pyodbc://h/?odbc_connect=DRIVER%3Dx%3BPWD%3Dsecret",
            "mssql+pyodbc://h/?odbc_connect=***",
        ),
    ],
)
def test_redaction_hides_the_secrets_and_keeps_every_other_byte(uri, shown):
    assert tracking.redact(uri) == shown


def test_the_run_record_keeps_the_store_path(local_store, tmp_path):
    with tracking.start_run("cxr-test", "cnn", {}) as run:
        tracking.write_run_record(tmp_path / "mlflow_run.json", run)
    from cxr.files import read_json

    recorded = read_json(tmp_path / "mlflow_run.json")["tracking_uri"]
    assert recorded == f"sqlite:///{local_store}/mlflow.db"  # four slashes: an absolute path


@pytest.fixture
def no_mlflow_retries(monkeypatch):
    """MLflow's database retry loop (minutes for a database that is down) fails at once."""

    def entered(uri):
        raise AssertionError(f"MLflow's retry loop was entered for {uri}")

    monkeypatch.setattr("mlflow.store.db.utils.create_sqlalchemy_engine_with_retry", entered)
    monkeypatch.setattr(
        "mlflow.store.model_registry.sqlalchemy_store.create_sqlalchemy_engine_with_retry", entered
    )


@pytest.mark.parametrize("scheme", ["postgresql+psycopg", "postgresql", "mysql", "mssql+pymssql"])
def test_a_database_that_is_down_is_one_line_without_the_password(
    scheme, monkeypatch, no_mlflow_retries
):
    from cxr.errors import CxrError

    port = _dead_port()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"{scheme}://ml:s3cret@127.0.0.1:{port}/mlflow")
    with pytest.raises(CxrError) as caught:
        tracking.check_server()
    message = str(caught.value)
    assert message.startswith(
        f"the MLflow tracking database at {scheme}://ml:***@127.0.0.1:{port}/mlflow does not "
        f"answer on 127.0.0.1:{port} (Connection refused); start the database"
    )
    assert "fix MLFLOW_TRACKING_URI" in message
    assert "s3cret" not in message and "\n" not in message


@pytest.mark.parametrize("password", ["zq/xw", "zq@xw", "zq?xw"])
def test_a_password_with_url_characters_is_never_shown(password, monkeypatch, no_mlflow_retries):
    from cxr.errors import CxrError

    uri = f"postgresql://ml:{password}@127.0.0.1:{_dead_port()}/mlflow"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(CxrError) as caught:
        tracking.check_server()
    message = str(caught.value)
    assert "ml:***@" in message and "zq" not in message and "xw" not in message, message


@pytest.mark.parametrize(
    ("uri", "port"),
    [
        ("postgresql+psycopg://ml@db.example/mlflow", 5432),
        ("mysql+pymysql://ml@db.example/mlflow", 3306),
        ("mssql+pyodbc://ml@db.example/mlflow?driver=ODBC+Driver+18", 1433),
        ("postgresql://ml@db.example:6543/mlflow", 6543),
        ("postgresql://ml@db.example", 5432),  # no database named: the user's, still probed
        ("postgresql:///mlflow?host=/var/run/postgresql", None),  # a Unix socket: not probed
        ("mssql+pyodbc://ml:pw@my_dsn", None),  # an ODBC data source name: not probed
    ],
)
def test_database_probes_go_to_the_url_port_or_the_default(uri, port, monkeypatch):
    import socket

    probed = []

    class Connection:
        def close(self):
            pass

    def connect(address, timeout):
        probed.append(address)
        return Connection()

    monkeypatch.setattr(socket, "create_connection", connect)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    tracking.check_server()
    assert probed == ([("db.example", port)] if port else [])


@pytest.mark.skipif(
    not os.environ.get("CXR_TEST_BACKEND_STORE_URI"),
    reason="needs a database URL in CXR_TEST_BACKEND_STORE_URI (.ci/with-postgres sets one)",
)
def test_a_database_that_answers_passes(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", os.environ["CXR_TEST_BACKEND_STORE_URI"])
    tracking.check_server()


def test_a_sqlite_store_needs_a_folder_it_can_be_made_in(tmp_path, monkeypatch):
    from cxr.errors import CxrError

    (tmp_path / "notes.txt").write_text("a file, not a folder")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/notes.txt/mlflow.db")
    import re

    with pytest.raises(CxrError, match=re.escape(f"{tmp_path}/notes.txt is not a writable folder")):
        tracking.check_server()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/new/dir/mlflow.db")
    tracking.check_server()  # MLflow makes the missing folders
    assert not (tmp_path / "new").exists()  # the check itself makes nothing


SCRIPT = """
import mlflow
from pathlib import Path
from cxr import tracking
tracking.check_server()
with tracking.start_run("cxr-secrets", "probe", {"cxr.group": "g"}) as run:
    mlflow.log_param("where", tracking.redact(tracking.tracking_uri()))
    Path("record").mkdir()
    (Path("record") / "note.txt").write_text("artefact")
    mlflow.log_artifacts("record")
    tracking.write_run_record(Path("record") / "mlflow_run.json", run)
print("run", run.info.run_id)
"""


def test_no_output_or_artefact_of_a_run_holds_the_password(
    mlflow_server, tmp_path, no_tracking_credentials
):
    import subprocess
    import sys

    host = mlflow_server.split("//", 1)[1]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"http://ml:s3cret@{host}"}
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "s3cret" not in out.stdout + out.stderr
    run_id = out.stdout.split("run ")[-1].strip()
    run = mlflow.MlflowClient(mlflow_server).get_run(run_id)
    assert "s3cret" not in str(run.data.params) + str(run.data.tags)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    files += [Path(mlflow.artifacts.download_artifacts(run_id=run_id, tracking_uri=mlflow_server))]
    for path in files:
        for f in [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]:
            assert b"s3cret" not in f.read_bytes(), f


def test_a_server_that_answers_or_a_local_store_passes(mlflow_server, monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    tracking.check_server()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    tracking.check_server()


def test_cxr_predict_says_the_server_is_down_not_run_the_pipeline(monkeypatch, capsys, tmp_path):
    from cxr.cli import main
    from tests.conftest import ROOT

    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{_dead_port()}")
    assert main(["predict", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "does not answer" in err and "Run the pipeline first" not in err


def test_cxr_predict_says_the_database_is_down_not_run_the_pipeline(
    monkeypatch, capsys, tmp_path, no_mlflow_retries
):
    from cxr.cli import main
    from tests.conftest import ROOT

    monkeypatch.chdir(ROOT)
    uri = f"postgresql+psycopg://ml:s3cret@127.0.0.1:{_dead_port()}/mlflow"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert main(["predict", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "tracking database" in err and "does not answer" in err, err
    assert "Run the pipeline first" not in err and "s3cret" not in err


def test_adding_to_a_finished_run_keeps_its_duration(tmp_path, monkeypatch):
    """Evaluate and register add metrics and files to the finished training run: its status
    and end time stay the training's (MLflow shows how long the training took)."""
    import mlflow

    monkeypatch.setenv("DVC_ROOT", str(tmp_path))  # a throw-away store
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    try:
        with tracking.start_run("t", "cnn", {}) as training:
            run_id = training.info.run_id
        before = mlflow.MlflowClient().get_run(run_id).info
        with tracking.start_run("t", "cnn", {}, run_id=run_id, add_only=True):
            mlflow.log_metric("test_accuracy", 0.9)
        after = mlflow.MlflowClient().get_run(run_id)
        assert after.data.metrics["test_accuracy"] == 0.9
        assert (after.info.status, after.info.end_time) == ("FINISHED", before.end_time)
        failing = tracking.start_run("t", "cnn", {}, run_id=run_id, add_only=True)
        with pytest.raises(OSError, match="disk full"), failing:  # an evaluation that fails
            raise OSError("disk full")
        after = mlflow.MlflowClient().get_run(run_id).info
        assert (after.status, after.end_time) == ("FINISHED", before.end_time)
    finally:
        mlflow.set_tracking_uri(None)
