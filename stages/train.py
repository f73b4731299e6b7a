"""train@<model>: fit one architecture; model in models/<model>/, metrics, history and the
MLflow run record in reports/<model>/."""

import argparse
from pathlib import Path

from cxr.console import quiet

quiet()  # first: drops TensorFlow's known start-up notices (CXR_VERBOSE=1: all)

from cxr.errors import run_stage  # noqa: E402
from cxr.params import stage_params  # noqa: E402
from cxr.tracking import check_server  # noqa: E402
from cxr.train import train  # noqa: E402


def main() -> None:
    check_server()  # a tracking server that is down: one line now, not minutes later
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model", help="architecture key, one of params.yaml's train.models")
    name = parser.parse_args().model
    # How often a checkpoint is saved does not change the model: not a DVC param.
    params = stage_params("train", {"model": name}, untracked=("train.checkpoint_seconds",))
    metrics = train(name, params, Path("prepared"), Path("models") / name, Path("reports") / name)
    print(f"train@{name}: {metrics}")


if __name__ == "__main__":
    run_stage(main)
