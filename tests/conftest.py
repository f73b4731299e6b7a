"""Shared fixtures: a throw-away copy of the repository, a real `mlflow server`, tiny data."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

import cxr  # noqa: F401  (before any test imports Keras: TensorFlow with oneDNN, cxr.machine)

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's bin: dvc, mlflow, cxr
# Real radiographs for the tests that need them (docs/development.md); absent: they skip.
REAL_SAMPLE = Path(
    os.environ.get("CXR_REAL_SAMPLE", ROOT.parent / "shared" / "data" / "cxr-real-sample")
)

# Tiny settings for end-to-end runs: the demo's overrides, smaller.
TINY = {
    "data.source": "synthetic",
    "data.synthetic.per_class": 30,
    "data.synthetic.image_size": 128,  # written small: prepare makes them 32 px anyway
    "prepare.image_size": 32,
    "train.epochs": 3,
    "train.batch_size": 16,
    "train.models": ["cnn", "cnn4_bn"],
}
# Commits made by tests (and by `dvc exp run`) need an identity on a bare CI machine.
GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "cxr tests",
    "GIT_AUTHOR_EMAIL": "tests@localhost",
    "GIT_COMMITTER_NAME": "cxr tests",
    "GIT_COMMITTER_EMAIL": "tests@localhost",
}


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """`make test`'s `pytest -n N --dist loadfile`: a file's tests share a worker, so a module
    fixture is made once; test_champion's go with test_pipeline's, the other users of the
    session's `repro`, so it runs once too. (`--dist loadgroup` with `xdist_group` marks
    would say it in marks, but pytest 9.2 drops the marks' groups: pytest-xdist #1386.)"""
    from xdist.scheduler import LoadFileScheduling

    class Scheduler(LoadFileScheduling):
        def _split_scope(self, nodeid):
            path = super()._split_scope(nodeid)
            return "tests/test_pipeline.py" if path == "tests/test_champion.py" else path

    return Scheduler(config, log)


def worker_database(url: str | None) -> str | None:
    """`url` itself, or under pytest-xdist a fresh database of the worker's own beside it:
    two workers' servers on one database would see each other's runs and models."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if not url or not worker:
        return url
    import sqlalchemy

    base = sqlalchemy.make_url(url)
    name = f"{base.database}_{worker}"
    engine = sqlalchemy.create_engine(base, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}"'))
        conn.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return base.set(database=name).render_as_string(hide_password=False)


def prepare_settings(**overrides) -> dict:
    """params.yaml's prepare section (the one definition of its keys) with `overrides`."""
    from cxr.params import load_params

    return {**load_params(ROOT / "params.yaml")["prepare"], **overrides}


def run(cmd: list[str], cwd: Path, env: dict | None = None, check: bool = True, timeout=900):
    """Run a command as a user would; on failure show its output in the test report."""
    full_env = {**os.environ, **GIT_IDENTITY, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    full_env.update(env or {})
    proc = subprocess.run(
        cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-5000:]}"
            f"\n--- stderr\n{proc.stderr[-5000:]}"
        )
    return proc


def copy_repo(dest: Path) -> Path:
    """A fresh git repository holding what a clone of this working tree would hold."""
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\0")
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    run(["git", "init", "-q", "-b", "main"], dest)
    run(["git", "add", "-A"], dest)
    run(["git", "commit", "-qm", "copy"], dest)
    # What the README's set-up does on a fresh clone (see the Makefile's `data` target).
    (dest / "data").mkdir(exist_ok=True)
    run(["dvc", "commit", "-f", "-q", "data.dvc"], dest)
    return dest


def set_params(repo: Path, overrides: dict) -> None:
    import yaml

    path = repo / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for key, value in overrides.items():
        *parents, last = key.split(".")
        node = params
        for part in parents:
            node = node[part]
        node[last] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    """Poll `url` until it answers; fail with the server's log if it exits or times out."""
    deadline = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            raise RuntimeError(f"{url} did not come up:\n{log.read_text()}")
        time.sleep(0.5)


@contextlib.contextmanager
def serving(command: list[str], log: Path, probe: str, timeout: float):
    """Run a server `command` in its own process group, logging to `log`, until `probe`
    answers; on exit stop the whole group: servers start helper processes (MLflow's job
    consumers) that outlive a killed parent."""
    with open(log, "w") as out:
        proc = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            wait_until_up(probe, proc, log, timeout=timeout)
            yield
        finally:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:  # the group is already gone (it failed to start)
                pass


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1, stopped with the session."""
    where = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    command = [
        str(BIN / "mlflow"),
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--backend-store-uri",
        # CI's .ci/with-postgres points this at PostgreSQL (the team set-up in docs/team.md)
        worker_database(os.environ.get("CXR_TEST_BACKEND_STORE_URI"))
        or f"sqlite:///{where / 'mlflow.db'}",
        "--artifacts-destination",
        str(where / "artifacts"),
        "--workers",
        "1",
    ]
    uri = f"http://127.0.0.1:{port}"
    with serving(command, where / "server.log", f"{uri}/health", timeout=120):
        yield uri


@pytest.fixture(scope="session")
def synthetic_raw(tmp_path_factory) -> Path:
    """Phantoms in the Kaggle layout, 12 per class at 64 px."""
    from cxr.synthetic import write_dataset

    root = tmp_path_factory.mktemp("raw")
    write_dataset(root, per_class=12, size=64)
    return root


@pytest.fixture(scope="session")
def repro(tmp_path_factory, mlflow_server):
    """`dvc repro` twice in a tiny copy of the repository, against the test server."""
    repo = copy_repo(tmp_path_factory.mktemp("repro"))
    set_params(repo, TINY)
    env = {"MLFLOW_TRACKING_URI": mlflow_server}
    first = run(["dvc", "repro"], repo, env=env)
    second = run(["dvc", "repro"], repo, env=env)
    return {"repo": repo, "uri": mlflow_server, "first": first, "second": second, "env": env}


# The download tests' (test_download.py, test_kaggle_client.py).
@pytest.fixture
def creds(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "kaggle-config"))
    for var in ("KAGGLE_USERNAME", "KAGGLE_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("KAGGLE_API_TOKEN", "test-token")


@pytest.fixture(scope="module")
def sample_zip(tmp_path_factory) -> Path:
    if not REAL_SAMPLE.is_dir():
        pytest.skip(f"real sample not found at {REAL_SAMPLE}")
    from tests.kaggle_fakes import zip_tree  # which imports this module

    return zip_tree(REAL_SAMPLE, tmp_path_factory.mktemp("zips") / "sample.zip")
