"""The one table of classes: Kaggle folder names and the labels the study used.

Nothing else in the code spells a class name; everything reads it from here.
"""

from __future__ import annotations

from cxr.errors import CxrError

# Kaggle folder name -> label, in label-index order (the model's output order).
FOLDER_TO_LABEL: dict[str, str] = {
    "COVID": "covid",
    "Lung_Opacity": "lung_opacity",
    "Normal": "normal",
    "Viral Pneumonia": "pneumonia",
}
LABELS: tuple[str, ...] = tuple(FOLDER_TO_LABEL.values())
LABEL_TO_FOLDER: dict[str, str] = {label: folder for folder, label in FOLDER_TO_LABEL.items()}
DATASET_DIR = "COVID-19_Radiography_Dataset"
# The class that data.topup fills from the paediatric pneumonia films.
TOPUP_LABEL = FOLDER_TO_LABEL["Viral Pneumonia"]
# Images per class in the Kaggle database (21,165 in all); benchmarks write phantoms this way.
DATABASE_COUNTS: dict[str, int] = {
    "covid": 3616,
    "lung_opacity": 6012,
    "normal": 10192,
    "pneumonia": 1345,
}


def check_labels(labels: list[str]) -> list[str]:
    """Return `labels` in canonical order, or raise naming the unknown ones."""
    unknown = [label for label in labels if label not in LABELS]
    if unknown:
        raise CxrError(
            f"Unknown class label(s) {unknown} in data.classes; "
            f"expected a subset of {list(LABELS)}."
        )
    if len(set(labels)) < 2:
        raise CxrError(f"data.classes needs at least two classes, got {labels}.")
    return [label for label in LABELS if label in labels]
