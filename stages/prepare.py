"""prepare: validate, dedupe, balance and split raw/ + data/; cache in prepared/, report in
reports/data/ (also logged to MLflow as the execution's `prepare` run)."""

from pathlib import Path

from cxr.console import quiet

quiet()  # first: drops TensorFlow's known start-up notices (CXR_VERBOSE=1: all)

from cxr.data_report import log_data_report, write_data_report  # noqa: E402
from cxr.errors import run_stage  # noqa: E402
from cxr.files import write_json  # noqa: E402
from cxr.layout import say_not_read  # noqa: E402
from cxr.params import stage_params  # noqa: E402
from cxr.prepare import prepare  # noqa: E402
from cxr.tracking import check_server  # noqa: E402


def main() -> None:
    check_server()  # a tracking server that is down: one line now, not minutes later
    params = stage_params("prepare")
    data = params["data"]
    report = prepare(
        Path("raw"),
        [Path("data")],
        data["classes"],
        params["prepare"],
        Path("prepared"),
        topup=data["topup"],
    )
    write_data_report(report, Path("prepared"), Path("reports/data"))
    write_json(
        Path("reports/prepare.json"),
        {
            "n_images": report["n_images"],
            "rejected": len(report["rejects"]),
            "not_read": report["not_read_files"],
            "duplicates_removed": sum(len(d) - 1 for d in report["duplicates"]),
            "conflicts": len(report["conflicts"]),
            # per class: the data report (reports/data/)
            **{f"n_{split}": sum(n.values()) for split, n in report["counts"].items()},
        },
    )
    log_data_report(params, report, Path("reports/data"))
    print(f"prepare: {report['n_images']} images; {report['counts']}")
    masks = report["lung_masks"]
    print(
        f"prepare: lung masks: {masks.get('file', 0)} from mask files, "
        f"{masks.get('template', 0)} from the lung template"
    )
    say_not_read("prepare", report["not_read"], "reports/data/report.md")
    for note in report["balance"]["notes"]:
        print(f"prepare: {note}")


if __name__ == "__main__":
    run_stage(main)
