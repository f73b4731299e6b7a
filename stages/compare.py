"""compare: one table and chart of every evaluated architecture, their learning curves, a
paired test between the best two, the champion by compare.metric; in reports/compare/ and an
MLflow `compare` run."""

from pathlib import Path

from cxr.console import quiet

quiet()  # first: drops TensorFlow's known start-up notices (CXR_VERBOSE=1: all)

from cxr.compare import compare  # noqa: E402
from cxr.errors import run_stage  # noqa: E402
from cxr.params import stage_params  # noqa: E402
from cxr.tracking import check_server  # noqa: E402


def main() -> None:
    check_server()  # a tracking server that is down: one line now, not minutes later
    summary = compare(
        stage_params("compare"), Path("evaluation"), Path("reports/compare"), Path("reports")
    )
    print(Path("reports/compare/table.md").read_text())
    print(
        f"compare: champion {summary['champion']} by validation {summary['metric']} "
        f"{summary['value']:.3f} (test: {summary['test_value']:.3f})"
    )


if __name__ == "__main__":
    run_stage(main)
