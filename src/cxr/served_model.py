"""The served classifier's definition for MLflow's models-from-code logging (no pickle):
MLflow runs this file when the model loads. See serving.py."""

import mlflow

from cxr.serving import Classifier

mlflow.models.set_model(Classifier())
