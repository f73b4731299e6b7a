"""compare: one table and chart of every evaluated architecture, a paired test between the
best two, the champion by compare.metric; in reports/compare/ and an MLflow `compare` run."""

from pathlib import Path

from cxr.compare import compare
from cxr.errors import run_stage
from cxr.params import stage_params


def main() -> None:
    summary = compare(stage_params("compare"), Path("evaluation"), Path("reports/compare"))
    print(Path("reports/compare/table.md").read_text())
    print(f"compare: champion {summary['champion']} ({summary['metric']} {summary['value']:.3f})")


if __name__ == "__main__":
    run_stage(main)
