"""The model card of a registered champion (model_card.md, and the version's description
in the MLflow registry): what it classifies and how it was chosen, its data, its test
figures with intervals, the shortcut audit, its accuracy per image source, its limits."""

from __future__ import annotations

import math

from cxr.metrics import HEADLINE, INTERVALS, INTERVALS_NOTE, lung_verdict

LIMITATIONS = [
    "## Limitations",
    "",
    "- Shortcut learning: in the Kaggle database each class comes mostly from its own "
    "hospitals and sources (viral pneumonia films are paediatric), so a model can learn "
    "the source instead of the disease. Check the Grad-CAM overlays in the run's "
    "`evaluation/figures` and the per-class recall; expect lower scores on other sources.",
    "- Calibration: probabilities are the softmax outputs, not calibrated risks (see the "
    "reliability diagram).",
    "- The test split comes from the same sources as the training data; it measures "
    "in-distribution performance only.",
    "- Input: one frontal radiograph, decoded to 8-bit grey; lateral views, other body "
    "parts and non-radiographs are outside its scope and still get a label.",
    "",
]


def model_card(
    summary: dict,
    test: dict,
    sources: dict,
    dataset: dict,
    name: str,
    version: str,
    decision: str,
) -> str:
    """The card of version `version` of registered model `name`: compare's `summary`, the
    champion's test.json and per_source.json, prepare's dataset.json, the gate's decision."""
    metric, champion = summary["metric"], summary["champion"]
    lines = [
        f"# Model card: {name} version {version} ({champion})",
        "",
        "Classifies a frontal chest radiograph into "
        + ", ".join(summary["classes"])
        + f". Chosen as the best of {len(summary['ranking'])} architectures by `{metric}` "
        "on the validation split; the test figures below were not used to choose. Registry "
        f"decision: {decision}.",
        "",
        "**Not for clinical use.** A research model; it has not been validated on any "
        "population, scanner or workflow, and must not inform care.",
        "",
    ]
    lines += _data(dataset) + _test_figures(test) + _audit(test, len(summary["classes"]))
    lines += _per_source(sources) + LIMITATIONS
    return "\n".join(lines)


def _data(dataset: dict) -> list[str]:
    lines = [
        "## Data",
        "",
        f"Prepared images: {dataset['n_images']} at {dataset['image_size']} px "
        f"(data fingerprint `{dataset['fingerprint'][:16]}`), deduplicated and split by "
        "near-duplicate groups (no film in two splits).",
        "",
        "| split | " + " | ".join(dataset["classes"]) + " |",
        "|---|" + "---:|" * len(dataset["classes"]),
    ]
    for split, per in dataset["counts"].items():
        lines.append(f"| {split} | " + " | ".join(str(per[c]) for c in dataset["classes"]) + " |")
    return lines + [""]


def _test_figures(test: dict) -> list[str]:
    lines = [
        f"## Test metrics ({test['n_test']} images; brackets: {INTERVALS_NOTE})",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    for key, label in HEADLINE.items():
        value = f"{test[key]:.3f}"
        if key in INTERVALS:
            value += f" [{test[f'{key}_ci_low']:.3f}, {test[f'{key}_ci_high']:.3f}]"
        lines.append(f"| {label} | {value} |")
    lines += [
        f"| expected calibration error | {test['ece']:.3f} |",
        "",
        "| class | recall | precision | F1 | test images |",
        "|---|---:|---:|---:|---:|",
    ]
    for c, f in test["per_class"].items():
        lines.append(
            f"| {c} | {f['recall']:.3f} | {f['precision']:.3f} | {f['f1']:.3f} | {f['support']} |"
        )
    return lines + [""]


def _audit(test: dict, k: int) -> list[str]:
    lines = [
        "## Does it read the lungs? (shortcut audit, test split)",
        "",
        f"Verdict: {lung_verdict(test, k)}.",
        "",
        f"| test images (chance: accuracy {1 / k:.3f}) | accuracy | macro-F1 |",
        "|---|---|---|",
    ]
    for view, prefix in (
        ("intact", ""),
        ("lungs hidden", "lungs_hidden_"),
        ("lungs only", "lungs_only_"),
    ):
        lines.append(
            f"| {view} | "
            + " | ".join(
                f"{test[prefix + m]:.3f} [{test[prefix + m + '_ci_low']:.3f}, "
                f"{test[prefix + m + '_ci_high']:.3f}]"
                for m in ("accuracy", "macro_f1")
            )
            + " |"
        )
    lines += [
        "",
        "Grad-CAM heat inside the lungs: "
        f"{test.get('gradcam_lung_share', math.nan):.2f} on average "
        f"(the lungs are {test['lung_area_share']:.2f} of the image). "
        + (
            "Lungs: each test image's own mask."
            if test["lung_masks_from_files"] == 1
            else "Lungs: the lung template where an image has no mask file (a weaker audit)."
        ),
        "",
    ]
    return lines


def _per_source(sources: dict) -> list[str]:
    if not sources:
        return []
    lines = [
        "## Test accuracy per image source",
        "",
        "A source that holds one class only and scores near 1.0 may be recognised by its "
        "look rather than by the finding.",
        "",
        "| source | images | accuracy | classes |",
        "|---|---:|---:|---|",
    ]
    for source, row in sources.items():
        held = ", ".join(f"{c} {n}" for c, n in row["classes"].items())
        lines.append(f"| {source} | {row['n']} | {row['accuracy']:.3f} | {held} |")
    return lines + [""]
