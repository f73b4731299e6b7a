"""Chest radiograph classification pipeline: DVC stages, Keras models, MLflow tracking.

Modules, by stage (each stage script in stages/ calls one function of the first module named):
- settings: classes (the class table), settings (every params.yaml key: kind, accepted
  values, help; docs/params.md comes from it), vocabulary (the names the code acts on),
  params (loading, checks across settings, each stage's params);
- download: download (the stage), kaggle_client (credentials, the Kaggle API under one
  retry policy), archive (zips and folders unpacked safely), layout (the Kaggle layouts),
  synthetic (the offline phantoms);
- prepare: prepare (index, scan, report), dedupe, balance (balancing and splitting by
  near-duplicate groups), images (the one decoder), lungs (masks, the template, the focus
  and the audit's views), prepared (the contract of prepared/), data_report;
- train: train (the stage: MLflow, files), fit (one configuration on given arrays), models
  (the architectures), augment, checkpoint (resume), backend (TensorFlow or JAX), machine
  (the CPU, threads, oneDNN);
- evaluate: evaluate (the stage), lung_audit (lungs hidden / only, Grad-CAM),
  evaluation_figures, metrics (scores, intervals, McNemar, the lung verdict), baselines
  (pixel models);
- compare, register: compare (the ranking on validation), register (the gate and the
  registry), model_card;
- serving: pyfunc_classifier (the MLflow pyfunc around the Keras model, `cxr predict`),
  pyfunc_definition (the file MLflow runs to load it), http_server (`cxr serve`: MLflow's
  app behind a guard on request sizes);
- tuning and retraining: tune (`cxr tune`: the study, its MLflow runs), tune_worker (the
  trials), retrain (what the retraining workflow decides);
- shared: tracking (DVC <-> MLflow), repo (root, git), requirements (pins), files (atomic
  outputs, JSON), processes, figures, console (quiet output, progress bars), timing,
  errors (the one-line failures), cli (the `cxr` command).
"""

from cxr.machine import use_onednn

__version__ = "0.1.0"

use_onednn()  # before TensorFlow starts: its fast convolutions on AVX2-only CPUs too
