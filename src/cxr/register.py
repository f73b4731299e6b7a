"""The register stage: the champion into the MLflow Model Registry, behind a gate.

The champion's Keras model is logged once into its training run as the `classifier` pyfunc
(cxr.pyfunc_classifier) and registered as a version of `register.model_name`. The alias
`champion` moves to it only when it scores at least as well as the current champion
re-scored on the current validation split (compare chose by that split too; the test split is
reported, never used to choose), and never across different class sets, unless
`register.force`. A champion chosen on other data (another data fingerprint) is re-scored
all the same: it may have trained on some of today's validation images, a bias in its favour
only, which the decision then names. A current champion that cannot be loaded or scored (its
files gone from the artifact store) is replaced, and the decision says why: kept, it would
fail every later run. The gate decides before a new version exists, and the version is made
with its decision (the `cxr.gate` tag), so no failure leaves a version without one. A rerun
finds the version it registered before (by run id) and creates no duplicate.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from cxr import tracking
from cxr.errors import CxrError
from cxr.files import atomic_path, read_json, write_json
from cxr.lungs import audit_inputs
from cxr.metrics import scores
from cxr.model_card import model_card
from cxr.params import LUNG_METRICS
from cxr.prepared import split_arrays, split_masks
from cxr.repo import git_commit
from cxr.requirements import MODEL_REQUIREMENTS, pinned_requirements

ALIAS = "champion"


def champion_uri(model_name: str) -> str:
    """The MLflow URI of the registered champion of `model_name` (params' register.model_name)."""
    return f"models:/{model_name}@{ALIAS}"


# What the served pyfunc needs besides the lock file's pins of MODEL_REQUIREMENTS.
SERVING_REQUIREMENTS = ("pillow",)  # decoding in cxr.images


def _client():
    import mlflow

    mlflow.set_tracking_uri(tracking.tracking_uri())
    return mlflow.MlflowClient()


def _version_of_run(client, name: str, run_id: str):
    for version in client.search_model_versions(f"name='{name}'"):
        if version.tags.get("cxr.run_id") == run_id:
            return version
    return None


def _ensure_registered_model(client, name: str) -> None:
    from mlflow.exceptions import MlflowException

    if client.search_registered_models(f"name='{name}'"):
        return
    try:
        client.create_registered_model(name, description="Chest radiograph classifier (cxr).")
    except MlflowException as err:  # a parallel experiment created it first
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


def _classes_of(version) -> list[str]:
    return version.tags.get("cxr.classes", "").split(",")


def _current_champion(client, name: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, ALIAS)
    except MlflowException:
        return None


def keras_file_of(model_uri: str, into: Path) -> Path:
    """Download a registered classifier's files into `into` and return its Keras model file,
    found through the MLmodel file (YAML, read as data): nothing the version ships runs."""
    import yaml
    from mlflow.artifacts import download_artifacts

    local = Path(download_artifacts(artifact_uri=model_uri, dst_path=str(into)))
    if not (local / "MLmodel").is_file():  # MLflow downloads an empty folder without a word
        raise FileNotFoundError(f"{model_uri} has no files in the artifact store (no MLmodel)")
    flavor = yaml.safe_load((local / "MLmodel").read_text())["flavors"]["python_function"]
    path = (local / flavor["artifacts"]["keras_model"]["path"]).resolve()
    if not path.is_relative_to(local.resolve()):
        raise ValueError(f"{model_uri}: its Keras file {path} lies outside the model")
    if not zipfile.is_zipfile(path):  # Keras says "File not found" for both
        raise ValueError(f"{model_uri}: its Keras file {path.name} is missing or not a zip")
    return path


class Unloadable(Exception):
    """A registered version whose own files cannot be loaded: the message says why."""


def load_registered(model_uri: str):
    """A registered classifier's Keras model, loaded in Keras's safe mode (no pickled code,
    no Lambda layers) from its Keras file, never through its pyfunc: loading that runs the
    code shipped with the version, and anyone who can register a version could run code on
    the retraining machine. Unloadable when the version's files are gone or damaged; a store
    that does not answer (MLflow wraps connection errors in an MlflowException) is raised
    as it is, since it says nothing about the version."""
    import tempfile

    import keras
    import requests
    from mlflow.exceptions import MlflowException

    try:
        with tempfile.TemporaryDirectory() as tmp:
            return keras.saving.load_model(
                keras_file_of(model_uri, Path(tmp)), compile=False, safe_mode=True
            )
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise Unloadable(err.message) from err
    except (ConnectionError, TimeoutError, requests.RequestException):
        raise
    except (OSError, ValueError, TypeError, KeyError, zipfile.BadZipFile) as err:
        raise Unloadable(str(err) or type(err).__name__) from err


def rescore(
    model_uri: str,
    x: np.ndarray,
    y: np.ndarray,
    classes: list[str],
    metric: str,
    masks: np.ndarray | None = None,
):
    """`metric` of a registered classifier (load_registered) on images `x`, labels `y`. A
    lung metric (`lungs_only_...`) scores the images with only their lungs (`masks`)
    visible, as the evaluate stage did."""
    from cxr.images import resize

    model = load_registered(model_uri)
    if metric in LUNG_METRICS:
        x, metric = audit_inputs(x, masks)["lungs_only"], metric.removeprefix("lungs_only_")
    size = int(model.input_shape[1])
    if x.shape[1] != size:
        x = np.stack([resize(image[..., 0], size) for image in x])[..., None]
    probs = np.asarray(model.predict(x, batch_size=64, verbose=0))
    return scores(y, probs, classes)[metric]


def _rescore_champion(
    name: str, version: str, prepared: Path, classes: list[str], metric: str
) -> tuple[float | None, str | None]:
    """(score, None) of the current champion on the current validation split, or (None,
    why) when its own files cannot be loaded (deleted from the artifact store, a missing or
    corrupt Keras file). Any other failure (the store, memory, the scoring) fails the stage:
    it says nothing against the champion."""
    uri = f"models:/{name}/{version}"
    try:
        x, y, _ = split_arrays(prepared, "val")
        masks = split_masks(prepared, "val")[0] if metric in LUNG_METRICS else None
        return rescore(uri, x, y, classes, metric, masks), None
    except Unloadable as err:
        lines = tracking.scrub(str(err)).strip().splitlines() or ["unloadable"]
        why = lines[0]  # one line, bounded: it goes into the decision, a tag and the card
        return None, why if len(why) <= 300 else why[:297] + "..."


def gate(
    newcomer: float,
    classes: list[str],
    current: Any | None,
    current_score: float | None,
    force: bool,
    broken: str | None = None,
    other_data: str | None = None,
) -> tuple[bool, str]:
    """(move the alias?, why), from the newcomer's validation score and the current
    champion's re-scored on the same split, or why the current champion could not be loaded
    (`broken`). `other_data`: the fingerprint of the data the current champion was chosen
    on when it is not the newcomer's ("unknown" when not recorded). Re-scored here, it may
    have trained on some of these validation images: a bias in its favour only, so a
    newcomer that still wins is promoted, and one that loses is kept out with that caveat."""
    if current is None:
        return True, "no champion yet"
    theirs = _classes_of(current)
    if theirs != classes:
        if force:
            return True, f"forced over a champion with other classes ({theirs})"
        return False, (
            f"refused: the current champion (version {current.version}) predicts {theirs}, "
            f"this model {classes}; set register.force: true to replace it anyway"
        )
    if broken is not None:
        return True, (
            f"replaced the current champion (version {current.version}), which cannot be "
            f"loaded or scored: {broken}"
        )
    other = f", chosen on other data (fingerprint {other_data[:12]})" if other_data else ""
    if newcomer >= current_score:
        return True, (
            f"{newcomer:.4f} >= current champion's {current_score:.4f} (re-scored on this "
            f"validation split{other})"
        )
    if force:
        return True, f"forced: {newcomer:.4f} < current champion's {current_score:.4f}"
    caveat = (
        f"; the champion was chosen on other data (fingerprint {other_data[:12]}) and may "
        "have trained on some of these images: set register.force: true if this model "
        "should replace it"
        if other_data
        else ""
    )
    return False, (
        f"kept version {current.version}: this model scores {newcomer:.4f} < the current "
        f"champion's {current_score:.4f} on the current validation split{caveat}"
    )


def register(
    params: dict[str, Any],
    summary_path: Path,
    evaluation: Path,
    models: Path,
    prepared: Path,
    out_dir: Path,
) -> dict[str, Any]:
    """Register the champion named in `summary_path`, apply the gate, write champion.json and
    model_card.md in `out_dir`."""
    import mlflow

    cfg = params["register"]
    name = cfg["model_name"]
    summary = read_json(summary_path)
    if summary.get("split") != "val":
        raise CxrError(
            f"{summary_path} comes from an older compare stage (it chose on the test split): "
            "run `dvc repro -f compare`."
        )
    champion, run_id, metric = summary["champion"], summary["run_id"], summary["metric"]
    test = read_json(evaluation / champion / "test.json")
    sources = read_json(evaluation / champion / "per_source.json")
    dataset = read_json(prepared / "dataset.json")
    client = _client()
    _ensure_registered_model(client, name)
    # The gate decides before a new version exists: a failure on the way registers none.
    version = _version_of_run(client, name, run_id)
    move, decision = _decide(client, name, version, summary, prepared, cfg["force"])
    created = version is None
    if created:
        version = _new_version(params, summary, models, decision)
    if move:
        client.set_registered_model_alias(name, ALIAS, version.version)
    client.set_model_version_tag(name, version.version, "cxr.gate", decision)

    out_dir.mkdir(parents=True, exist_ok=True)
    card = model_card(summary, test, sources, dataset, name, version.version, decision)
    with atomic_path(out_dir / "model_card.md") as tmp:
        tmp.write_text(card)
    client.update_model_version(name, version.version, description=card)
    with tracking.start_run(
        params["mlflow"]["experiment"], champion, {}, run_id=run_id, add_only=True
    ):
        mlflow.log_artifact(str(out_dir / "model_card.md"))
    holder = _current_champion(client, name)
    result = {
        "model_name": name,
        "version": version.version,
        "created": created,
        "architecture": champion,
        "run_id": run_id,
        f"val_{metric}": summary["value"],
        f"test_{metric}": summary["test_value"],
        "alias_moved": move,
        "decision": decision,
        "champion_version": holder.version if holder else None,
        "model_uri": champion_uri(name),
    }
    write_json(out_dir / "champion.json", result)
    return result


def _decide(client, name, version, summary, prepared: Path, force: bool) -> tuple[bool, str]:
    """(move the alias?, the decision in words) for compare's champion, whose registered
    `version` may exist already (a rerun)."""
    current = _current_champion(client, name)
    if version is not None and current is not None and current.version == version.version:
        return True, "already the champion"
    classes = summary["classes"]
    # Re-scored only where comparable: the same classes.
    current_score, broken, other_data = None, None, None
    if current is not None and _classes_of(current) == classes:
        theirs = current.tags.get("cxr.data_fingerprint") or "unknown"
        if theirs != summary["data_fingerprint"]:
            other_data = theirs
        current_score, broken = _rescore_champion(
            name, current.version, prepared, classes, summary["metric"]
        )
    return gate(summary["value"], classes, current, current_score, force, broken, other_data)


def _new_version(params: dict[str, Any], summary: dict[str, Any], models: Path, decision: str):
    """The champion's classifier logged into its training run and registered, the gate's
    decision among the version's tags (one transaction)."""
    import mlflow

    champion, run_id, metric = summary["champion"], summary["run_id"], summary["metric"]
    classes = summary["classes"]
    with tracking.start_run(
        params["mlflow"]["experiment"], champion, {}, run_id=run_id, add_only=True
    ):
        info = _log_classifier(
            models / champion / "model.keras", classes, params["prepare"]["min_size"]
        )
    return mlflow.register_model(
        info.model_uri,
        params["register"]["model_name"],
        tags={
            "cxr.run_id": run_id,
            "cxr.architecture": champion,
            "cxr.classes": ",".join(classes),
            "cxr.data_fingerprint": summary["data_fingerprint"] or "",
            "cxr.git_commit": git_commit(),
            f"val_{metric}": f"{summary['value']:.6f}",
            f"test_{metric}": f"{summary['test_value']:.6f}",
            "cxr.gate": decision,  # made with the version, in one transaction
        },
    )


def _log_classifier(keras_model: Path, classes: list[str], min_size: int):
    from cxr.pyfunc_classifier import log_classifier

    requirements = pinned_requirements(MODEL_REQUIREMENTS + SERVING_REQUIREMENTS)
    return log_classifier(keras_model, classes, requirements, min_size)
