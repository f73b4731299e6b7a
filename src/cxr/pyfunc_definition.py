"""The served classifier's definition for MLflow's models-from-code logging (no pickle):
MLflow runs this file when the model loads. See pyfunc_classifier.py."""

import mlflow

from cxr.pyfunc_classifier import Classifier

mlflow.models.set_model(Classifier())
