"""The data report: what prepare found, kept and dropped, as JSON, markdown and a sample grid,
also logged to MLflow as the execution's `prepare` run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cxr import tracking
from cxr.figures import pyplot, save_figure
from cxr.files import atomic_path, write_json
from cxr.prepared import SPLITS, load_prepared

LISTED = 20  # rows shown per list in the markdown; report.json has them all


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _listing(title: str, entries: list[str]) -> str:
    if not entries:
        return f"**{title}**: none.\n"
    shown = "\n".join(f"- {e}" for e in entries[:LISTED])
    more = (
        f"\n- ... and {len(entries) - LISTED} more (report.json)" if len(entries) > LISTED else ""
    )
    return f"**{title}** ({len(entries)}):\n\n{shown}{more}\n"


def markdown(report: dict[str, Any]) -> str:
    classes = report["classes"]
    per_class = report["per_class"]
    counts = report["counts"]
    rows = [
        [
            c,
            per_class[c]["found"],
            per_class[c]["valid_unique"],
            per_class[c]["after_balancing"],
            *(counts[s][c] for s in SPLITS),
        ]
        for c in classes
    ]
    rows.append(["**total**", *(sum(r[k] for r in rows) for k in range(1, 7))])
    balance = report["balance"]
    parts = [
        "# Data report",
        f"Images: {report['n_images']} at {report['image_size']} px; classes: "
        f"{', '.join(classes)}; fingerprint `{report['fingerprint'][:16]}`.",
        _table(["class", "found", "valid, unique", "after balancing", *SPLITS], rows),
        f"Balancing: **{balance['strategy']}**"
        + (f", target {balance['target']} per class." if balance["target"] else "."),
        "\n".join(f"- {note}" for note in balance["notes"]) or "All classes reached the target.",
    ]
    if report["topup_found"]:
        parts.append(f"Top-up films found: {report['topup_found']}.")
    masks = report["lung_masks"]
    parts.append(
        f"Lung masks (for the evaluate stage's lung audit): {masks.get('file', 0)} images with "
        f"their own mask file, {masks.get('template', 0)} with the lung template instead."
    )
    parts += [
        _listing(
            "Mask files not used (the template stood in)",
            [f"`{n['path']}`: {n['mask']}" for n in report["lung_mask_notes"]],
        ),
        _listing(
            "Not read (outside the layout: cxr.layout)",
            [f"`{e['path']}` ({e['files']} files): {e['reason']}" for e in report["not_read"]],
        ),
        _listing("Rejected files", [f"`{r['path']}`: {r['reason']}" for r in report["rejects"]]),
        _listing(
            "Exact duplicates (first kept)",
            [" = ".join(f"`{p}`" for p in group) for group in report["duplicates"]],
        ),
        _listing(
            "Label conflicts (same pixels, different labels; all copies dropped)",
            [
                f"{', '.join(c['labels'])}: " + " = ".join(f"`{p}`" for p in c["paths"])
                for c in report["conflicts"]
            ],
        ),
        _listing(
            "Near-duplicate groups (kept together in one split)",
            [" ~ ".join(f"`{p}`" for p in g) for g in report["near_duplicate_groups"]],
        ),
        "Sample images per class: `sample_grid.png`.",
    ]
    return "\n\n".join(parts) + "\n"


def sample_grid(prepared: Path, path: Path, per_class: int = 6) -> None:
    plt = pyplot()

    images, rows, summary = load_prepared(prepared)
    classes = summary["classes"]
    fig, axes = plt.subplots(
        len(classes), per_class, figsize=(per_class * 1.6, len(classes) * 1.7), squeeze=False
    )
    for r, label in enumerate(classes):
        chosen = [int(row["index"]) for row in rows if row["label"] == label][:per_class]
        for c in range(per_class):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(chosen):
                ax.imshow(np.asarray(images[chosen[c]]), cmap="gray", vmin=0, vmax=255)
        axes[r][0].set_title(label, loc="left", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=90)


def write_data_report(report: dict[str, Any], prepared: Path, out_dir: Path) -> None:
    """report.json, report.md and sample_grid.png in `out_dir` (written as one folder)."""
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        write_json(tmp / "report.json", report)
        (tmp / "report.md").write_text(markdown(report))
        sample_grid(prepared, tmp / "sample_grid.png")


def log_data_report(params: dict[str, Any], report: dict[str, Any], report_dir: Path) -> None:
    """Log prepare's report as this execution's `prepare` run (params, counts, files)."""
    import mlflow

    from cxr.params import flatten

    tags = tracking.run_tags(stage="prepare", data_fingerprint=report["fingerprint"])
    with tracking.start_run(params["mlflow"]["experiment"], "prepare", tags):
        mlflow.log_params({f"prepare.{k}": v for k, v in flatten(params["prepare"]).items()})
        mlflow.log_params(
            {"data.classes": ",".join(report["classes"]), "data.topup": params["data"]["topup"]}
        )
        counts = {
            f"n_{split}_{label}": n
            for split, per in report["counts"].items()
            for label, n in per.items()
        }
        mlflow.log_metrics(
            {
                "n_images": report["n_images"],
                "n_rejected": len(report["rejects"]),
                "n_not_read": report["not_read_files"],
                "n_conflicts": len(report["conflicts"]),
                **counts,
            }
        )
        mlflow.log_artifacts(str(report_dir), artifact_path="data_report")
