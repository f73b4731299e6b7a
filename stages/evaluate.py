"""evaluate@<model>: score a trained architecture on the test split; metrics, per-image
predictions and figures in evaluation/<model>/, all also logged into the model's training run
in MLflow."""

import argparse
from pathlib import Path

from cxr.console import quiet

quiet()  # first: drops TensorFlow's known start-up notices (CXR_VERBOSE=1: all)

from cxr.errors import run_stage  # noqa: E402
from cxr.evaluate import evaluate  # noqa: E402
from cxr.metrics import lung_verdict  # noqa: E402
from cxr.params import stage_params  # noqa: E402
from cxr.tracking import check_server  # noqa: E402


def main() -> None:
    check_server()  # a tracking server that is down: one line now, not minutes later
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model", help="architecture key, one of params.yaml's train.models")
    name = parser.parse_args().model
    m = evaluate(
        name,
        stage_params("evaluate", {"model": name}),
        Path("prepared"),
        Path("models") / name / "model.keras",
        Path("reports") / name / "mlflow_run.json",
        Path("evaluation") / name,
    )
    print(
        f"evaluate@{name}: accuracy {m['accuracy']:.3f} "
        f"[{m['accuracy_ci_low']:.3f}, {m['accuracy_ci_high']:.3f}], "
        f"macro-F1 {m['macro_f1']:.3f} [{m['macro_f1_ci_low']:.3f}, {m['macro_f1_ci_high']:.3f}], "
        f"ECE {m['ece']:.3f}"
    )
    print(
        f"evaluate@{name}: lung audit: accuracy with the lungs hidden "
        f"{m['lungs_hidden_accuracy']:.3f}, lungs only {m['lungs_only_accuracy']:.3f}; "
        f"Grad-CAM heat inside the lungs {m['gradcam_lung_share']:.2f} (lungs are "
        f"{m['lung_area_share']:.2f} of the image); {lung_verdict(m, len(m['per_class']))}"
    )


if __name__ == "__main__":
    run_stage(main)
