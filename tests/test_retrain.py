""".ci/retrain, the script the retraining workflow runs: its guards, and two runs against a
real S3-compatible server (moto) and a real `mlflow server` on 127.0.0.1."""

from __future__ import annotations

import re
import time
import urllib.request

import pytest

from cxr import retrain
from cxr.errors import CxrError
from cxr.params import load_params
from tests.conftest import BIN, ROOT, TINY, _free_port, copy_repo, run, serving, set_params

PARAMS = load_params(ROOT / "params.yaml")
READY = {
    "DVC_REMOTE_URL": "s3://bucket/cxr",
    "MLFLOW_TRACKING_URI": "https://mlflow.example.org",
    "KAGGLE_API_TOKEN": "KGAT_x",
}


def _params(**data) -> dict:
    return {**PARAMS, "data": {**PARAMS["data"], **data}}


@pytest.mark.parametrize(
    ("missing", "said"),
    [
        ({"DVC_REMOTE_URL": ""}, "DVC_REMOTE_URL is not set"),
        ({"MLFLOW_TRACKING_URI": ""}, "MLFLOW_TRACKING_URI is not set"),
        ({"MLFLOW_TRACKING_URI": "sqlite:///mlflow.db"}, "names a local store"),
        ({"MLFLOW_TRACKING_URI": "mlruns"}, "names a local store"),
        ({"KAGGLE_API_TOKEN": ""}, "KAGGLE_API_TOKEN is not set"),
        ({"AWS_ACCESS_KEY_ID": "AKIA"}, "only one of AWS_ACCESS_KEY_ID"),
    ],
)
def test_each_missing_secret_is_one_line_naming_it(missing, said, monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.kaggle token to fall back on
    for name in ("KAGGLE_API_TOKEN", "KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_CONFIG_DIR"):
        monkeypatch.delenv(name, raising=False)
    retrain.check(READY, _params(source="kaggle"))  # all there: passes
    with pytest.raises(CxrError, match=said) as caught:
        retrain.check({**READY, **missing}, _params(source="kaggle"))
    assert "\n" not in str(caught.value) and "KGAT_x" not in str(caught.value)


def test_no_kaggle_token_is_needed_for_other_sources():
    retrain.check({**READY, "KAGGLE_API_TOKEN": ""}, _params(source="synthetic"))


def test_a_remote_without_its_dvc_plugin_names_the_extra_to_install(monkeypatch):
    real = retrain.importlib.util.find_spec
    monkeypatch.setattr(
        retrain.importlib.util, "find_spec", lambda m: None if m == "dvc_gs" else real(m)
    )
    retrain.check(READY, _params(source="synthetic"))  # s3: dvc_s3 is installed (dev)
    with pytest.raises(CxrError, match=r"make install EXTRAS=dev,remote-gs"):
        retrain.check({**READY, "DVC_REMOTE_URL": "gs://b/cxr"}, _params(source="synthetic"))


def test_the_version_is_kaggles_current_one_unless_pinned_and_not_following():
    latest = {"n": 0}

    def lookup(dataset):
        latest["n"] += 1
        assert dataset == PARAMS["data"]["kaggle_dataset"]
        return 7

    assert retrain.version(_params(source="synthetic"), {}, lookup) is None
    assert retrain.version(_params(source="kaggle", kaggle_version=None), {}, lookup) == 7
    assert retrain.version(_params(source="kaggle", kaggle_version=5), {}, lookup) == 7
    pinned = {"KAGGLE_FOLLOW_LATEST": "false"}
    assert retrain.version(_params(source="kaggle", kaggle_version=5), pinned, lookup) == 5
    assert retrain.version(_params(source="kaggle", kaggle_version=None), pinned, lookup) == 7
    assert latest["n"] == 3


def test_the_top_up_sets_version_is_looked_up_and_compared_like_the_databases():
    def lookup(dataset):
        return {PARAMS["data"]["topup_dataset"]: 2, PARAMS["data"]["kaggle_dataset"]: 7}[dataset]

    kaggle = _params(source="kaggle", topup="viral", topup_version=None)
    assert retrain.version(kaggle, {}, lookup, which="top-up") == 2
    assert retrain.version({**kaggle, "data": {**kaggle["data"], "topup": None}}, {}, lookup,
                           which="top-up") is None  # fmt: skip
    lock = {"stages": {"download": {"params": {"params.yaml": {
        "data.kaggle_version": 7, "data.topup_version": 1}}}}}  # fmt: skip
    assert retrain.version_changes(lock, {"database": 7, "top-up": 2}) == [
        "Kaggle top-up version 1 -> 2"
    ]
    assert retrain.version_changes(lock, {"database": 7, "top-up": 1}) == []
    assert retrain.version_changes(lock, {"database": 8, "top-up": None}) == [
        "Kaggle database version 7 -> 8"
    ]


def test_no_dvc_lock_is_a_change(tmp_path):
    assert retrain.changes(tmp_path, {}) == [
        "no dvc.lock: nothing has been trained and adopted here yet"
    ]


# --- the script, end to end --------------------------------------------------------------

BUCKET = "cxr-test"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto's S3 server on 127.0.0.1 with an empty bucket."""
    log = tmp_path_factory.mktemp("s3") / "moto.log"
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with serving([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], log, url, 60):
        urllib.request.urlopen(urllib.request.Request(f"{url}/{BUCKET}", method="PUT")).close()
        yield url


def _objects(s3: str) -> list[str]:
    with urllib.request.urlopen(f"{s3}/{BUCKET}?list-type=2&max-keys=1000") as answer:
        return re.findall(r"<Key>([^<]+)</Key>", answer.read().decode())


def _retrain(origin, where, name, env):
    run(["git", "clone", "-q", str(origin), str(where)], where.parent)
    t0 = time.monotonic()
    proc = run(["bash", ".ci/retrain"], where, env={**env, "EXP_NAME": name}, timeout=900)
    return proc, time.monotonic() - t0


@pytest.mark.e2e
def test_retraining_trains_pushes_and_then_skips_when_nothing_changed(tmp_path, s3, mlflow_server):
    from mlflow import MlflowClient

    seed = copy_repo(tmp_path / "seed")
    # its own experiment and registered model on the session's server, shared with other tests
    names = {"mlflow.experiment": "retrain-test", "register.model_name": "cxr-retrain-test"}
    set_params(seed, {**TINY, "train.models": ["cnn"], "train.epochs": 2, **names})
    run(["git", "commit", "-qam", "tiny"], seed)
    origin = tmp_path / "origin.git"
    run(["git", "clone", "-q", "--bare", str(seed), str(origin)], tmp_path)
    env = {
        "DVC_REMOTE_URL": f"s3://{BUCKET}/dvc",
        "AWS_ENDPOINT_URL": s3,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "MLFLOW_TRACKING_URI": mlflow_server,
        "KAGGLE_API_TOKEN": "",
    }
    client = MlflowClient(mlflow_server)
    model = names["register.model_name"]

    first, _ = _retrain(origin, tmp_path / "first", "retrain-1", env)
    assert "nothing changed" not in first.stdout
    assert any(key.startswith("dvc/files/md5/") for key in _objects(s3))  # data and models
    refs = run(["git", "ls-remote", str(origin)], tmp_path).stdout
    assert "refs/heads/retrain-1" in refs and "refs/exps/" in refs
    committed = run(["git", "show", "--stat", "--format=%s", "retrain-1"], origin).stdout
    assert "dvc.lock" in committed and committed.startswith("Retrained: retrain-1")
    champion = client.get_model_version_by_alias(model, "champion")
    experiment = client.get_experiment_by_name(names["mlflow.experiment"]).experiment_id
    runs = client.search_runs([experiment])

    # The results pull request is merged; the next retraining, in a fresh clone, trains nothing.
    run(["git", "update-ref", "refs/heads/main", "refs/heads/retrain-1"], origin)
    second, seconds = _retrain(origin, tmp_path / "second", "retrain-2", env)
    assert "nothing changed since dvc.lock" in second.stdout, second.stdout + second.stderr
    print(f"second run: {seconds:.1f} s")
    assert seconds < 120
    assert "refs/heads/retrain-2" not in run(["git", "ls-remote", str(origin)], tmp_path).stdout
    assert runs and len(client.search_runs([experiment])) == len(runs)
    assert client.get_model_version_by_alias(model, "champion").version == champion.version

    # What would retrain, named: a param of one stage; other images in data.dvc (not pulled).
    work = tmp_path / "second"
    set_params(work, {"train.epochs": 3})
    dvcfile = work / "data.dvc"
    dvcfile.write_text(
        re.sub(r"md5: \w+", "md5: 0123456789abcdef0123456789abcdef", dvcfile.read_text())
    )
    proc = run(["python", "-m", "cxr.retrain", "unchanged"], work, check=False)
    assert proc.returncode == retrain.CHANGED
    assert "train@cnn: param train.epochs modified" in proc.stdout
    assert "prepare: data deleted (data.dvc)" in proc.stdout
