"""register: the champion into the MLflow Model Registry behind the gate; champion.json and
the model card in reports/champion/."""

from pathlib import Path

from cxr.console import quiet

quiet()  # first: drops TensorFlow's known start-up notices (CXR_VERBOSE=1: all)

from cxr.errors import run_stage  # noqa: E402
from cxr.params import stage_params  # noqa: E402
from cxr.register import register  # noqa: E402
from cxr.tracking import check_server  # noqa: E402


def main() -> None:
    check_server()  # a tracking server that is down: one line now, not minutes later
    result = register(
        stage_params("register"),
        Path("reports/compare/summary.json"),
        Path("evaluation"),
        Path("models"),
        Path("prepared"),
        Path("reports/champion"),
    )
    print(
        f"register: {result['model_name']} version {result['version']} "
        f"({result['architecture']}, {'new' if result['created'] else 'already registered'}); "
        f"{result['decision']}; @champion -> version {result['champion_version']}"
    )


if __name__ == "__main__":
    run_stage(main)
