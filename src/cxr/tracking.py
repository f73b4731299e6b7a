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
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from cxr import errors
from cxr.errors import CxrError
from cxr.files import read_json, write_json
from cxr.repo import git_commit, repo_root

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
GROUP_FILES = ("dvc.yaml", "params.yaml", "data.dvc")


def tracking_uri() -> str:
    move_credentials_out_of_uri()
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repo_root() / 'mlflow.db'}"


SECRET_QUERY_KEYS = (
    "token",
    "access_token",
    "password",
    "secret",
    "key",
    "api_key",
    "pwd",
    "sslpassword",
    "odbc_connect",  # an ODBC connection string, PWD= and all
)


def move_credentials_out_of_uri() -> None:
    """An HTTP(S) MLFLOW_TRACKING_URI with credentials in it (`user:password@host`, or a
    token as `token@host`) is split before MLflow sees it: the credentials go to
    MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN), which
    MLflow sends as HTTP auth, and the URI keeps only the host, so MLflow's own messages
    ("View run at ...") and errors never print them."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or "@" not in parts.netloc:
        return
    if parts.password is not None:
        os.environ.setdefault("MLFLOW_TRACKING_USERNAME", parts.username or "")
        os.environ.setdefault("MLFLOW_TRACKING_PASSWORD", parts.password)
    elif parts.username:
        os.environ.setdefault("MLFLOW_TRACKING_TOKEN", parts.username)
    netloc = parts.netloc.rsplit("@", 1)[1]
    os.environ["MLFLOW_TRACKING_URI"] = urlunsplit(
        (parts.scheme, netloc, parts.path, parts.query, parts.fragment)
    )


def scrub(text: str) -> str:
    """`text` (an error message shown to the user) without the tracking credentials."""
    for name in ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        secret = os.environ.get(name)
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return text


# MLflow's HTTP defaults (7 retries with backoff, 120 s timeouts) make a server that is down
# look like a hang of minutes; these apply unless the user sets them.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


def check_server(timeout: float = 5.0) -> None:
    """Fail in seconds, in one line, when the tracking URI names an HTTP server or a database
    that does not answer: call it before a stage's expensive work. Any HTTP answer (even 401
    or 404) counts as up; a local store always is, where its folder can be written."""
    import urllib.error
    import urllib.request

    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)
    uri = tracking_uri()  # with no credentials left in it (move_credentials_out_of_uri)
    parts = urlsplit(uri)
    if parts.scheme.split("+")[0] in DATABASE_PORTS:
        _check_database(uri, timeout)
    elif parts.scheme == "sqlite":
        _check_sqlite_folder(uri)
    if parts.scheme not in ("http", "https"):
        return
    probe = urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/") + "/health", "", ""))
    try:
        urllib.request.urlopen(probe, timeout=timeout).close()
    except urllib.error.HTTPError:
        return  # it answered
    except (OSError, ValueError) as err:
        reason = getattr(err, "reason", None) or type(err).__name__
        raise CxrError(
            f"the MLflow tracking server at {redact(uri)} does not answer ({reason}); start "
            "it, or unset MLFLOW_TRACKING_URI to use the local store (mlflow.db)."
        ) from None


# The default ports of the databases MLflow keeps a store in (SQLAlchemy URLs).
DATABASE_PORTS = {"postgresql": 5432, "mysql": 3306, "mssql": 1433}


def _check_database(uri: str, timeout: float) -> None:
    """A TCP connect to the database's host and port: MLflow retries a database that is down
    for minutes, printing a warning each time, and then looks like an empty store. A Unix
    socket or an ODBC data source name (mssql with neither port nor database) is not probed:
    no host and port to connect to."""
    import socket

    from sqlalchemy.engine import make_url

    try:
        url = make_url(uri)
    except ValueError as err:  # a port that is not a number
        raise CxrError(
            f"MLFLOW_TRACKING_URI {redact(uri)} is not a database URL ({err}); fix it, or "
            "unset it to use the local store (mlflow.db)."
        ) from None
    odbc_name = url.get_backend_name() == "mssql" and not (url.port or url.database)
    if not url.host or odbc_name or {"host", "unix_socket", "odbc_connect"} & {*url.query}:
        return
    if "@" in url.host:  # a password with "@": SQLAlchemy reads the rest as the host
        raise CxrError(
            f"MLFLOW_TRACKING_URI {redact(uri)}: its password holds '@'; write it as %40."
        )
    port = url.port or DATABASE_PORTS[url.get_backend_name()]
    try:
        socket.create_connection((url.host, port), timeout=timeout).close()
    except (OSError, OverflowError) as err:  # OverflowError: a port over 65535
        raise CxrError(
            f"the MLflow tracking database at {redact(uri)} does not answer on "
            f"{url.host}:{port} ({getattr(err, 'strerror', None) or err}); start the database, "
            "or fix MLFLOW_TRACKING_URI (unset it to use the local store, mlflow.db)."
        ) from None


def _check_sqlite_folder(uri: str) -> None:
    """A SQLite store not made yet needs a folder it can be made in (MLflow makes missing
    folders): in a folder it cannot write, MLflow retries opening the file for minutes. A
    file that exists is left to MLflow (read-only, it still serves `cxr predict`)."""
    from sqlalchemy.engine import make_url

    database = make_url(uri).database
    if not database or database == ":memory:" or Path(database).exists():
        return
    folder = next(p for p in Path(database).absolute().parents if p.exists())
    if not (folder.is_dir() and os.access(folder, os.W_OK | os.X_OK)):
        raise CxrError(
            f"the MLflow tracking database {redact(uri)} cannot be made: {folder} is not a "
            "writable folder; fix its permissions, or set MLFLOW_TRACKING_URI to another store."
        )


def redact(uri: str) -> str:
    """A URI without its secrets, for tags, params, files and messages: the password of
    `user:password@`, a token given as `token@`, and secret query values (`?token=...`)
    become `***`; every other character stays as it was (`sqlite:////abs/path.db` keeps its
    four slashes, a query its order and its encoding)."""
    from urllib.parse import unquote_plus

    scheme, sep, rest = uri.partition("://")
    if sep and "@" in rest:
        # The user info ends at the last "@" before the path: SQLAlchemy takes a password
        # with a raw "/", "?" or "#" in it, and urllib one with "@"; a wrong guess hides too
        # much, never too little.
        first = rest.index("@")
        path = rest.find("/", first)
        end = rest.rfind("@", 0, path if path >= 0 else len(rest))
        user, colon, _ = rest[:end].partition(":")
        uri = scheme + sep + (user + ":***" if colon else "***") + rest[end:]
    base, mark, query = uri.partition("?")
    if not mark:
        return uri
    query, hash_, fragment = query.partition("#")
    pairs = [pair.partition("=") for pair in query.split("&")]
    query = "&".join(
        key + eq + ("***" if eq and unquote_plus(key).lower() in SECRET_QUERY_KEYS else value)
        for key, eq, value in pairs
    )
    return base + mark + query + hash_ + fragment


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
    if not uri.startswith(("http://", "https://", "databricks")):
        # A database store with no server makes its Default experiment, with artefacts under
        # ./mlruns, when first opened: open it from the repository root, not from where a
        # stage runs (a DVC temp copy in .dvc/tmp, deleted after `dvc exp run --temp`).
        with contextlib.chdir(repo_root()):
            mlflow.MlflowClient().search_experiments(max_results=1)
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
    experiment: str,
    run_name: str,
    tags: dict[str, str],
    run_id: str | None = None,
    system_metrics: bool = False,
    add_only: bool = False,
) -> Iterator[Any]:
    """Start this stage's own run in the group, or reopen `run_id`: a killed training's run,
    to resume it, or (`add_only`) a finished training run that evaluate and register add to,
    which keeps its status and end time, even when they fail, so that its duration in MLflow
    stays the training's.
    An `mlflow run` parent becomes its parent. `system_metrics`: MLflow samples CPU, memory,
    disk, network and (with nvidia-ml-py, the gpu extra) GPU use into the run."""
    import mlflow

    experiment_id = setup_experiment(experiment)
    parent = os.environ.pop("MLFLOW_RUN_ID", None)
    try:
        if run_id is not None:
            client = mlflow.MlflowClient()
            before = client.get_run(run_id).info if add_only else None
            try:
                with mlflow.start_run(run_id=run_id, log_system_metrics=system_metrics) as run:
                    yield run
            finally:  # an evaluation that fails is no failed training
                if before is not None and before.status == "FINISHED" and before.end_time:
                    client.set_terminated(run_id, "FINISHED", end_time=before.end_time)
            return
        with mlflow.start_run(
            run_id=_new_run(experiment_id, run_name, tags, parent),
            log_system_metrics=system_metrics,
        ) as run:
            yield run
    finally:
        if parent is not None:
            os.environ["MLFLOW_RUN_ID"] = parent


def _new_run(experiment_id: str, run_name: str, tags: dict[str, str], parent: str | None) -> str:
    """A new run's id, with the tags mlflow.start_run would give it (user, source, git), its
    parent, and its start at the stage process's start when this process is a stage."""
    import mlflow
    from mlflow.tracking.context import registry  # pinned: tests/test_private_apis.py
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    client = mlflow.MlflowClient()
    if parent and client.get_run(parent).info.lifecycle_stage == "deleted":  # as start_run
        raise mlflow.exceptions.MlflowException(
            f"Cannot start run under parent run with ID {parent} because it is in the deleted "
            "state."
        )
    own = tags | ({MLFLOW_PARENT_RUN_ID: parent} if parent else {})
    run = client.create_run(
        experiment_id,
        start_time=errors.stage_started_ms,
        tags=registry.resolve_tags(own),
        run_name=run_name,
    )
    return run.info.run_id


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
