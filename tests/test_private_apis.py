"""The private APIs the code relies on (MLflow's `_save_example` and run context registry,
Keras' `_inbound_nodes`, JAX's `xla_bridge`, Optuna's `_storage` and `_trial_id`), each
pinned by a test that fails when the upstream behaviour it works around or uses changes."""

import keras
import numpy as np
import pytest


def test_mlflow_keras_still_writes_the_input_example_before_the_model_folder(tmp_path):
    """cxr.train.log_keras_model patches mlflow.keras.save._save_example to create the folder
    first (mlflow/mlflow#16183). When this fails, MLflow fixed it: remove the patch."""
    import mlflow
    from mlflow.keras import save as keras_save

    assert callable(keras_save._save_example)  # the name the patch replaces
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    with pytest.raises(FileNotFoundError, match="input_example"):
        mlflow.keras.save_model(model, tmp_path / "m", input_example=np.zeros((1, 4), "float32"))


def test_the_patched_logging_saves_a_model_with_its_example(tmp_path, monkeypatch):
    import mlflow

    from cxr.train import log_keras_model

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    try:
        with mlflow.start_run():
            model_id = log_keras_model(model, np.zeros((1, 4), "float32"))
        loaded = mlflow.pyfunc.load_model(f"models:/{model_id}")
        assert loaded.input_example is not None
    finally:
        mlflow.set_tracking_uri(None)


def test_mlflow_still_resolves_a_new_runs_context_tags_in_its_registry():
    """cxr.tracking creates a stage's run itself (to give it the process's start time) with
    the tags mlflow.start_run would resolve: the same registry call, the same tags."""
    from mlflow.tracking.context import registry

    tags = registry.resolve_tags({"cxr.group": "g"})
    assert tags["cxr.group"] == "g"
    assert {"mlflow.user", "mlflow.source.name", "mlflow.source.type"} <= set(tags)
    import inspect

    import mlflow.tracking.fluent as fluent

    assert "context_registry.resolve_tags(" in inspect.getsource(fluent.start_run)


def test_a_nested_models_output_is_not_a_tensor_of_the_outer_graph():
    """Grad-CAM (cxr.lung_audit.grad_cam) takes a nested base model's feature map from Keras'
    private `_inbound_nodes`: the public `layer.output` of a nested model is its own graph's
    output, not connected to the outer model's inputs, and Keras 3 has no `get_output_at`.
    When building from `.output` works, switch Grad-CAM to it."""
    from cxr.models import build_model

    model = build_model("resnet50v2", (32, 32, 1), 3, weights="none", dense_units=4)
    base = [layer for layer in model.layers if len(layer.output.shape) == 4][-1]
    assert isinstance(base, keras.Model)  # the transfer base is nested
    with pytest.raises(ValueError):
        keras.Model(model.inputs, base.output)
    features = base._inbound_nodes[-1].output_tensors[0]
    grad_model = keras.Model(model.inputs, [features, model.output])
    maps, probs = grad_model(np.zeros((2, 32, 32, 1), "float32"))
    assert maps.shape[0] == 2 and probs.shape == (2, 3)


def test_jax_still_says_whether_its_backends_have_started():
    """cxr.backend.request_determinism asks JAX's private `backends_are_initialized`
    whether XLA has read its flags yet (no public way). When this fails, find the new one."""
    pytest.importorskip("jax")
    import jax
    from jax._src import xla_bridge

    jax.devices()
    assert xla_bridge.backends_are_initialized() is True


def test_optuna_still_lets_a_dead_workers_trial_be_failed_through_its_storage(tmp_path):
    """cxr.tune_worker.fail_dead_trials fails a killed worker's RUNNING trial through the study's
    private `_storage` and the trial's `_trial_id` (Optuna has no public call for another
    process's trial), on the journal storage cxr.tune opens."""
    import optuna
    from optuna.trial import TrialState

    from cxr.tune_worker import open_storage

    study = optuna.create_study(storage=open_storage(None, tmp_path / "journal.log"))
    trial = study.ask()  # RUNNING, as a worker leaves it when killed
    study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
    assert [t.state for t in study.get_trials()] == [TrialState.FAIL]
